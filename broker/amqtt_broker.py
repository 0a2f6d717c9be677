"""KeyBroker: keybroker's subclass of amqtt 0.12.1's Broker.

amqtt gives the broker's life cycle (start/shutdown, its plugin manager and plugin
configuration, the session monitor and broadcast tasks) and parses CONNECT. Everything
per connection and per message is keybroker's own, because amqtt's was unsafe or slow
there (tests/test_broker_hooks.py pins each hook below):

* ``_start_listeners``: listeners are started by broker.listeners (amqtt rewrote fields
  equal to its defaults and passed no headers or trust settings on).
* ``_client_connected``: amqtt's connection path, reachable only through its external
  listener API, refuses; connections are served by ``_serve_client``.
* CONNECT (``_serve_client``): amqtt took over or deleted an existing session
  *before* authenticating (a wrong password with a victim's client id wiped the victim),
  registered refused sessions and always answered CONNACK 5. Here: authenticate first,
  refuse with the plugin's CONNACK code without touching any session, then take over.
* After CONNECT a connection is a ``broker.connection.MqttConnection``: one task reading
  whole packets and handling each synchronously, instead of amqtt's reader task, task per
  packet and task + 5 s timeout per QoS 1/2 message (which lost the message and did not
  re-send on resume). QoS state is plain data on the session (broker.outbox).
* ``_session_monitor``: expires disconnected persistent sessions.
* ``retain_message``, ``_broadcast_message``, ``_run_broadcast``, ``add_subscription``:
  amqtt's entry points for plugins, routed through broker.routing (a subscription trie and
  a per-delivery policy check instead of scanning every filter per message).
* ``_authenticate``: keybroker's auth plugin is called directly when it is the only one.
* ``shutdown``: also ends connections that have not completed CONNECT.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from typing import Any

from amqtt.adapters import (
    BufferReader,
    ReaderAdapter,
    StreamReaderAdapter,
    WebSocketsReader,
    WriterAdapter,
)
from amqtt.broker import Broker, Server
from amqtt.contexts import Action, ListenerConfig
from amqtt.mqtt.connack import (
    BAD_USERNAME_PASSWORD,
    CONNECTION_ACCEPTED,
    IDENTIFIER_REJECTED,
    NOT_AUTHORIZED,
    UNACCEPTABLE_PROTOCOL_VERSION,
)
from amqtt.mqtt.connect import ConnectPacket
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session
from websockets.asyncio.server import ServerConnection

from broker import codec
from broker.audit import AuditLog
from broker.clientip import TrustedProxies
from broker.connection import MqttConnection
from broker.framing import FramedReader, PacketError, PacketWatchdog
from broker.guard import BruteForceGuard, source_of
from broker.link import Link, StreamLink, WebSocketLink
from broker.listeners import ProxyGate, connection_info, start_listener
from broker.plugins import AccessKeyAuthPlugin, ConnectionInfo, audit_fields, decide
from broker.routing import Router
from broker.session import KeySession, Will
from broker.sessions import SessionRegistry
from broker.settings import Settings
from broker.topics import validate_topic_name
from keystore.errors import ValidationError

logger = logging.getLogger(__name__)

SHUTDOWN_WAIT = 5.0


class Verdict(enum.Enum):
    """What became of an incoming PUBLISH."""

    ACCEPTED = "accepted"
    DROPPED = "dropped"  # denied, acknowledged all the same (denied_publish = "drop")
    CLOSE = "close"  # the connection ends, without acknowledging


class KeyBroker(Broker):
    """amqtt Broker with access-key authentication, trie routing and policy checks."""

    def __init__(self, config: dict[str, Any], settings: Settings, audit: AuditLog,
                 guard: BruteForceGuard | None = None) -> None:
        super().__init__(config)
        self.settings = settings
        self.audit = audit
        self.guard = guard
        self._trusted = TrustedProxies(settings.trusted_proxies)
        self._gate = ProxyGate(self._trusted, settings, audit)
        self.router = Router(settings, {}, audit, self._slow_consumer)
        self.registry = SessionRegistry(self.router, audit)
        self._sessions = self.registry.sessions
        self._watchdog = PacketWatchdog()
        self._bound: dict[str, Server] = {}
        self._connections: set[MqttConnection] = set()  # every open one, CONNECT or not
        self._tasks_of: dict[MqttConnection, asyncio.Task[Any]] = {}
        self._per_source: dict[str, int] = {}  # open connections per source
        self._unauthenticated: dict[str, int] = {}  # of those, before CONNECT is accepted
        auth_plugins = [plugin for plugin in self.plugins_manager.plugins
                        if isinstance(plugin, BaseAuthPlugin)]
        only_ours = len(auth_plugins) == 1 and isinstance(auth_plugins[0], AccessKeyAuthPlugin)
        self._auth: AccessKeyAuthPlugin | None = auth_plugins[0] if only_ours else None

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        # Listeners are bound before amqtt's start(), which would log a bind failure as a
        # traceback: a port in use is one KeybrokerError naming the listener.
        bound: dict[str, Server] = {}
        try:
            for listener in self.settings.listeners:
                bound[listener.name] = await start_listener(
                    listener, self.settings, self._accept_stream, self._accept_websocket,
                    self._gate)
        except BaseException:
            for server in bound.values():
                await server.close_instance()
            raise
        self._bound = bound
        await super().start()
        self._watchdog.start_ticking()

    async def _start_listeners(self) -> None:
        self._servers.update(self._bound)

    async def shutdown(self) -> None:
        await self._watchdog.stop_ticking()
        for server in self._servers.values():
            server.instance.close()  # no new connections while the others end
        for connection in list(self._connections):
            connection.link.abort()
        tasks = [task for task in self._tasks_of.values() if task is not asyncio.current_task()]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=SHUTDOWN_WAIT)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=SHUTDOWN_WAIT)
        await super().shutdown()

    async def _cleanup_session(self, client_id: str) -> None:
        session = self.registry.get(client_id)
        if session is not None:
            self.registry.drop(session)

    def bound_addresses(self) -> dict[str, list[tuple[str, int]]]:
        """Listener name -> the (host, port) pairs it is bound to (port 0 resolved)."""
        out: dict[str, list[tuple[str, int]]] = {}
        for name, server in self._servers.items():
            sockets = getattr(server.instance, "sockets", None) or ()
            out[name] = [sock.getsockname()[:2] for sock in sockets]
        return out

    @property
    def sessions(self) -> dict[str, KeySession]:
        return self.registry.sessions

    @property
    def subscriptions(self) -> dict[str, list[tuple[KeySession, int]]]:
        """amqtt's view (filter -> [(session, qos)]), rebuilt from the trie; not a hot path."""
        view: dict[str, list[tuple[KeySession, int]]] = {}
        for session in self.registry.sessions.values():
            for topic_filter, qos in self.router.subtree.filters_of(session.client_id).items():
                view.setdefault(topic_filter, []).append((session, qos))
        return view

    # ------------------------------------------------------------------ connections
    async def _client_connected(self, listener_name: str, reader: ReaderAdapter,
                                writer: WriterAdapter) -> None:
        """amqtt's own connection path (external listeners): not served, closed at once."""
        logger.warning("connection from amqtt's external listener API refused")
        with contextlib.suppress(Exception):
            await writer.close()

    async def _accept_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             listener_name: str, prefix: bytes = b"",
                             proxied: str | None = None) -> None:
        link = StreamLink(writer)
        info = connection_info(listener_name, link.peer(), self._trusted, proxied=proxied)
        await self._serve_client(listener_name, StreamReaderAdapter(reader), link, info, prefix)

    async def _accept_websocket(self, websocket: ServerConnection, listener_name: str) -> None:
        request = websocket.request
        forwarded = request.headers.get_all("X-Forwarded-For") if request is not None else []
        link = WebSocketLink(websocket)
        info = connection_info(listener_name, link.peer(), self._trusted, forwarded=forwarded)
        await self._serve_client(listener_name, WebSocketsReader(websocket), link, info)

    async def _serve_client(self, listener_name: str, reader: ReaderAdapter, link: Link,
                            info: ConnectionInfo | None, prefix: bytes = b"") -> None:
        if info is None:
            link.abort()
            return
        refusal = self._admission_refusal(info)
        if refusal is not None:
            self.audit.from_source("connect_invalid", client_ip=info.client_ip,
                                   peer_ip=info.peer_ip, listener=listener_name, reason=refusal)
            link.abort()
            return
        source = source_of(info.client_ip)
        self._per_source[source] = self._per_source.get(source, 0) + 1
        self._unauthenticated[source] = self._unauthenticated.get(source, 0) + 1
        connection = MqttConnection(self, link, None, info)  # type: ignore[arg-type]
        connection.reader = FramedReader(
            reader,
            max_packet_size=self.settings.max_packet_size,
            packet_timeout=self.settings.packet_timeout,
            idle_limit=self.settings.connect_timeout,
            prefix=prefix,
            on_violation=lambda error: self._packet_violation(connection, error),
            on_expire=connection.expired,
        )
        self._watchdog.readers.add(connection.reader)
        self._connections.add(connection)
        task = asyncio.current_task()
        if task is not None:
            self._tasks_of[connection] = task
        authenticated = False
        try:
            session = await self._read_connect(connection)
            if session is not None:
                authenticated = True
                self._decrement(self._unauthenticated, source)
                await self._run_session(connection, session)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one client's bytes never kill the daemon
            logger.exception("connection on %s ended with an internal error", listener_name)
        finally:
            if not authenticated:
                self._decrement(self._unauthenticated, source)
            self._decrement(self._per_source, source)
            self._watchdog.readers.discard(connection.reader)
            self._connections.discard(connection)
            self._tasks_of.pop(connection, None)
            await link.close()

    def _packet_violation(self, connection: MqttConnection, error: Exception) -> None:
        session, info = connection.session, connection.info
        if session is not None:
            self.audit.event("bad_packet", reason=str(error), **audit_fields(session))
        else:
            self.audit.from_source("bad_packet", client_ip=info.client_ip,
                                   peer_ip=info.peer_ip, listener=info.listener,
                                   reason=str(error))
            self._failed_before_connect(info)

    def _failed_before_connect(self, info: ConnectionInfo) -> None:
        """A connection that ends without a valid CONNECT (silence, garbage) counts in the
        brute-force guard like a refused CONNECT."""
        if self.guard is None:
            return
        now = time.monotonic()
        until = self.guard.record_failure(info.client_ip, now)
        if until is not None:
            self.audit.event("ban", client_ip=info.client_ip, peer_ip=info.peer_ip,
                             listener=info.listener, reason=f"banned for {until - now:.0f}s")

    def _admission_refusal(self, info: ConnectionInfo) -> str | None:
        settings = self.settings
        if len(self._connections) >= settings.max_connections:
            return "max_connections"
        source = source_of(info.client_ip)
        if settings.max_connections_per_source and \
                self._per_source.get(source, 0) >= settings.max_connections_per_source:
            return "max_connections_per_source"
        if settings.max_unauthenticated_per_source and \
                self._unauthenticated.get(source, 0) >= settings.max_unauthenticated_per_source:
            return "max_unauthenticated_per_source"
        return None

    @staticmethod
    def _decrement(counts: dict[str, int], source: str) -> None:
        left = counts.get(source, 0) - 1
        if left > 0:
            counts[source] = left
        else:
            counts.pop(source, None)

    # ------------------------------------------------------------------ CONNECT
    async def _read_connect(self, connection: MqttConnection) -> KeySession | None:
        """Read and check the CONNECT packet; None when the connection is to end (refused
        with a CONNACK, or invalid: audited)."""
        info, link = connection.info, connection.link

        def invalid(reason: str, event: str = "connect_invalid") -> None:
            logger.info("no valid CONNECT from %s on %s: %s", info.peer_ip, info.listener,
                        reason)
            self.audit.from_source(event, client_ip=info.client_ip, peer_ip=info.peer_ip,
                                   listener=info.listener, reason=reason)
            self._failed_before_connect(info)

        try:
            packet = await connection.reader.packet()
        except PacketError:
            return None  # audited by the reader
        if packet is None:
            if connection.ended_by == "idle":
                invalid("connect_timeout")
            else:  # closed before sending anything: not counted (port checks, probes)
                logger.debug("connection from %s closed before CONNECT", info.peer_ip)
            return None
        first, body = packet
        if first >> 4 != codec.CONNECT:
            invalid(f"packet type {first >> 4} before CONNECT", "bad_packet")
            return None
        try:
            raw = bytes((first,)) + codec.remaining_length(len(body)) + body
            connect = await ConnectPacket.from_stream(BufferReader(raw))
        except Exception as exc:  # noqa: BLE001 - malformed CONNECT
            invalid(type(exc).__name__)
            return None
        header, payload = connect.variable_header, connect.payload
        if header is None or payload is None or connect.proto_name != "MQTT" or \
                header.reserved_flag or (header.will_flag and (
                    payload.will_topic is None or payload.will_message is None)):
            invalid("malformed CONNECT")
            return None
        code = None
        if connect.proto_level != 4:  # only MQTT 3.1.1
            code = UNACCEPTABLE_PROTOCOL_VERSION
        elif (not connect.username_flag and connect.password_flag) or (
                connect.username_flag and connect.username is None) or (
                connect.password_flag and connect.password is None):
            code = BAD_USERNAME_PASSWORD  # [MQTT-3.1.2-22]
        elif not connect.clean_session_flag and payload.client_id_is_random:
            code = IDENTIFIER_REJECTED  # [MQTT-3.1.3-8] [MQTT-3.1.3-9]
        if code is not None:
            invalid(f"CONNACK {code}")
            link.write(codec.connack_packet(False, code))
            return None
        session = KeySession(connect.client_id or "", bool(connect.clean_session_flag), info)
        if header.will_flag and connect.will_topic is not None:
            session.will = Will(connect.will_topic, bytes(connect.will_message or b""),
                                connect.will_qos or 0, bool(connect.will_retain_flag))
        session.username = connect.username
        session.password = connect.password
        session.keep_alive = _effective_keepalive(connect.keep_alive, self.settings)
        return session

    async def _run_session(self, connection: MqttConnection, incoming: KeySession) -> None:
        link = connection.link
        incoming.auth_started = asyncio.get_running_loop().time()
        accepted = await self._authenticate(incoming, ListenerConfig(bind=None))
        incoming.username = incoming.password = None  # the secret is not kept
        if not accepted or not incoming.client_id:
            refusal = incoming.refusal
            link.write(codec.connack_packet(False, refusal.connack if refusal else NOT_AUTHORIZED))
            return
        async with self.registry.connect_lock(incoming.client_id):
            session = await self.registry.take_over(incoming)
            session.connection = connection
            self.registry.went_online(session)
            link.write(codec.connack_packet(session.present, CONNECTION_ACCEPTED))
            connection.reader.idle_limit = session.keep_alive
            self.router.resume(session)
        try:
            await connection.serve(session)
        finally:
            self._connection_ended(connection, session)

    def _connection_ended(self, connection: MqttConnection, session: KeySession) -> None:
        if session.connection is not connection:
            return  # already taken over
        if not connection.clean_exit and session.will is not None and not session.suppress_will:
            self._publish_will(session, session.will)
        self.registry.went_offline(session)

    async def _authenticate(self, session: Session, _: ListenerConfig) -> bool:
        try:
            if self._auth is not None:
                # Our plugin is the only auth plugin: call it directly rather than through
                # amqtt's plugin manager (a task per plugin and a gather per CONNECT).
                return bool(await self._auth.authenticate(session=session))
            return bool(await super()._authenticate(session, _))
        except Exception:
            logger.exception("auth plugin failed")
            return False

    async def _session_monitor(self) -> None:
        """Once a second: expire disconnected persistent sessions (clean ones are dropped
        at disconnect), report bans that ended and audit lines that were suppressed."""
        while True:
            await asyncio.sleep(1)
            try:
                self._housekeeping()
            except Exception:
                logger.exception("session monitor: housekeeping failed; continuing")

    def _housekeeping(self) -> None:
        if self.settings.session_expiry:
            self.registry.expire(self.settings.session_expiry, time.time())
        if self.guard is not None:
            for source, _, refused in self.guard.served_bans(time.monotonic()):
                self.audit.event("ban_ended", client_ip=source,
                                 reason=f"{refused} CONNECTs refused during the ban")
        self.audit.flush_suppressed()

    def _slow_consumer(self, session: KeySession) -> None:
        self.registry.kick(session.client_id, "slow_consumer", publish_will=True)

    async def kick(self, client_id: str, reason: str, *, publish_will: bool = False) -> bool:
        return self.registry.kick(client_id, reason, publish_will=publish_will)

    # ------------------------------------------------------------------ PUBLISH in
    def publish_packet(self, session: KeySession, connection: MqttConnection,
                       packet: codec.Publish) -> bool:
        """An incoming PUBLISH with its acknowledgement; False ends the connection.

        QoS 2 is MQTT's "method B" (§4.3.3): the message is passed on when it arrives and
        only its packet id is kept until PUBREL, so a re-sent PUBLISH (DUP, also after a
        reconnect of a persistent session) is recognised and not delivered twice."""
        qos, packet_id, link = packet.qos, packet.packet_id, connection.link
        if qos == 2 and packet_id in session.inflight_in:
            link.write(codec.ack_packet(codec.PUBREC, packet_id))
            return True
        if qos == 2 and len(session.inflight_in) >= self.settings.max_queued_messages:
            # amqtt kept every unreleased QoS 2 message without limit.
            self.flow_violation(session, "too many unacknowledged QoS 2 messages (no PUBREL)")
            return False
        verdict = self.publish_in(session, packet.topic, packet.payload, qos, packet.retain)
        if verdict is Verdict.CLOSE:
            return False
        if qos == 1:
            link.write(codec.ack_packet(codec.PUBACK, packet_id))
        elif qos == 2:
            session.inflight_in.add(packet_id)
            link.write(codec.ack_packet(codec.PUBREC, packet_id))
        return True

    def publish_in(self, session: KeySession, topic: str, data: bytes, qos: int,
                   retain: bool) -> Verdict:
        """Check, route and retain one incoming PUBLISH. Synchronous: no await between the
        packet and the subscribers' connections."""
        if session.kicked:
            return Verdict.CLOSE  # revoked or being disconnected: nothing more from it
        if self.settings.max_publish_rate and not self._within_rate(session):
            self.router.audit_denied("publish_denied", session, topic, "rate_limited")
            return Verdict.CLOSE
        try:
            validate_topic_name(topic)
            self._check_topic_limits(topic)
        except ValidationError as exc:
            # MQTT-3.3.2-2 / 4.7.3-1: a malformed PUBLISH topic is a protocol error.
            self.router.audit_denied("publish_denied", session, topic, f"invalid_topic: {exc}")
            return Verdict.CLOSE
        decision = decide(session, topic, Action.PUBLISH)
        if not decision.allowed:
            self.router.audit_denied("publish_denied", session, topic, decision.reason)
            if self.settings.denied_publish == "disconnect":
                return Verdict.CLOSE  # no PUBACK: the client must not think it was accepted
            return Verdict.DROPPED
        self.router.route(topic, data, qos)
        if retain:
            self._retain(session, topic, data, qos)
        return Verdict.ACCEPTED

    def _retain(self, session: KeySession | None, topic: str, data: bytes, qos: int) -> None:
        refusal = self.router.retain(session, topic, data, qos)
        if refusal is not None and session is not None:
            self.router.audit_denied("retain_refused", session, topic, refusal)

    def flow_violation(self, session: KeySession, reason: str) -> None:
        """A client breaking a flow-control limit: audited, then disconnected."""
        self.audit.event("bad_packet", reason=reason, **audit_fields(session))

    def _within_rate(self, session: KeySession) -> bool:
        """Token bucket per connection: max_publish_rate per second, bursts of one second."""
        rate = self.settings.max_publish_rate
        now = time.monotonic()
        tokens, last = session.bucket or (rate, now)
        tokens = min(rate, tokens + (now - last) * rate) - 1
        session.bucket = (tokens, now)
        return tokens >= 0

    def _check_topic_limits(self, topic: str) -> None:
        size, levels = len(topic.encode("utf-8", "surrogatepass")), topic.count("/") + 1
        if size > self.settings.max_topic_length:
            raise ValidationError(f"{size} bytes, limit {self.settings.max_topic_length}")
        if levels > self.settings.max_topic_levels:
            raise ValidationError(f"{levels} levels, limit {self.settings.max_topic_levels}")

    def subscribe_refusal(self, session: KeySession, topic_filter: str) -> str | None:
        """Why a SUBSCRIBE filter is refused (limits, then policy), or None."""
        try:
            self._check_topic_limits(topic_filter)
        except ValidationError as exc:
            return f"limit: {exc}"
        decision = decide(session, topic_filter, Action.SUBSCRIBE)
        return None if decision.allowed else decision.reason

    def _publish_will(self, session: KeySession, will: Will) -> None:
        try:
            self._check_topic_limits(will.topic)
        except ValidationError as exc:
            self.router.audit_denied("publish_denied", session, will.topic, f"limit: {exc}",
                                     will=True)
            return
        decision = decide(session, will.topic, Action.PUBLISH)
        if not decision.allowed:
            self.router.audit_denied("publish_denied", session, will.topic, decision.reason,
                                     will=True)
            return
        self.router.route(will.topic, will.payload, will.qos)
        if will.retain:
            self._retain(session, will.topic, will.payload, will.qos)

    # ------------------------------------------------------------------ amqtt entry points
    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        """amqtt queued every message for its broadcast task; we route at once."""
        if topic is not None and data is not None:
            self.router.route(topic, bytes(data), force_qos if force_qos is not None else 0)

    async def _run_broadcast(self, running_tasks: Any) -> None:
        """Only what amqtt's own code still puts on its queue (nothing, in keybroker)."""
        broadcast = await self._broadcast_queue.get()
        self.router.route(broadcast["topic"], bytes(broadcast["data"]), broadcast.get("qos") or 0)

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        if topic_name is not None:
            session = source_session if isinstance(source_session, KeySession) else None
            self._retain(session, topic_name, bytes(data or b""), qos or 0)

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        if not isinstance(session, KeySession):
            return codec.SUBACK_FAILURE
        return self.router.subscribe(session, [subscription], self.subscribe_refusal)[0]


def _effective_keepalive(keep_alive: int, settings: Settings) -> int:
    """Seconds of silence tolerated: keepalive_factor x the client's keep-alive (0 = never)."""
    if keep_alive <= 0:
        return 0
    return max(1, math.ceil(keep_alive * settings.keepalive_factor))
