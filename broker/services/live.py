"""Live changes (docs/live-changes.md) and connection status, off the message path.

* ``ChangeWatcher`` polls the keystore's change marker every ``interval`` seconds
  (SQLite: ``PRAGMA data_version`` for other processes such as the CLI, plus a counter
  for our own connection; PostgreSQL: the newest change id); only when it moves does it
  read the ``changes`` rows written by triggers since the last one seen. PostgreSQL also
  pushes: its NOTIFY wakes the watcher as soon as a change commits, and so does the
  keystore coming back after an outage, when the watcher catches up from the last row
  it applied (a key revoked meanwhile still kicks its sessions). Polling goes on all
  the while, so a lost notification connection only costs latency. Work is proportional
  to the number of changes, never to the number of keys or sessions. Deactivated,
  deleted or expired keys and deleted devices get their sessions kicked; operators'
  ``devices kick`` requests arrive the same way.
* A CONNECT that read its key before a change to it was applied here, and went online
  after, is checked again on the next tick (the registry's ``rechecks``). A key that
  expires while its sessions are connected is the registry's to end.
* ``StatusRecorder`` batches device connected/last-seen and key last-used writes and
  flushes them once per interval, so CONNECT never waits on a write.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from broker import policy
from broker.core.periodic import Periodic
from broker.mqtt.session import Grant
from broker.mqtt.sessions import SessionRegistry
from broker.policy import SessionPolicy
from keystore import DEFAULT_CHANGE_POLL_INTERVAL, KeyStore
from keystore.errors import UnavailableError
from keystore.models import AccessKey, Change

logger = logging.getLogger(__name__)

FEED_PAGE = 10_000


class FeedReader(Periodic):
    """Reads the keystore's change feed from where it started (the daemon's ChangeWatcher,
    keybroker.authsvc's Revoker): ``new_changes`` looks at the change marker and, only when
    it moved, yields every row written since the last one, however many a bulk operation
    made, in pages."""

    def __init__(self, keystore: KeyStore, interval: float) -> None:
        super().__init__(interval)
        self.keystore = keystore
        self._last_id: int | None = None  # None: not started yet
        self._marker: tuple[int, int] | None = None
        self.last_read = time.monotonic()  # when the feed was last read (metrics: lag)
        self.pushed = False  # whether the keystore wakes us on each change (PostgreSQL)

    @property
    def applied_change_id(self) -> int:
        """The last change-feed row applied: rows up to it are no longer needed here."""
        return self._last_id or 0

    async def start(self) -> None:
        """Read from the newest change, or from where ``catch_up`` got to."""
        if self._last_id is None:
            self._last_id = await self.keystore.latest_change_id()
            self._marker = await self.keystore.change_marker()
        self.pushed = await self.keystore.watch_changes(self.wake)
        self.start_ticking()

    async def new_changes(self) -> AsyncIterator[Change]:
        """A change counts as read once the consumer's loop body for it has returned: if
        the body raises (the keystore went away while it was being applied), or reading
        the feed fails, the position stays before it and the next tick reads it again."""
        marker = await self.keystore.change_marker()
        self.last_read = time.monotonic()
        if marker == self._marker:
            return
        while True:
            changes = await self.keystore.changes_since(self._last_id or 0, limit=FEED_PAGE)
            for change in changes:
                yield change
                self._last_id = change.id
            if len(changes) < FEED_PAGE:
                break
        self._marker = marker  # only now: everything up to it was applied


class ChangeWatcher(FeedReader):
    name = "keybroker-change-watcher"

    def __init__(self, sessions: SessionRegistry, keystore: KeyStore,
                 interval: float = DEFAULT_CHANGE_POLL_INTERVAL) -> None:
        super().__init__(keystore, interval)
        self.sessions = sessions

    async def catch_up(self, since: int) -> None:
        """Apply the changes after ``since``: the position a restored broker state was
        saved at, so what changed while the daemon was down (devices and applications
        removed) reaches the restored sessions and retained messages before the listeners
        open. ``start`` goes on from there."""
        self._last_id, self._marker = since, None
        applied = await self._apply_new()
        if applied:
            logger.info("change feed: applied %d changes made while the daemon was down",
                        applied)

    async def _apply_new(self) -> int:
        """Apply every change not applied yet; returns how many."""
        count = 0
        async for change in self.new_changes():
            count += 1
            try:
                await self._apply(change.kind, change.subject)
            except (UnavailableError, sqlite3.Error):
                raise  # the keystore is away: this change is applied again next tick
            except Exception:  # a bug with one change must not stop the others
                logger.exception("applying change %s failed", change)
        return count

    async def tick(self) -> None:
        await self._apply_new()
        for client_id, key, device_gone in self.sessions.rechecks.take(self._now()):
            if device_gone:
                self.sessions.device_removed(client_id)
            else:
                await self._apply_key(key, [client_id])

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    async def _apply(self, kind: str, subject: str) -> None:
        rechecks = self.sessions.rechecks
        if kind == "device_deleted":
            rechecks.applied(subject, self._now(), device=True)
            self.sessions.device_removed(subject)
            return
        if kind == "app_deleted":
            self.sessions.app_removed(subject)
            return
        if kind == "kick":
            self.sessions.kick(subject, "operator_kick")
            return
        rechecks.applied(subject, self._now())
        # A key change: re-read the key once for all its sessions.
        client_ids = self.sessions.sessions_of_key(subject)
        if client_ids:
            await self._apply_key(subject, client_ids)

    async def _apply_key(self, subject: str, client_ids: list[str]) -> None:
        # key_status / key_expiry / key_updated / key_deleted: the key as it is now decides.
        key = (await self.keystore.keys_by_id([subject])).get(subject)
        now = datetime.now(UTC)
        for client_id in client_ids:
            if key is None:
                self.sessions.kick(client_id, "key_deleted")
            elif key.status.value != "active":
                self.sessions.kick(client_id, "key_inactive")
            elif key.is_expired(now):
                self.sessions.kick(client_id, "key_expired")
            else:
                self._regrant(client_id, key)

    def _regrant(self, client_id: str, key: AccessKey) -> None:
        """The key changed but still admits the session: it keeps its scope (fixed at
        CONNECT), and gets the key's current topic lists and expiry; a session whose
        address the key no longer allows is disconnected."""
        session = self.sessions.get(client_id)
        grant = session.grant if session is not None else None
        if session is None or grant is None:
            return
        if not policy.check_key_address(key, session.conn.client_ip).allowed:
            self.sessions.kick(client_id, "ip_denied")
            return
        old = grant.policy
        new = Grant(key=key, policy=SessionPolicy.build(key, old.scope, old.device_prefix))
        self.sessions.regrant(session, new)


class StatusRecorder(Periodic):
    """Batches status writes: devices' connected/last_seen and keys' last used."""

    name = "keybroker-status-recorder"

    def __init__(self, keystore: KeyStore, interval: float = 1.0) -> None:
        super().__init__(interval)
        self.keystore = keystore
        self._devices: dict[str, tuple[bool, datetime]] = {}
        self._keys: dict[str, datetime] = {}

    def session_started(self, device_id: str, grant: Grant) -> None:
        now = datetime.now(UTC)
        self._devices[device_id] = (True, now)
        self._keys[grant.key.key] = now

    def key_used(self, key: str) -> None:
        """A key authenticated a connection elsewhere (keybroker.authsvc): its last use."""
        self._keys[key] = datetime.now(UTC)

    def session_ended(self, device_id: str) -> None:
        self._devices[device_id] = (False, datetime.now(UTC))

    async def start(self) -> None:
        self.start_ticking()

    async def stop(self) -> None:
        await self.stop_ticking()
        await self.flush()

    async def tick(self) -> None:
        await self.flush()

    async def flush(self) -> None:
        devices, self._devices = self._devices, {}
        keys, self._keys = self._keys, {}
        # One timestamp per batch: status is precise to the flush interval, by design.
        try:
            for state in (True, False):
                ids = [d for d, (up, _) in devices.items() if up is state]
                if ids:
                    await self.keystore.set_devices_connected(
                        ids, state, max(devices[d][1] for d in ids))
            if keys:
                await self.keystore.mark_keys_used(list(keys), max(keys.values()))
        except Exception:
            # Put back what was not written; newer updates win.
            for device, value in devices.items():
                self._devices.setdefault(device, value)
            for key, when in keys.items():
                self._keys.setdefault(key, when)
            raise
