"""The session registry: one session per client id, who authenticated it, and the one
place sessions are taken over, kicked, expired and forgotten.

It owns the sessions (the router it builds reads them to deliver; amqtt's broker sees
them as its registry). The change watcher (broker.services.live) talks to the broker
only through this interface: ``sessions_of_key``, ``kick``, ``regrant``,
``device_removed``, ``app_removed``, ``get``, and ``rechecks`` (CONNECTs that raced a
change); observers given to the constructor hear of sessions going online and offline
(the status recorder). A key that expires while its sessions are connected ends them
(``expire_keys``, once a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from broker.core.audit import AuditLog
from broker.core.counters import KICK_CAUSES, Traffic, count_into
from broker.core.settings import Settings
from broker.mqtt import codec, props
from broker.mqtt.flow import FlowControl
from broker.mqtt.keeper import StateKeeper
from broker.mqtt.routing import Router
from broker.mqtt.session import Grant, KeySession, Will
from broker.topics.mounts import mount_of

logger = logging.getLogger(__name__)

TAKE_OVER_WAIT = 2.0  # seconds an old connection gets to end before it is ended by force


# A device's entry in Rechecks (a key id never holds a NUL).
DEVICE = "\x00device:"
RECENT = 60.0  # seconds a change applied is remembered for CONNECTs in flight
# The reason string of an MQTT 5 DISCONNECT that ends a session, by kick cause (or
# take-over).
KICK_TEXT = {"slow_consumer": "slow consumer", "operator_kick": "disconnected by an operator",
             "key_deleted": "key deleted", "key_inactive": "key inactive",
             "key_expired": "key expired", "ip_denied": "address no longer allowed",
             "device_deleted": "device deleted", "app_deleted": "application deleted",
             "taken_over": "session taken over"}


class LiveConnection(Protocol):
    """A session's connection as the registry sees it (broker.mqtt.connection)."""

    def closed(self) -> asyncio.Future[None]:
        """Done once the connection is over."""

    def end_now(self) -> None:
        """Drop it and end it at once."""


class SessionObserver(Protocol):
    def session_started(self, client_id: str, grant: Grant) -> None: ...

    def session_ended(self, client_id: str) -> None: ...


class Rechecks:
    """The keys (and removed devices) the change watcher applied a change to lately, and
    the sessions that went online afterwards with a CONNECT that had read the key before
    it: the watcher checks those again on its next tick."""

    def __init__(self) -> None:
        self._applied: dict[str, float] = {}  # key id, or DEVICE + device id -> loop time
        self.pending: list[tuple[str, str, bool]] = []  # (client id, key id, device gone)

    def applied(self, subject: str, now: float, device: bool = False) -> None:
        self._applied[DEVICE + subject if device else subject] = now

    def went_online(self, client_id: str, key: str, auth_started: float) -> None:
        if self._applied.get(DEVICE + client_id, -1.0) >= auth_started:
            self.pending.append((client_id, key, True))
        elif self._applied.get(key, -1.0) >= auth_started:
            self.pending.append((client_id, key, False))

    def take(self, now: float) -> list[tuple[str, str, bool]]:
        """The sessions to check again; changes older than RECENT are forgotten."""
        for name in [n for n, at in self._applied.items() if now - at > RECENT]:
            del self._applied[name]
        pending, self.pending = self.pending, []
        return pending


