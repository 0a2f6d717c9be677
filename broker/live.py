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
* Expiry of a connected key is a heap of (expires_at, client id, grant) checked on the
  same tick, so a key expiring while connected is kicked within one interval.
* ``StatusRecorder`` batches device connected/last-seen and key last-used writes and
  flushes them once per interval, so CONNECT never waits on a write.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from broker import policy
from broker.mqtt.session import Grant
from broker.periodic import Periodic
from broker.policy import SessionPolicy
from broker.sessions import SessionRegistry
from keystore import KeyStore
from keystore.errors import UnavailableError
from keystore.models import AccessKey, Change

logger = logging.getLogger(__name__)

FEED_PAGE = 10_000
RECENT = 60.0  # seconds a processed change is remembered for CONNECTs in flight
DEVICE = "\x00device:"  # prefix for device entries in _applied (a key never has a NUL)


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
                 interval: float = 0.25) -> None:
        super().__init__(keystore, interval)
        self.sessions = sessions
        self._expiries: list[tuple[float, int, str, Grant]] = []
        self._serial = 0
        self.compact_slack = 1000  # stale heap entries tolerated before compacting
        # When this watcher applied a change to a key (or DEVICE + device id): a CONNECT
        # that read the key before then is re-checked once registered.
        self._applied: dict[str, float] = {}

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

    def session_started(self, client_id: str, grant: Grant, auth_started: float) -> None:
        """A session was registered; ``auth_started`` is when its CONNECT read the key.

        A change applied by this watcher after that moment may have missed the session
        (it was not registered yet): such a session is checked again now."""
        expires = grant.key.expires_at
        if expires is not None:
            self._serial += 1
            heapq.heappush(self._expiries, (expires.timestamp(), self._serial, client_id, grant))
        key_changed = self._applied.get(grant.key.key, -1.0) >= auth_started
        device_gone = self._applied.get(DEVICE + client_id, -1.0) >= auth_started
        if device_gone:
            self.sessions.device_removed(client_id)
        elif key_changed:
            asyncio.get_running_loop().create_task(self._apply_key(grant.key.key, [client_id]))

    async def tick(self) -> None:
        await self._apply_new()
        now = asyncio.get_running_loop().time()
        for name in [n for n, at in self._applied.items() if now - at > RECENT]:
            del self._applied[name]
        await self._expire(datetime.now(UTC).timestamp())

    async def _apply(self, kind: str, subject: str) -> None:
        now = asyncio.get_running_loop().time()
        if kind == "device_deleted":
            self._applied[DEVICE + subject] = now
            self.sessions.device_removed(subject)
            return
        if kind == "app_deleted":
            self.sessions.app_removed(subject)
            return
        if kind == "kick":
            self.sessions.kick(subject, "operator_kick")
            return
        self._applied[subject] = now
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
        self.session_started(client_id, new, float("inf"))  # no re-check: this is one

    def _compact(self) -> None:
        """Drop entries of sessions that ended or were re-granted. Entries are removed
        lazily, so a key far from expiry whose device reconnects often would otherwise
        leave one entry per CONNECT until that (possibly distant) expiry."""
        sessions = self.sessions.sessions
        live = [entry for entry in self._expiries
                if (s := sessions.get(entry[2])) is not None and s.grant is entry[3]]
        heapq.heapify(live)
        self._expiries = live

    async def _expire(self, now: float) -> None:
        if len(self._expiries) > 2 * len(self.sessions) + self.compact_slack:
            self._compact()
        heap = self._expiries
        while heap and heap[0][0] <= now:
            _, _, client_id, grant = heapq.heappop(heap)
            session = self.sessions.get(client_id)
            # Stale entries (session gone, reconnected or re-granted) are skipped.
            if session is not None and session.grant is grant:
                self.sessions.kick(client_id, "key_expired")


class StatusRecorder(Periodic):
    """Batches status writes: devices' connected/last_seen and keys' last used."""

    name = "keybroker-status-recorder"

    def __init__(self, keystore: KeyStore, interval: float = 1.0) -> None:
        super().__init__(interval)
        self.keystore = keystore
        self._devices: dict[str, tuple[bool, datetime]] = {}
        self._keys: dict[str, datetime] = {}

    def session_started(self, device_id: str, grant: Grant, _auth_started: float) -> None:
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
