"""A saved broker state comes back before the listeners open (docs/persistence.md#start).

* Retained messages return within the quotas in force; those of an application deleted
  meanwhile do not.
* Persistent sessions return offline, with their subscriptions (options and shared
  groups included) and their messages in order (in flight first, with their packet ids),
  within the bounds in force, each under a grant rebuilt from its key as the keystore
  has it now, so deliveries while it is offline are checked as before the restart; the
  next CONNECT re-checks it as always. A session is dropped instead when its key is
  gone, inactive or expired, its application is gone, its key no longer covers its
  device, or it has been offline longer than its expiry (an MQTT 5 session's own
  interval, within the server's ``session_expiry`` in force now; else that).
* MQTT 5 messages keep their properties and subscription identifiers; one whose Message
  Expiry passed while the daemon was down is not restored (retained, or waiting to be
  sent; one in flight had its delivery started, and is re-sent as on any resume).
* Devices and applications removed while the daemon was down are in the keystore's
  change feed after the position the state was saved at: the change watcher applies
  them (``ChangeWatcher.catch_up``) before the listeners open, with the same rules as
  when the daemon runs. A keystore whose feed is behind that position (another keystore
  file) cannot tell, so then every device the state names is looked up instead.

Whatever is not restored is marked removed, so the next flush deletes it from the store.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from broker.core.settings import Settings
from broker.mqtt.outbox import MessageProps, OutMessage
from broker.mqtt.routing import Router
from broker.mqtt.session import ConnectionInfo, Grant, KeySession, session_expiry
from broker.mqtt.sessions import SessionRegistry
from broker.policy import SessionPolicy
from broker.state.model import Snapshot, StoredSession, ids_of
from broker.state.recorder import StateRecorder
from broker.state.sqlite import SqliteStateStore
from broker.state.store import StateStore, state_file
from broker.topics import device_of
from broker.topics.mounts import mount_of
from keystore import KeyStore
from keystore.models import AccessKey

logger = logging.getLogger(__name__)

PREFETCH = 256  # scope lookups in flight at once while restoring
NEVER = 0xFFFFFFFF  # the Session Expiry Interval that asks for never (MQTT 5 §3.1.2.11.2)


async def open_store(settings: Settings) -> StateStore:
    """The configured store, opened and checked (StateError when it cannot be used)."""
    return await SqliteStateStore.open(state_file(settings), sync=settings.persistence_sync)


async def load_state(settings: Settings,
                     position: Callable[[], int]) -> tuple[StateRecorder, Snapshot]:
    """Open the store and read it whole; the recorder that will write to it (not started).
    ``position()`` is the change watcher's (see StateRecorder)."""
    store = await open_store(settings)
    try:
        snapshot = await store.load()
    except BaseException:
        await store.close()
        raise
    recorder = StateRecorder(store, interval=settings.flush_interval,
                             sync=settings.persistence_sync, position=position,
                             saved_position=snapshot.position)
    return recorder, snapshot