class SessionRegistry:
    def __init__(self, settings: Settings, audit: AuditLog, flow: FlowControl,
                 state: StateKeeper | None = None, traffic: Traffic | None = None,
                 observers: Sequence[SessionObserver] = ()) -> None:
        self.sessions: dict[str, KeySession] = {}
        self.router = Router(settings, self.sessions, audit, flow, state, traffic)
        self.audit = audit
        self.observers = tuple(observers)
        self.rechecks = Rechecks()
        self.by_key: dict[str, set[str]] = {}  # key -> client ids it authenticated
        self.live: dict[str, LiveConnection] = {}  # client id -> its connection
        self._connect_locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self.kicks: dict[str, int] = {}  # by cause (broker.services.metrics.KICK_CAUSES)
        # (expires at, serial, client id, grant) of live sessions whose key expires;
        # stale entries (session gone, re-granted) are skipped, and compacted away.
        self._expiries: list[tuple[float, int, str, Grant]] = []
        self._serial = 0
        self.compact_slack = 1000  # stale entries tolerated before compacting
        # Wills waiting their delay: client id -> (timer, session, Will, how to publish)
        self._wills: dict[str, tuple[asyncio.TimerHandle, KeySession, Will,
                                     Callable[[KeySession, Will], None]]] = {}
        self.reason_strings = settings.reason_strings

    def __len__(self) -> int:
        return len(self.sessions)

    def get(self, client_id: str) -> KeySession | None:
        return self.sessions.get(client_id)

    # ------------------------------------------------------------------ CONNECT
    @contextlib.asynccontextmanager
    async def connect_lock(self, client_id: str) -> AsyncIterator[None]:
        """One CONNECT per client id at a time: two racing CONNECTs must not both pass the
        "is the old one gone" check (one of them would end up registered nowhere)."""
        lock, users = self._connect_locks.get(client_id, (asyncio.Lock(), 0))
        self._connect_locks[client_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._connect_locks[client_id]
            if users <= 1:
                del self._connect_locks[client_id]
            else:
                self._connect_locks[client_id] = (lock, users - 1)

    async def take_over(self, incoming: KeySession) -> KeySession:
        """End a live connection with the same client id, then pick the session to use:
        the stored persistent session (resumed under the new connection's credentials and
        grant) or ``incoming``. The old connection has ended (or was ended by force)
        before this returns, so it can never mark the returned session offline later."""
        client_id = incoming.client_id
        existing = self.sessions.get(client_id)
        if existing is not None and existing.link is not None:
            logger.info("client %s connected again: taking over the old connection", client_id)
            if existing.version == 5:
                existing.link.end(codec.disconnect5(props.SESSION_TAKEN_OVER,
                                                    self._reason(existing, "taken_over")))
            else:
                existing.link.abort()
            await self._wait_ended(client_id)
        self._cancel_will(client_id)  # a Will waiting its delay is not sent (MQTT-3.1.3-9)
        existing = self.sessions.get(client_id)
        if incoming.clean_start or existing is None or existing.clean_session:
            if existing is not None:
                self.drop(existing)
            incoming.present = False
            return incoming
        session = existing
        if incoming.grant is not None:
            self.router.rekeyed(session, incoming.grant.key.key)
        session.conn, session.grant, session.will = incoming.conn, incoming.grant, incoming.will
        session.mount = incoming.mount
        session.keep_alive = incoming.keep_alive
        session.auth_started = incoming.auth_started
        session.version, session.limits = incoming.version, incoming.limits
        session.expiry, session.clean_session = incoming.expiry, incoming.clean_session
        session.kicked = None
        session.suppress_will = False
        session.present = True
        return session

    async def _wait_ended(self, client_id: str) -> None:
        connection = self.live.get(client_id)
        if connection is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(connection.closed()), TAKE_OVER_WAIT)
        except TimeoutError:  # its peer takes nothing (not even the close): end it now
            connection.end_now()

    def went_online(self, session: KeySession, connection: LiveConnection) -> None:
        client_id = session.client_id
        self.sessions[client_id] = session
        if session.journal is not None:
            session.journal.saved(session)
        self.live[client_id] = connection
        grant = session.grant
        if grant is not None:
            self.by_key.setdefault(grant.key.key, set()).add(client_id)
            self._expires(client_id, grant)
            self.rechecks.went_online(client_id, grant.key.key, session.auth_started)
            for observer in self.observers:
                observer.session_started(client_id, grant)

    def went_offline(self, session: KeySession, connection: LiveConnection) -> None:
        """The session's connection ended: a clean session is forgotten, a persistent one
        is kept (until it expires) with its subscriptions and queued messages."""
        client_id = session.client_id
        if self.live.get(client_id) is connection:
            del self.live[client_id]
        session.link = None
        self.router.flow.release(session)  # offline sessions make nobody wait
        session.disconnected_at = time.time()
        if not session.clean_session:
            self.router.went_offline(session)
            if session.journal is not None:
                session.journal.saved(session)
        if session.grant is not None:
            self._unindex(session.grant.key.key, client_id)
        for observer in self.observers:
            observer.session_ended(client_id)
        if session.clean_session:
            self.drop(session)

    def regrant(self, session: KeySession, grant: Grant) -> None:
        """Give a live session a new grant (its key changed); what it queued and may no
        longer read is dropped (every later delivery is checked against the new grant)."""
        session.grant = grant
        self._expires(session.client_id, grant)
        self.router.regranted(session)

    # ------------------------------------------------------------------ key expiry
    def _expires(self, client_id: str, grant: Grant) -> None:
        expires = grant.key.expires_at
        if expires is not None:
            self._serial += 1
            heapq.heappush(self._expiries, (expires.timestamp(), self._serial, client_id, grant))

    def expire_keys(self, now: float) -> int:
        """End the live sessions whose key has expired by ``now`` (wall clock); how many."""
        if len(self._expiries) > 2 * len(self.sessions) + self.compact_slack:
            self._compact_expiries()
        heap, ended = self._expiries, 0
        while heap and heap[0][0] <= now:
            _, _, client_id, grant = heapq.heappop(heap)
            session = self.sessions.get(client_id)
            if session is not None and session.grant is grant:
                ended += self.kick(client_id, "key_expired")
        return ended

    def _compact_expiries(self) -> None:
        """Entries are removed lazily, so a key far from expiry whose device reconnects
        often would otherwise leave one per CONNECT until that (distant) expiry."""
        sessions = self.sessions
        live = [entry for entry in self._expiries
                if (s := sessions.get(entry[2])) is not None and s.grant is entry[3]]
        heapq.heapify(live)
        self._expiries = live

    def restored(self, session: KeySession) -> None:
        """An offline persistent session of a saved state (broker.daemon.restore)."""
        self.sessions[session.client_id] = session

    # ------------------------------------------------------------------ removal
    def drop(self, session: KeySession) -> None:
        """Forget a session and its subscriptions, unless a newer one owns the id (a Will
        still waiting its delay goes now: the session ends)."""
        client_id = session.client_id
        if client_id in self._wills and self._wills[client_id][1] is session:
            self._will_now(client_id)
        if self.sessions.get(client_id) is session:
            del self.sessions[client_id]
        self.router.forget(session)

    def device_removed(self, device_id: str) -> None:
        """A device was deleted from the keystore: its session goes (now if offline, else
        when the kick below ends it) and so do the retained messages on its device topics,
        so a device later added with the same id inherits nothing."""
        session = self.sessions.get(device_id)
        if session is not None:
            session.clean_session = True  # forgotten when its connection ends
            if session.link is None:
                self.drop(session)
            else:
                self.kick(device_id, "device_deleted")
        self.router.retained.drop_device(device_id)

    def app_removed(self, app_id: str) -> None:
        """An application was deleted: its sessions go (its keys' and devices' own
        deletions kick the live ones) and so do its retained messages."""
        mount = mount_of(app_id)
        for session in [s for s in self.sessions.values() if s.mount == mount]:
            session.clean_session = True  # forgotten when its connection ends
            if session.link is None:
                self.drop(session)
            else:
                self.kick(session.client_id, "app_deleted")
        self.router.retained.drop_app(mount)

    def expire(self, default: float, now: float) -> int:
        """Drop persistent sessions offline for longer than their expiry: an MQTT 5
        session's own Session Expiry Interval, else ``default`` seconds (0: never)."""
        doomed = []
        for session in self.sessions.values():
            since = session.disconnected_at
            if session.link is not None or since is None:
                continue
            limit = session.expiry if session.expiry is not None else default
            if limit and now - since > limit:
                doomed.append(session)
        for session in doomed:
            self.drop(session)
        return len(doomed)

    # ------------------------------------------------------------------ Will delay
    def will_due(self, session: KeySession, will: Will,
                 publish: Callable[[KeySession, Will], None]) -> None:
        """A connection ended without DISCONNECT: its Will now, or after its Will Delay
        Interval (MQTT 5) unless the session is resumed first; the Will goes at once if
        the session ends sooner (MQTT-3.1.3-9)."""
        delay: float = will.delay
        if not delay or session.clean_session:
            publish(session, will)
            return
        if session.expiry is not None:
            delay = min(delay, session.expiry)
        handle = asyncio.get_running_loop().call_later(delay, self._will_now, session.client_id)
        self._wills[session.client_id] = (handle, session, will, publish)

    def _will_now(self, client_id: str) -> None:
        pending = self._wills.pop(client_id, None)
        if pending is not None:
            _, session, will, publish = pending
            publish(session, will)

    def _cancel_will(self, client_id: str) -> None:
        pending = self._wills.pop(client_id, None)
        if pending is not None:
            pending[0].cancel()

    def kick(self, client_id: str, reason: str, *, publish_will: bool = False) -> bool:
        """Disconnect a live session now. A revoked session's Will is not published.

        The transport is aborted (not closed politely): a revoked client must not be able
        to send anything more, and a busy or non-reading client must not delay it."""
        session = self.sessions.get(client_id)
        if session is None or session.link is None or session.kicked:
            return False
        session.kicked = reason
        self.router.flow.release(session)
        session.suppress_will = not publish_will
        count_into(self.kicks, reason, KICK_CAUSES)
        self.audit.event("kick", reason=reason, **session.audit_fields())
        if session.version == 5:  # told why; nothing it sends is read any more
            code = props.QUOTA_EXCEEDED if reason == "slow_consumer" else \
                props.ADMINISTRATIVE_ACTION
            session.link.end(codec.disconnect5(code, self._reason(session, reason)))
        else:
            session.link.abort()
        return True

    def _reason(self, session: KeySession, reason: str) -> bytes:
        if not self.reason_strings:
            return b""
        return props.encode([(props.REASON_STRING, KICK_TEXT.get(reason, reason))])

    # ------------------------------------------------------------------ by key
    def sessions_of_key(self, key: str) -> list[str]:
        """Client ids of the online sessions a key authenticated (an index: revocation
        work follows the number of changes, not the number of sessions)."""
        out = []
        for client_id in list(self.by_key.get(key, ())):
            session = self.sessions.get(client_id)
            grant = session.grant if session is not None else None
            if session is not None and grant is not None and grant.key.key == key \
                    and session.link is not None:
                out.append(client_id)
            else:
                self._unindex(key, client_id)
        return out

    def _unindex(self, key: str, client_id: str) -> None:
        clients = self.by_key.get(key)
        if clients is not None:
            clients.discard(client_id)
            if not clients:
                del self.by_key[key]
