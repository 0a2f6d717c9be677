"""KeyBroker: keybroker's subclass of amqtt 0.12.1's Broker, a list of overrides.

amqtt gives the broker's life cycle (start/shutdown, its plugin manager and plugin
configuration, the session monitor and broadcast tasks) and parses CONNECT. Everything
per connection and per message is keybroker's own (docs/architecture.md says why);
each override below says in one line what it changes and delegates.
tests/amqtt_contract pins each hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import websockets
from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker, Server
from amqtt.contexts import ListenerConfig
from amqtt.mqtt.connack import CONNECTION_ACCEPTED, NOT_AUTHORIZED
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session
from websockets.asyncio.server import ServerConnection

from broker.core.audit import AuditLog
from broker.core.counters import Buckets, FlowCounters, Traffic
from broker.core.settings import Settings
from broker.mqtt import codec, props
from broker.mqtt.admission import Admission
from broker.mqtt.connection import NO_INFO, MqttConnection
from broker.mqtt.flow import FlowControl, SlowConsumerSweep
from broker.mqtt.framing import Framer, PacketWatchdog
from broker.mqtt.inbound import Inbound
from broker.mqtt.keeper import StateKeeper
from broker.mqtt.link import WebSocketLink
from broker.mqtt.listeners import ProxyGate, connection_info, start_listener
from broker.mqtt.plugins import AccessKeyAuthPlugin
from broker.mqtt.session import KeySession
from broker.mqtt.sessions import SessionObserver, SessionRegistry
from broker.policy.addresses import TrustedProxies
from broker.policy.guard import BruteForceGuard

logger = logging.getLogger(__name__)

SHUTDOWN_WAIT = 5.0


class KeyBroker(Broker):
    """amqtt Broker with access-key authentication, trie routing and policy checks."""

    def __init__(self, config: dict[str, Any], settings: Settings, audit: AuditLog,
                 guard: BruteForceGuard | None = None,
                 state: StateKeeper | None = None,
                 observers: Sequence[SessionObserver] = ()) -> None:
        super().__init__(config)
        self.settings = settings
        self.audit = audit
        self.guard = guard
        self._trusted = TrustedProxies(settings.trusted_proxies)
        self._gate = ProxyGate(self._trusted, settings, audit)
        self.traffic = Traffic()  # broker.services.metrics: counted where the events happen
        self.connects_accepted = 0
        self.connects_refused: dict[tuple[int, str], int] = {}  # (CONNACK code, reason)
        self.connack_latency = Buckets()
        self.flow_counters = FlowCounters()
        self.flow = FlowControl(settings, self.flow_counters, self._slow_consumer)
        self.registry = SessionRegistry(settings, audit, self.flow, state, self.traffic,
                                        observers)
        self.router = self.registry.router
        self.inbound = Inbound(settings, self.router, audit, state)
        self.admission = Admission(settings, audit, guard, state)
        self._sessions = self.registry.sessions  # amqtt's registry is ours
        self._watchdog = PacketWatchdog()
        self._slow_sweep = SlowConsumerSweep(self.flow)
        self._bound: dict[str, Server] = {}
        self._starting: set[asyncio.Task[None]] = set()  # CONNECTs being authenticated
        auth_plugins = [plugin for plugin in self.plugins_manager.plugins
                        if isinstance(plugin, BaseAuthPlugin)]
        only_ours = len(auth_plugins) == 1 and isinstance(auth_plugins[0], AccessKeyAuthPlugin)
        self._auth: AccessKeyAuthPlugin | None = auth_plugins[0] if only_ours else None

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        """Listeners are bound before amqtt's start(), which would log a bind failure as a
        traceback: a port in use is one KeybrokerError naming the listener. amqtt's start()
        empties its session registry (ours): sessions restored from the broker state are
        put back."""
        bound: dict[str, Server] = {}
        try:
            for listener in self.settings.listeners:
                bound[listener.name] = await start_listener(
                    listener, self.settings, self._stream_connection,
                    self._accept_websocket, self._gate)
        except BaseException:
            for server in bound.values():
                await server.close_instance()
            raise
        self._bound = bound
        restored = dict(self.registry.sessions)
        await super().start()
        for client_id, session in restored.items():
            self.registry.sessions.setdefault(client_id, session)
        self._watchdog.start_ticking()
        self._slow_sweep.start_ticking()

    async def _start_listeners(self) -> None:
        """amqtt's listener start rewrote fields equal to its defaults: ours are bound."""
        self._servers.update(self._bound)

    async def shutdown(self) -> None:
        """Also ends connections that have not completed CONNECT (amqtt knew none)."""
        await self._watchdog.stop_ticking()
        await self._slow_sweep.stop_ticking()
        self.admission.stop()
        for server in self._servers.values():
            server.instance.close()  # no new connections while the others end
        connections = list(self.admission.connections)
        for connection in connections:
            connection.link.abort()
        if self._starting:  # CONNECTs being authenticated: their connections end after
            _, late = await asyncio.wait(self._starting, timeout=SHUTDOWN_WAIT)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=SHUTDOWN_WAIT)
        # An aborted transport ends its connection in the loop's next pass; what is left
        # after that (a WebSocket's task, say) is ended here.
        deadline = asyncio.get_running_loop().time() + SHUTDOWN_WAIT
        while any(not c.over for c in connections) and \
                asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        for connection in connections:
            connection.end_now()
        await super().shutdown()

    async def _cleanup_session(self, client_id: str) -> None:
        """amqtt's shutdown forgets each session. Every connection has ended by then, so
        the sessions left are offline persistent ones: they are kept, not forgotten (the
        broker state saves them for the next start; without it they end with the process)."""

    async def _session_monitor(self) -> None:
        """Once a second: end sessions whose key expired, expire offline persistent
        sessions, report ended bans, write the counts of suppressed audit lines."""
        while True:
            await asyncio.sleep(1)
            try:
                now = time.time()
                self.registry.expire_keys(now)
                self.registry.expire(self.settings.session_expiry, now)
                self.audit.ended_bans(self.guard)
                self.audit.flush_suppressed()
                self.admission.flush_log()
            except Exception:
                logger.exception("session monitor failed; continuing")

    @property
    def auth_plugin(self) -> AccessKeyAuthPlugin | None:
        return self._auth

    def bound_addresses(self) -> dict[str, list[tuple[str, int]]]:
        """Listener name -> the (host, port) pairs it is bound to (port 0 resolved)."""
        return {name: [sock.getsockname()[:2]
                       for sock in getattr(server.instance, "sockets", None) or ()]
                for name, server in self._servers.items()}

    @property
    def sessions(self) -> dict[str, KeySession]:
        return self.registry.sessions

    @property
    def subscriptions(self) -> dict[str, list[tuple[KeySession, int]]]:
        """amqtt's view (filter -> [(session, qos)]), rebuilt from the trie; not a hot path."""
        view: dict[str, list[tuple[KeySession, int]]] = {}
        for session in self.registry.sessions.values():
            for topic_filter, qos in self.router.filters_of(session).items():
                view.setdefault(topic_filter, []).append((session, qos))
        return view

    # ------------------------------------------------------------------ connections
    async def _client_connected(self, listener_name: str, reader: ReaderAdapter,
                                writer: WriterAdapter) -> None:
        """amqtt's own connection path (its external listener API) is not served."""
        logger.warning("connection from amqtt's external listener API refused")
        with contextlib.suppress(Exception):
            await writer.close()

    def _stream_connection(self, listener_name: str, proxied: str | None) -> MqttConnection:
        """The protocol of a new TCP or TLS connection (``proxied``: the client IP a
        trusted proxy's PROXY header gave)."""
        return MqttConnection(self, listener_name, proxied)

    async def _accept_websocket(self, websocket: ServerConnection, listener_name: str) -> None:
        """One WebSocket connection: its messages are fed to the connection as a TCP
        transport feeds it (MQTT over WebSocket may split or join packets across them)."""
        request = websocket.request
        forwarded = request.headers.get_all("X-Forwarded-For") if request is not None else []
        connection = MqttConnection(self, listener_name)
        connection.link = link = WebSocketLink(websocket)
        connection.reading = reading = WebSocketReading()
        info = connection_info(listener_name, link.peer(), self._trusted, forwarded=forwarded)
        if info is None:
            link.abort()
            return
        connection.info = info
        if not self.opened(connection):
            link.abort()
            return
        try:
            async for message in websocket:
                if isinstance(message, str):  # MQTT travels in binary messages only
                    break
                connection.data_received(message)
                if connection.over:
                    break
                if reading.paused:
                    await reading.resumed(connection)
        except (websockets.exceptions.ConnectionClosed, ConnectionError, OSError):
            pass
        finally:
            connection.connection_lost(None)  # no half-closed WebSocket: this is its end
            if connection.starting:  # the CONNECT's task ends it when done
                await connection.closed()
            await link.close()

    def opened(self, connection: MqttConnection) -> bool:
        """A new connection: admitted (counted, its framer watched), or False."""
        info = connection.info
        if info is NO_INFO:
            found = connection_info(connection.listener, connection.link.peer(),
                                    self._trusted, proxied=connection.proxied)
            if found is None:
                return False
            connection.info = info = found
        if self.admission.admit(info) is not None:
            return False
        settings = self.settings
        connection.framer = Framer(
            max_packet_size=settings.max_packet_size, packet_timeout=settings.packet_timeout,
            idle_limit=settings.connect_timeout,
            on_violation=partial(self.admission.packet_violation, connection),
            on_expire=connection.expired)
        self.admission.opened(connection)
        self._watchdog.framers.add(connection.framer)
        return True

    def connect_packet(self, connection: MqttConnection, first: int,
                       body: bytes) -> KeySession | None:
        return self.admission.connect_packet(connection, first, body)

    def authenticate(self, connection: MqttConnection, incoming: KeySession) -> None:
        task = asyncio.ensure_future(self._start_session(connection, incoming))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _start_session(self, connection: MqttConnection, incoming: KeySession) -> None:
        session = None
        try:
            session = await self._take_session(connection, incoming)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one client's bytes never kill the daemon
            logger.exception("connection on %s ended with an internal error",
                             connection.listener)
            connection.link.abort()
        finally:
            connection.started(session)

    async def _take_session(self, connection: MqttConnection,
                            incoming: KeySession) -> KeySession | None:
        """Authenticate first, then take over: a refused CONNECT never touches a session.
        The session the connection serves, CONNACK written; None when refused (told so)."""
        link = connection.link
        incoming.auth_started = asyncio.get_running_loop().time()
        accepted = await self._authenticate(incoming, ListenerConfig(bind=None))
        incoming.username = incoming.password = None  # the secret is not kept
        loop = asyncio.get_running_loop()
        v5 = incoming.version == 5
        if not accepted or not incoming.client_id:
            refusal = incoming.refusal
            code = refusal.connack if refusal else NOT_AUTHORIZED
            reason = refusal.reason if refusal else "no_client_id"
            if v5:
                code = connack5_code(reason, code)
                link.write(codec.connack5(False, code,
                                          self.inbound.reason_props(incoming, reason)
                                          or props.EMPTY))
            else:
                link.write(codec.connack_packet(False, code))
            self.connack_latency.observe(loop.time() - incoming.auth_started)
            counted = (code, reason)
            self.connects_refused[counted] = self.connects_refused.get(counted, 0) + 1
            self.admission.connack_sent(incoming.version, code)
            self.admission.refused(connection.info, incoming.client_id,
                                   refusal.key if refusal else None, *counted)
            return None
        async with self.registry.connect_lock(incoming.client_id):
            session = await self.registry.take_over(incoming)
            session.link = link
            self.registry.went_online(session, connection)
            if v5:
                limits = session.limits
                assert limits is not None
                link.write(codec.connack5(session.present, 0, limits.connack))
                limits.connack = b""
            else:
                link.write(codec.connack_packet(session.present, CONNECTION_ACCEPTED))
            self.connack_latency.observe(loop.time() - incoming.auth_started)
            self.connects_accepted += 1
            self.admission.connack_sent(session.version, 0)
            self.router.resume(session)
        return session

    def ended(self, connection: MqttConnection) -> None:
        """The connection is over: its session goes offline (its Will due, unless the
        client said goodbye), and it is counted no more."""
        session = connection.session
        try:
            if session is not None and session.link is connection.link:  # not taken over
                will = session.will
                if not connection.clean_exit and will is not None and not session.suppress_will:
                    self.registry.will_due(session, will, self.inbound.publish_will)
                self.registry.went_offline(session, connection)
            elif not connection.connect_read:
                self.admission.no_connect(connection)
        finally:
            self.admission.closed(connection)
            if connection.framer is not None:
                self._watchdog.framers.discard(connection.framer)

    async def _authenticate(self, session: Session, _: ListenerConfig) -> bool:
        """Our plugin is called directly when it is the only one (amqtt: a task per plugin
        and a gather per CONNECT); a failing plugin refuses, never crashes."""
        try:
            if self._auth is not None:
                return bool(await self._auth.authenticate(session=session))
            return bool(await super()._authenticate(session, _))
        except Exception:
            logger.exception("auth plugin failed")
            return False

    def _slow_consumer(self, client_id: str) -> None:
        self.registry.kick(client_id, "slow_consumer", publish_will=True)

    # ------------------------------------------------------------------ amqtt entry points
    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        """amqtt's internal publishing (plugins, $SYS) names no application: every topic
        belongs to one, so nothing is routed (keybroker's own code never calls this)."""
        logger.warning("amqtt internal publish on %r dropped: no application", topic)

    async def _run_broadcast(self, running_tasks: Any) -> None:
        """Only what amqtt's own code puts on its queue (nothing, in keybroker): dropped."""
        broadcast = await self._broadcast_queue.get()
        logger.warning("amqtt broadcast on %r dropped: no application", broadcast.get("topic"))

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        """amqtt's plugin API for retaining: for a keybroker session, with its quotas and
        in its application; anything else names no application and is not kept."""
        if topic_name is not None and isinstance(source_session, KeySession):
            self.inbound.retain(source_session, topic_name, bytes(data or b""), qos or 0)

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """amqtt's plugin API for subscribing: checked like a SUBSCRIBE."""
        if not isinstance(session, KeySession):
            return codec.SUBACK_FAILURE
        topic_filter, qos = subscription
        codes, _ = self.router.subscribe(
            session, [codec.Subscription(topic_filter, qos, False, False, 0)],
            self.inbound.subscribe_refusal)
        return min(codes[0], codec.SUBACK_FAILURE)