class _Restore:
    def __init__(self, keystore: KeyStore, router: Router, registry: SessionRegistry,
                 recorder: StateRecorder, settings: Settings) -> None:
        self.keystore = keystore
        self.router = router
        self.registry = registry
        self.recorder = recorder
        self.settings = settings
        self.dropped: Counter[str] = Counter()
        self._policies: dict[str, tuple[frozenset[str] | None, SessionPolicy]] = {}
        # One MessageProps per published message, as the engine shares it between copies.
        self._props: dict[tuple[bytes, float | None], MessageProps] = {}

    def retained(self, snapshot: Snapshot, apps: set[str], now: float) -> None:
        for row in snapshot.retained:
            props = self._message_props(row.props, row.expires)
            if row.mount not in apps:
                self.dropped["retained: app_deleted"] += 1
            elif props is not None and props.expired(now):
                self.dropped["retained: expired"] += 1
            elif self.router.retained.restore(row.mount, row.topic, row.payload, row.qos,
                                              row.bucket, props):
                continue
            else:
                self.dropped["retained: over quota"] += 1
            self.recorder.retained_changed(row.mount, row.topic, None)

    def _message_props(self, forward: bytes | None, expires: float | None
                       ) -> MessageProps | None:
        if forward is None:
            return None
        props = self._props.get((forward, expires))
        if props is None:
            props = self._props[(forward, expires)] = MessageProps(forward, expires)
        return props

    async def session(self, stored: StoredSession, key: AccessKey | None, apps: set[str],
                      now: float) -> KeySession | None:
        """The saved session back, offline, under its key as it is now; None: dropped."""
        row = stored.row
        reason = self._refusal(row.mount, key, apps, now)
        if reason is None and row.expiry == 0:  # it ended with the connection a crash cut
            reason = "session_expired"
        if key is not None and reason is None:
            scope, policy = await self._policy(key)
            if scope is None or row.client_id in scope:
                return self._install(stored, Grant(key, policy), now)
            reason = "device_not_in_scope"  # removed, or its tags changed
        self.dropped[f"sessions: {reason}"] += 1
        self.recorder.journal(row.client_id).dropped()
        return None

    def _install(self, stored: StoredSession, grant: Grant, now: float) -> KeySession:
        row = stored.row
        journal = self.recorder.journal(row.client_id)
        session = KeySession(row.client_id, False,
                             ConnectionInfo(row.listener, row.peer_ip, row.client_ip), journal)
        session.grant = grant
        session.mount = row.mount
        pending = set(ids_of(row.inflight_in))
        session.inflight_in = pending or None
        session.restored_in = frozenset(pending)
        session.disconnected_at = row.disconnected_at
        session.expiry = self._expiry(row.expiry)
        if session.disconnected_at is None:  # online when the daemon died: offline since now
            session.disconnected_at = now
            journal.saved(session)
        elif session.expiry != row.expiry:  # shortened by the maximum in force
            journal.saved(session)
        self.registry.restored(session)
        if self.router.restore_subscriptions(session, stored.subscriptions):
            self.dropped["subscriptions: over max_subscriptions"] += 1
        for saved in stored.messages:
            message = OutMessage(saved.topic, saved.payload, saved.qos, saved.retain,
                                 self._message_props(saved.props, saved.expires),
                                 ids_of(saved.sub_ids) if saved.sub_ids else (), saved.share)
            message.packet_id, message.released = saved.packet_id, saved.released
            message.seq, message.stored = saved.seq, True
            if not message.packet_id and message.props is not None and message.props.expired(now):
                self.dropped["messages: expired"] += 1
                journal.message_removed(message)
            elif not self.router.restore_message(session, message):
                self.dropped["messages: over max_queued_messages or max_session_bytes"] += 1
                journal.message_removed(message)
        return session

    def _expiry(self, saved: float | None) -> float | None:
        """A saved MQTT 5 Session Expiry Interval within the server's maximum in force
        now (None: an MQTT 3.1.1 session, under ``session_expiry`` itself)."""
        if saved is None:
            return None
        requested = NEVER if math.isinf(saved) else int(saved)
        return session_expiry(requested, self.settings.session_expiry)

    @staticmethod
    def _refusal(mount: str, key: AccessKey | None, apps: set[str], now: float) -> str | None:
        """Why the keystore as it is now no longer admits a session of this key."""
        if mount not in apps:
            return "app_deleted"
        if key is None or mount_of(key.app_id) != mount:
            return "key_deleted"
        if key.status.value != "active":
            return "key_inactive"
        if key.is_expired(datetime.fromtimestamp(now, UTC)):
            return "key_expired"
        return None

    async def prefetch(self, keys: Iterable[AccessKey]) -> None:
        """Resolve the scopes of ``keys`` ``PREFETCH`` at a time: the keystore answers a
        batch back to back instead of one round trip per session (18,000 devices with a
        key each restore in a fraction of the time)."""
        pending = list({key.key: key for key in keys if key.key not in self._policies}.values())
        for start in range(0, len(pending), PREFETCH):
            chunk = pending[start:start + PREFETCH]
            scopes = await asyncio.gather(*(self.keystore.resolve_scope(k) for k in chunk))
            for key, scope in zip(chunk, scopes, strict=True):
                self._remember(key, scope)

    def admits(self, key: AccessKey, apps: set[str], now: float) -> bool:
        return self._refusal(mount_of(key.app_id), key, apps, now) is None

    async def _policy(self, key: AccessKey) -> tuple[frozenset[str] | None, SessionPolicy]:
        """The key's scope now and its session policy, once per key."""
        known = self._policies.get(key.key)
        if known is None:  # not prefetched
            known = self._remember(key, await self.keystore.resolve_scope(key))
        return known

    def _remember(self, key: AccessKey, scope: frozenset[str] | None
                  ) -> tuple[frozenset[str] | None, SessionPolicy]:
        known = scope, SessionPolicy.build(key, scope, self.settings.device_prefix)
        self._policies[key.key] = known
        return known

    async def check_devices(self) -> int:
        """Look up every device the restored state names (when the change feed cannot
        tell what was removed): a device gone takes its session and retained messages."""
        prefix = self.settings.device_prefix
        named: dict[str, str] = {}  # device id -> application id
        for session in self.registry.sessions.values():
            if session.grant is not None:
                named[session.client_id] = session.grant.key.app_id
        for mounted, message in self.router.retained.store.items():
            device = device_of(message.topic, prefix)
            if device:
                named.setdefault(device, mounted[:len(mounted) - len(message.topic) - 1])
        gone = [device for device, app in named.items()
                if not await self.keystore.device_exists(device, app=app)]
        for device in gone:
            self.registry.device_removed(device)
        return len(gone)


async def _pruned_after(keystore: KeyStore, position: int, latest: int) -> bool:
    """Are changes after ``position`` missing from the feed? (Another process pruned it
    while this daemon was down; on PostgreSQL a rolled-back change also leaves a gap in
    the ids, which costs a needless look-up, never a missed removal.)"""
    if latest <= position:
        return False
    first = await keystore.changes_since(position, limit=1)
    return not first or first[0].id > position + 1


async def restore(snapshot: Snapshot, keystore: KeyStore, router: Router,
                  registry: SessionRegistry, recorder: StateRecorder,
                  settings: Settings) -> int:
    """Put a saved state back into an idle broker; returns the change-feed position the
    change watcher must catch up from (see the module docstring)."""
    started, now = time.perf_counter(), time.time()
    work = _Restore(keystore, router, registry, recorder, settings)
    latest = await keystore.latest_change_id()
    if snapshot.empty:
        return latest
    apps = {mount_of(app.id) for app in await keystore.list_apps()}
    work.retained(snapshot, apps, now)
    keys = await keystore.keys_by_id({stored.row.key for stored in snapshot.sessions})
    await work.prefetch(key for key in keys.values()
                        if work.admits(key, apps, now))
    for stored in snapshot.sessions:
        await work.session(stored, keys.get(stored.row.key), apps, now)
    # Offline for longer than its expiry, also while the daemon was down.
    work.dropped["sessions: session_expired"] += registry.expire(settings.session_expiry, now)
    position = snapshot.position
    if position > latest:
        logger.warning("broker state: saved at change %d of a keystore whose change feed "
                       "ends at %d (another keystore file?): looking up every device",
                       position, latest)
        work.dropped["devices removed"] += await work.check_devices()
        position = latest
    elif await _pruned_after(keystore, position, latest):
        logger.warning("broker state: saved at change %d, but the change feed no longer "
                       "holds the changes after it (pruned while the daemon was down): "
                       "looking up every device", position)
        work.dropped["devices removed"] += await work.check_devices()
    sessions = len(registry.sessions)  # the broker was idle: all of them are restored ones
    messages = sum(len(session.outbox) for session in registry.sessions.values())
    dropped = ", ".join(f"{what} {count}" for what, count in sorted(work.dropped.items())
                        if count)
    logger.info("broker state: restored %d retained messages and %d persistent sessions "
                "(%d queued or unacknowledged messages) from %s in %.2f s; not restored: %s",
                len(router.retained), sessions, messages, recorder.store.location,
                time.perf_counter() - started, dropped or "nothing")
    return position