# MQTT 5 CONNACK reason codes of the refusals (docs/mqtt5.md): a wrong secret and an
# unknown key alike, so neither tells a key exists.
CONNACK5 = {"bad_credentials": props.BAD_USERNAME_OR_PASSWORD,
            "no_credentials": props.BAD_USERNAME_OR_PASSWORD, "banned": props.BANNED,
            "no_client_id": props.CLIENT_ID_NOT_VALID,
            "keystore_unavailable": props.SERVER_UNAVAILABLE}


def connack5_code(reason: str, v3_code: int) -> int:
    """The MQTT 5 CONNACK code of a refusal: its own, or 0x87 Not authorized for every
    rule of the key (inactive, expired, not a device, out of scope, address, Will)."""
    code = CONNACK5.get(reason)
    if code is not None:
        return code
    if v3_code == 3:  # server unavailable (the keystore does not answer)
        return props.SERVER_UNAVAILABLE
    if v3_code == 4:
        return props.BAD_USERNAME_OR_PASSWORD
    return props.NOT_AUTHORIZED


class WebSocketReading:
    """How a WebSocket connection stops reading: its task waits before the next message."""

    __slots__ = ("paused", "_resumed")

    def __init__(self) -> None:
        self.paused = False
        self._resumed: asyncio.Future[None] | None = None

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        waiter, self._resumed = self._resumed, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def resumed(self, connection: MqttConnection) -> None:
        """Until reading resumes or the connection is over."""
        while self.paused and not connection.over:
            if self._resumed is None:
                self._resumed = asyncio.get_running_loop().create_future()
            # looked at again now and then: the connection may end while paused
            await asyncio.wait((self._resumed,), timeout=1.0)
