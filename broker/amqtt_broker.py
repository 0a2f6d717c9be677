"""KeyBroker: keybroker's subclass of amqtt 0.12.1's Broker.

amqtt is pinned (pyproject) because this class overrides its private hooks; each
override below is exercised by tests/test_broker_hooks.py and tests/test_broker_*.py.
What we change and why:

* Listeners are started here (``_start_listeners``): amqtt's ListenerConfig.apply()
  silently rewrites listener fields equal to the defaults, it needs a "default"
  listener, and it passes neither the WebSocket request headers nor the listener's
  trust settings to plugins. We record the client IP on the session before auth.
* CONNECT (``_client_connected``, ``_initialize_client_session``,
  ``_handle_client_session``): amqtt deletes or takes over an existing session *before*
  authenticating, so a wrong password with a victim's client id wiped the victim's
  subscriptions; it registers refused sessions (a leak) and always answers CONNACK 5.
  Here: authenticate first, answer refusals with the plugin's CONNACK code without
  touching any session, then take over / clean up.
* Keep-alive (``KeyProtocolHandler``): amqtt's broker handler ignores read time-outs;
  we close a connection silent for keepalive_factor (1.5) x its keep-alive.
* Routing (``add_subscription``, ``_del_subscription``, ``_del_all_subscriptions``,
  ``_run_broadcast``): a subscription trie instead of scanning every filter per
  message, and the delivery check is an in-memory policy lookup, not an awaited plugin
  call per subscriber.
* Retained messages (``retain_message``, ``_publish_retained_messages_for_subscription``,
  ``_publish_session_retained_messages``): indexed by topic levels and checked against
  the receiving session's policy (amqtt skipped the check there).
* Will (``_handle_disconnect``): checked against the publisher's policy and suppressed
  for kicked (revoked) sessions.
* Denied PUBLISH (``_handle_message_delivery``): dropped or disconnects (config) and
  audited; QoS delivered is min(published, granted) as MQTT-3.3.5 requires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import websockets
from amqtt.adapters import (
    ReaderAdapter,
    StreamReaderAdapter,
    StreamWriterAdapter,
    WebSocketsReader,
    WebSocketsWriter,
    WriterAdapter,
)
from amqtt.broker import Broker, RetainedApplicationMessage, Server
from amqtt.contexts import Action, ListenerConfig
from amqtt.errors import MQTTError
from amqtt.events import BrokerEvents, MQTTEvents
from amqtt.mqtt.connack import (
    BAD_USERNAME_PASSWORD,
    CONNECTION_ACCEPTED,
    IDENTIFIER_REJECTED,
    NOT_AUTHORIZED,
    UNACCEPTABLE_PROTOCOL_VERSION,
    ConnackPacket,
)
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.publish import PublishPacket
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session
from websockets.asyncio.server import ServerConnection

from broker.audit import AuditLog
from broker.clientip import TrustedProxies, client_ip_from_forwarded, normalize_ip
from broker.framing import FramedReader, PacketError, PacketWatchdog, read_proxy_header
from broker.live import ChangeWatcher, StatusRecorder
from broker.periodic import spawn
from broker.plugins import (
    AccessKeyAuthPlugin,
    Connection,
    TopicAclPlugin,
    audit_fields,
    grant_of,
)
from broker.session import KeySession
from broker.settings import Listener, Settings
from broker.subtree import RetainedStore, SubscriptionTree
from broker.topics import validate_topic_name
from keystore.errors import ValidationError

logger = logging.getLogger(__name__)

SUBACK_FAILURE = 0x80
DENIALS_AUDITED_PER_SECOND = 20


class KeyProtocolHandler(BrokerProtocolHandler):
    """amqtt's broker handler, but a read time-out (keep-alive expired) closes the link,
    and a QoS 0 PUBLISH goes straight to KeyBroker.publish_in (no queue, no loop hop)."""

    _kb_timed_out = False
    kb_broker: KeyBroker | None = None

    @classmethod
    async def init_from_connect(
        cls,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        plugins_manager: Any,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> tuple[KeyProtocolHandler, Session]:
        """amqtt's CONNECT reading and checks, creating a KeySession (see broker.session)
        instead of a Session; the checks are amqtt 0.12.1's, in its order."""
        connect = await ConnectPacket.from_stream(reader)
        await plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=connect)
        if connect.variable_header is None or connect.payload is None:
            raise MQTTError("CONNECT packet: header or payload not initialized.")
        if connect.payload.client_id is None:
            raise MQTTError("[MQTT-3.1.3-3] : Client identifier must be present")
        if connect.variable_header.will_flag and (
                connect.payload.will_topic is None or connect.payload.will_message is None):
            raise MQTTError("Will flag set, but will topic/message not present in payload")
        if connect.variable_header.reserved_flag:
            raise MQTTError("[MQTT-3.1.2-3] CONNECT reserved flag must be set to 0")
        if connect.proto_name != "MQTT":
            raise MQTTError(f'[MQTT-3.1.2-1] Incorrect protocol name: "{connect.proto_name}"')
        remote = writer.get_peer_info()
        if remote is None:
            raise MQTTError("no peer information")
        code = None
        if connect.proto_level != 4:  # only MQTT 3.1.1
            code = UNACCEPTABLE_PROTOCOL_VERSION
        elif (not connect.username_flag and connect.password_flag) or (
                connect.username_flag and connect.username is None) or (
                connect.password_flag and connect.password is None):
            code = BAD_USERNAME_PASSWORD  # [MQTT-3.1.2-22]
        elif connect.clean_session_flag is False and connect.payload.client_id_is_random:
            code = IDENTIFIER_REJECTED  # [MQTT-3.1.3-8] [MQTT-3.1.3-9]
        if code is not None:
            connack = ConnackPacket.build(0, code)
            await plugins_manager.fire_event(MQTTEvents.PACKET_SENT, packet=connack)
            await connack.to_stream(writer)
            await writer.close()
            raise MQTTError(f"CONNECT refused with return code {code}")
        session = KeySession()
        session.client_id = connect.client_id
        session.clean_session = connect.clean_session_flag
        session.will_flag = connect.will_flag
        session.will_retain = connect.will_retain_flag
        session.will_qos = connect.will_qos
        session.will_topic = connect.will_topic
        session.will_message = connect.will_message
        session.username = connect.username
        session.password = connect.password
        session.remote_address, session.remote_port = remote
        session.ssl_object = writer.get_ssl_info()
        session.keep_alive = max(connect.keep_alive, 0)
        return cls(plugins_manager, loop=loop), session

    async def stop(self) -> None:
        # amqtt cancels the reader task once and waits for it to stop. On Python 3.11,
        # asyncio.wait_for (which the reader loop uses on every packet) can swallow that
        # cancellation when the read completes at the same moment (CPython gh-86296), and
        # the reader then waits for the next packet forever: a kick during a flood hung.
        # Repeat the cancellation until the reader task has really ended.
        reader = self._reader_task
        if reader is not None and reader is not asyncio.current_task():
            while not reader.done():
                reader.cancel()
                await asyncio.wait({reader}, timeout=0.1)
        await super().stop()

    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        broker, session = self.kb_broker, self.session
        if publish_packet.qos and broker is not None and session is not None:
            # amqtt keeps every unacknowledged QoS 2 PUBLISH (and every queued QoS 1/2 one)
            # without limit: a client that never sends PUBREL could hold gigabytes.
            limit = broker.settings.max_queued_messages
            if (len(session.inflight_in) >= limit
                    or session.delivered_message_queue.qsize() >= limit):
                broker.flow_violation(session, self, "too many unacknowledged messages")
                return
        if publish_packet.qos == QOS_0 and broker is not None and session is not None:
            topic, data = publish_packet.topic_name, publish_packet.data
            if topic is not None and data is not None:
                broker.publish_in(session, self, topic, data, QOS_0,
                                  bool(publish_packet.retain_flag))
            return
        await super().handle_publish(publish_packet)

    def handle_read_timeout(self) -> None:
        if self._kb_timed_out:
            return
        self._kb_timed_out = True
        client_id = self.session.client_id if self.session else None
        logger.info("client %s silent past its keep-alive: closing", client_id)
        # The reader loop calls this synchronously; closing must run as its own task.
        spawn(self.handle_connection_closed())




class KeyBroker(Broker):
    """amqtt Broker with access-key authentication, trie routing and policy checks."""

    def __init__(self, config: dict[str, Any], settings: Settings, audit: AuditLog) -> None:
        super().__init__(config)
        self.settings = settings
        self.audit = audit
        self._trusted = TrustedProxies(settings.trusted_proxies)
        # Subscribers are client ids (amqtt's Session is unhashable); delivery resolves the
        # live session of that id, so a take-over needs no re-indexing.
        self._subtree: SubscriptionTree[str] = SubscriptionTree()
        self._retained = RetainedStore[RetainedApplicationMessage]()
        self._listeners = {listener.name: listener for listener in settings.listeners}
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._ssl: dict[str, ssl.SSLContext] = {}
        self._open_connections = 0
        self._open_writers: set[WriterAdapter] = set()
        # Deliveries not yet written (queued + in flight), per client id: bounds what a
        # slow consumer can make the broker hold.
        self._pending: dict[str, int] = {}
        self._deliveries: set[asyncio.Future[Any]] = set()
        self._watchdog = PacketWatchdog()
        self._connect_locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._by_key: dict[str, set[str]] = {}  # key -> client ids it authenticated
        self._decide: Callable[[Session, str, Action], Any] = TopicAclPlugin.decide
        auth_plugins = [plugin for plugin in self.plugins_manager.plugins
                        if isinstance(plugin, BaseAuthPlugin)]
        only_ours = len(auth_plugins) == 1 and isinstance(auth_plugins[0], AccessKeyAuthPlugin)
        self._auth: AccessKeyAuthPlugin | None = auth_plugins[0] if only_ours else None
        # Daemon services attached by BrokerServer (broker.live); None in bare use.
        self.watcher: ChangeWatcher | None = None
        self.status: StatusRecorder | None = None

    # ------------------------------------------------------------------ listeners
    async def _start_listeners(self) -> None:
        for listener in self.settings.listeners:
            ssl_context = _ssl_context(listener) if listener.tls else None
            if ssl_context is not None:
                self._ssl[listener.name] = ssl_context
            if listener.type == "tcp":
                # With PROXY protocol the header precedes the TLS handshake, so TLS is
                # started by stream_connected after reading it.
                instance: Any = await asyncio.start_server(
                    partial(self.stream_connected, listener_name=listener.name),
                    listener.host,
                    listener.port,
                    reuse_address=True,
                    ssl=None if listener.proxy_protocol else ssl_context,
                )
            else:
                instance = await websockets.serve(
                    partial(self.ws_connected, listener_name=listener.name),
                    listener.host,
                    listener.port,
                    ssl=ssl_context,
                    subprotocols=[websockets.Subprotocol("mqtt")],
                    max_size=self.settings.max_packet_size + 16,
                )
            self._servers[listener.name] = Server(listener.name, instance, -1)

    async def start(self) -> None:
        await super().start()
        self._watchdog.start_ticking()

    async def shutdown(self) -> None:
        await self._watchdog.stop_ticking()
        await super().shutdown()
        for task in list(self._deliveries):
            task.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        # Connections still before or inside CONNECT are not sessions amqtt knows about.
        for writer in list(self._open_writers):
            await _close_quietly(writer)

    def bound_addresses(self) -> dict[str, list[tuple[str, int]]]:
        """Listener name -> the (host, port) pairs it is bound to (port 0 resolved)."""
        out: dict[str, list[tuple[str, int]]] = {}
        for name, server in self._servers.items():
            sockets = getattr(server.instance, "sockets", None) or ()
            out[name] = [sock.getsockname()[:2] for sock in sockets]
        return out

    async def ws_connected(self, websocket: ServerConnection, listener_name: str) -> None:
        writer = WebSocketsWriter(websocket)
        request = websocket.request
        forwarded = request.headers.get_all("X-Forwarded-For") if request is not None else []
        writer.kb_forwarded = forwarded
        await self._client_connected(listener_name, WebSocketsReader(websocket), writer)

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        adapter = StreamWriterAdapter(writer)
        prefix = b""
        if self._listeners[listener_name].proxy_protocol:
            accepted = await self._accept_proxy_header(reader, writer, adapter, listener_name)
            if accepted is None:
                return
            prefix = accepted
        await self._client_connected(
            listener_name, StreamReaderAdapter(reader), adapter, prefix=prefix
        )

    async def _accept_proxy_header(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        adapter: StreamWriterAdapter,
        listener_name: str,
    ) -> bytes | None:
        """Read a PROXY header on a proxy_protocol listener; None = connection refused.

        Only trusted proxies may send one (else it could spoof the client IP), and a
        trusted proxy must send one (else every client would look like the proxy)."""
        peer = writer.get_extra_info("peername")
        peer_ip = normalize_ip(str(peer[0])) if peer else None
        trusted = peer_ip is not None and self._trusted.contains(peer_ip)

        async def read(n: int) -> bytes:
            try:
                return await reader.readexactly(n)
            except asyncio.IncompleteReadError as exc:
                return exc.partial

        reason = None
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                info, had_header, leftover = await read_proxy_header(read)
        except (ValidationError, TimeoutError, ConnectionError) as exc:
            reason = f"bad_proxy_header: {exc}" if not isinstance(exc, TimeoutError) else (
                "proxy_header_timeout")
        else:
            if had_header and not trusted:
                reason = "proxy_header_from_untrusted_peer"
            elif trusted and not had_header:
                reason = "proxy_header_missing"
        if reason is not None:
            self.audit.event("connect_invalid", peer_ip=peer_ip, client_ip=peer_ip,
                             listener=listener_name, reason=reason)
            writer.close()
            return None
        if info is not None:
            adapter.kb_proxy_client = normalize_ip(info.src_ip)
        context = self._ssl.get(listener_name)
        if context is not None:
            try:
                await writer.start_tls(context)
            except (ssl.SSLError, ConnectionError, OSError):
                writer.close()
                return None
        return leftover

    def _connection_info(self, listener_name: str, writer: WriterAdapter) -> Connection | None:
        peer = writer.get_peer_info()
        if peer is None:
            return None
        peer_ip = normalize_ip(str(peer[0])) or str(peer[0])
        forwarded: list[str] = getattr(writer, "kb_forwarded", None) or []
        proxied: str | None = getattr(writer, "kb_proxy_client", None)
        if proxied is not None:  # set only for trusted proxies (_accept_proxy_header)
            client_ip = proxied
        elif forwarded:
            client_ip = client_ip_from_forwarded(peer_ip, forwarded, self._trusted)
        else:
            client_ip = peer_ip
        return Connection(listener=listener_name, peer_ip=peer_ip, client_ip=client_ip)

    # ------------------------------------------------------------------ CONNECT
    async def _client_connected(
        self,
        listener_name: str,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        *,
        prefix: bytes = b"",
    ) -> None:
        server = self._servers.get(listener_name)
        conn = self._connection_info(listener_name, writer)
        if server is None or conn is None:
            await _close_quietly(writer)
            return
        if self._open_connections >= self.settings.max_connections:
            self.audit.event("connect_invalid", client_ip=conn.client_ip, peer_ip=conn.peer_ip,
                             listener=listener_name, reason="max_connections")
            await _close_quietly(writer)
            return
        self._open_connections += 1
        self._open_writers.add(writer)
        await server.acquire_connection()

        def violation(error: PacketError) -> None:
            self.audit.event("bad_packet", client_ip=conn.client_ip, peer_ip=conn.peer_ip,
                             listener=listener_name, reason=str(error))

        framed = FramedReader(
            reader,
            max_packet_size=self.settings.max_packet_size,
            packet_timeout=self.settings.packet_timeout,
            prefix=prefix,
            on_violation=violation,
        )
        reader = framed
        self._watchdog.readers.add(framed)
        try:
            try:
                handler, session = await asyncio.wait_for(
                    KeyProtocolHandler.init_from_connect(reader, writer, self.plugins_manager),
                    timeout=self.settings.connect_timeout,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one client's bytes never kill the daemon
                logger.info("no valid CONNECT from %s on %s: %r", conn.peer_ip, listener_name, exc)
                self.audit.event(
                    "connect_invalid",
                    client_ip=conn.client_ip,
                    peer_ip=conn.peer_ip,
                    listener=listener_name,
                    reason=type(exc).__name__,
                )
                await _close_quietly(writer)
                return
            session.kb_conn = conn
            await self._handle_client_session(
                reader, writer, session, handler, server, listener_name
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("connection on %s ended with an internal error", listener_name)
            await _close_quietly(writer)
        finally:
            self._open_connections -= 1
            self._open_writers.discard(writer)
            self._watchdog.readers.discard(framed)
            server.release_connection()
            # amqtt's StreamWriterAdapter.close() marks itself closed, then drain() can raise
            # on a reset peer before the socket is closed; the connection owns its socket,
            # so close it here whatever happened (idempotent, no await: also on cancel).
            _abort(writer)

    async def _handle_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Server,
        listener_name: str,
    ) -> None:
        # 1. Authenticate before touching any existing session (amqtt did it after).
        client_session.kb_auth_started = asyncio.get_running_loop().time()
        if not await self._authenticate(client_session, ListenerConfig(bind=None)):
            refusal = getattr(client_session, "kb_refusal", None)
            code = refusal.connack if refusal is not None else NOT_AUTHORIZED
            await _send_connack(writer, code)
            await _close_quietly(writer)
            return
        client_id = client_session.client_id
        if not client_id:  # the auth plugin refuses an empty client id; keep the invariant
            await _send_connack(writer, NOT_AUTHORIZED)
            await _close_quietly(writer)
            return

        # 2. Take over: the authenticated client replaces any live connection of that id.
        # One CONNECT per client id at a time: two racing CONNECTs must not both pass the
        # "is the old one gone" check (one of them would end up registered nowhere).
        async with self._connect_lock(client_id):
            session = await self._take_over(client_session)
            session.keep_alive = _effective_keepalive(client_session.keep_alive, self.settings)
            session.kb_bucket = (self.settings.max_publish_rate, time.monotonic())
            self._tasks[client_id] = asyncio.current_task()  # type: ignore[assignment]
            if not session.transitions.is_connected():
                session.transitions.connect()
            handler.attach(session, reader, writer)
            if isinstance(handler, KeyProtocolHandler):
                handler.kb_broker = self
            self._sessions[client_id] = (session, handler)
            await _send_connack(writer, CONNECTION_ACCEPTED, session_present=session.parent)
            self._session_started(client_id, session)
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED, client_id=client_id, client_session=session
        )
        await handler.start()
        await self._publish_session_retained_messages(session)
        try:
            await self._client_message_loop(session, handler)
        finally:
            if self._tasks.get(client_id) is asyncio.current_task():
                del self._tasks[client_id]

    def _session_started(self, client_id: str, session: Session) -> None:
        grant = grant_of(session)
        if grant is None:
            return
        self._by_key.setdefault(grant.key.key, set()).add(client_id)
        if self.watcher is not None:
            self.watcher.session_started(client_id, grant,
                                         getattr(session, "kb_auth_started", 0.0))
        if self.status is not None:
            self.status.connected(client_id, grant.key.key)

    @contextlib.asynccontextmanager
    async def _connect_lock(self, client_id: str) -> AsyncIterator[None]:
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

    async def _take_over(self, incoming: Session) -> Session:
        """End a live connection with the same client id, then pick the session to use.
        The old connection's task has finished (or was cancelled) before this returns, so
        it can never mark the session we hand out as disconnected afterwards."""
        client_id = incoming.client_id
        assert client_id is not None
        existing = self._sessions.get(client_id)
        if existing is not None and existing[0].transitions.is_connected():
            logger.info("client %s connected again: taking over the old connection", client_id)
            await self._end_connection(client_id, existing[1])
        existing = self._sessions.get(client_id)
        if incoming.clean_session or existing is None or existing[0].clean_session:
            if existing is not None:
                await self._drop_session(client_id, existing[0])
            incoming.parent = 0
            return incoming
        # Resume a persistent session with the new connection's credentials and grant.
        session = existing[0]
        for attr in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain",
                     "username", "password", "kb_conn", "kb_grant"):
            setattr(session, attr, getattr(incoming, attr, None))
        session.kb_kicked = None
        session.kb_suppress_will = False
        session.parent = 1
        # amqtt re-sends unacknowledged deliveries on resume: only those the new grant
        # may still read (the resuming key can differ from the one that subscribed).
        for packet_id, message in list(session.inflight_out.items()):
            if not self._decide(session, message.topic, Action.RECEIVE).allowed:
                del session.inflight_out[packet_id]
        return session

    async def _drop_session(self, client_id: str, session: Session) -> None:
        """Forget a session and its subscriptions, unless a newer one already owns the id."""
        current = self._sessions.get(client_id)
        if current is not None and current[0] is not session:
            return
        self._sessions.pop(client_id, None)
        self._subtree.remove_subscriber(client_id)
        session.clear_queues()

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
        """Expire disconnected persistent sessions (clean ones are dropped at disconnect)."""
        interval = self.config.session_expiry_interval
        while True:
            await asyncio.sleep(1)
            if interval is None:
                continue
            retain_after = math.floor(time.time() - interval)
            for client_id, (session, _) in list(self._sessions.items()):
                if (
                    session.transitions.state == "disconnected"
                    and session.last_disconnect_time
                    and session.last_disconnect_time < retain_after
                ):
                    await self._drop_session(client_id, session)

    async def _end_connection(self, client_id: str, handler: BrokerProtocolHandler) -> None:
        """Close a connection at once and wait until its task is over."""
        _hard_close(handler)
        await handler.handle_connection_closed()
        old_task = self._tasks.get(client_id)
        if old_task is None or old_task is asyncio.current_task():
            return
        done, _ = await asyncio.wait({old_task}, timeout=2)
        if not done:  # stuck somewhere in amqtt: end it
            old_task.cancel()
            await asyncio.wait({old_task}, timeout=2)

    # ------------------------------------------------------------------ kick
    async def kick(self, client_id: str, reason: str, *, publish_will: bool = False) -> bool:
        """Disconnect a live session now. A revoked session's Will is not published."""
        entry = self._sessions.get(client_id)
        if entry is None or not entry[0].transitions.is_connected():
            return False
        session, handler = entry
        session.kb_kicked = reason
        session.kb_suppress_will = not publish_will
        self.audit.event("kick", reason=reason, **audit_fields(session))
        # Abort the transport rather than only resolving amqtt's disconnect future: the
        # session's message loop may be busy (e.g. blocked on a drain) and a revoked client
        # must not be able to send anything more (publish_in also drops kicked sessions).
        _hard_close(handler)
        await handler.handle_connection_closed()
        return True

    def sessions_of_key(self, key: str) -> list[str]:
        """Client ids of the connected sessions a key authenticated (an index: revocation
        work follows the number of changes, not the number of sessions)."""
        out = []
        for client_id in list(self._by_key.get(key, ())):
            entry = self._sessions.get(client_id)
            grant = grant_of(entry[0]) if entry else None
            if entry is not None and grant is not None and grant.key.key == key \
                    and entry[0].transitions.is_connected():
                out.append(client_id)
            else:
                self._unindex(key, client_id)
        return out

    def _unindex(self, key: str, client_id: str) -> None:
        clients = self._by_key.get(key)
        if clients is not None:
            clients.discard(client_id)
            if not clients:
                del self._by_key[key]

    def forget_offline_session(self, client_id: str) -> None:
        """Drop a disconnected persistent session (its device was deleted)."""
        entry = self._sessions.get(client_id)
        if entry is not None and not entry[0].transitions.is_connected():
            self._sessions.pop(client_id, None)
            self._subtree.remove_subscriber(client_id)
            entry[0].clear_queues()

    # ------------------------------------------------------------------ disconnect
    async def _handle_disconnect(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        disconnect_waiter: asyncio.Future[Any],
    ) -> None:
        result = disconnect_waiter.result()
        abnormal = result is None or not isinstance(result, DisconnectPacket)
        suppress = getattr(client_session, "kb_suppress_will", False)
        if abnormal and client_session.will_flag and not suppress:
            await self._publish_will(client_session)
        await self._stop_handler(handler)
        client_session.transitions.disconnect()
        if self.status is not None and client_session.client_id:
            self.status.disconnected(client_session.client_id)
        grant = grant_of(client_session)
        if grant is not None and client_session.client_id:
            self._unindex(grant.key.key, client_session.client_id)
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_DISCONNECTED,
            client_id=client_session.client_id,
            client_session=client_session,
        )
        if client_session.clean_session and client_session.client_id:
            await self._drop_session(client_session.client_id, client_session)

    async def _publish_will(self, session: Session) -> None:
        topic, data = session.will_topic, session.will_message
        if topic is None or data is None:
            return
        try:
            self._check_topic_limits(topic)
        except ValidationError as exc:
            self._audit_denied("publish_denied", session, topic, f"limit: {exc}", will=True)
            return
        decision = self._decide(session, topic, Action.PUBLISH)
        if not decision.allowed:
            self._audit_denied("publish_denied", session, topic, decision.reason, will=True)
            return
        qos = session.will_qos or QOS_0
        await self._broadcast_message(session, topic, data, pub_qos=qos)
        if session.will_retain:
            await self.retain_message(session, topic, data, qos)

    # ------------------------------------------------------------------ PUBLISH in
    async def _handle_message_delivery(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        wait_deliver: asyncio.Future[Any],
    ) -> bool:
        """QoS 1/2 PUBLISH, after amqtt's acknowledgement flow (QoS 0 takes the fast path
        in KeyProtocolHandler.handle_publish and never comes through here)."""
        app_message = wait_deliver.result()
        if app_message is not None:
            retain = bool(app_message.publish_packet and app_message.publish_packet.retain_flag)
            self.publish_in(client_session, handler, app_message.topic, app_message.data,
                            app_message.qos or QOS_0, retain)
        return True

    def publish_in(self, session: Session, handler: BrokerProtocolHandler, topic: str,
                   data: bytes | bytearray, qos: int, retain: bool) -> None:
        """Check, route and retain one incoming PUBLISH. Synchronous: no await between the
        packet and the subscribers' transports on the QoS 0 path."""
        if getattr(session, "kb_kicked", None):
            return  # revoked or being disconnected: nothing more from it
        if self.settings.max_publish_rate and not self._within_rate(session):
            self._audit_denied("publish_denied", session, topic, "rate_limited")
            self._close_later(handler)
            return
        try:
            validate_topic_name(topic)
            self._check_topic_limits(topic)
        except ValidationError as exc:
            # MQTT-3.3.2-2 / 4.7.3-1: a malformed PUBLISH topic is a protocol error.
            self._audit_denied("publish_denied", session, topic, f"invalid_topic: {exc}")
            self._close_later(handler)
            return
        decision = self._decide(session, topic, Action.PUBLISH)
        if not decision.allowed:
            self._audit_denied("publish_denied", session, topic, decision.reason)
            if self.settings.denied_publish == "disconnect":
                self._close_later(handler)
            return
        self._route(topic, data, qos, None)
        if retain:
            self._retain(session, topic, data, qos)

    def flow_violation(self, session: Session, handler: BrokerProtocolHandler,
                       reason: str) -> None:
        """A client breaking a flow-control limit: audited, then disconnected."""
        self.audit.event("bad_packet", reason=reason, **audit_fields(session))
        session.kb_kicked = reason
        _hard_close(handler)
        self._close_later(handler)

    def _within_rate(self, session: Session) -> bool:
        """Token bucket per connection: max_publish_rate per second, bursts of one second."""
        rate = self.settings.max_publish_rate
        now = time.monotonic()
        tokens, last = getattr(session, "kb_bucket", (rate, now))
        tokens = min(rate, tokens + (now - last) * rate) - 1
        session.kb_bucket = (tokens, now)
        return tokens >= 0

    def _close_later(self, handler: BrokerProtocolHandler) -> None:
        spawn(handler.handle_connection_closed())

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
        *,
        pub_qos: int = QOS_2,
    ) -> None:
        """amqtt queued every message for its broadcast task; we route at once."""
        if topic is not None and data is not None:
            self._route(topic, data, pub_qos, force_qos)

    def _audit_denied(
        self, event: str, session: Session, topic: str, reason: str, **extra: Any
    ) -> None:
        """Audit a denial; at most DENIALS_AUDITED_PER_SECOND per session, so a client
        flooding denied PUBLISHes cannot fill the disk or stall the loop with writes
        (the excess is counted in an ``audit_suppressed`` event)."""
        now = time.monotonic()
        start, count, suppressed = getattr(session, "kb_denials", (now, 0, 0))
        if now - start >= 1.0:
            if suppressed:
                self.audit.event("audit_suppressed", **audit_fields(session),
                                 reason=f"{suppressed} denials not logged in 1 s")
            start, count, suppressed = now, 0, 0
        if count >= DENIALS_AUDITED_PER_SECOND:
            session.kb_denials = (start, count, suppressed + 1)
            return
        session.kb_denials = (start, count + 1, suppressed)
        logger.info("%s: client %s topic %r: %s", event, session.client_id, topic, reason)
        self.audit.event(event, reason=reason, topic=topic, **audit_fields(session), **extra)

    # ------------------------------------------------------------------ SUBSCRIBE
    def _check_topic_limits(self, topic: str) -> None:
        size, levels = len(topic.encode("utf-8", "surrogatepass")), topic.count("/") + 1
        if size > self.settings.max_topic_length:
            raise ValidationError(f"{size} bytes, limit {self.settings.max_topic_length}")
        if levels > self.settings.max_topic_levels:
            raise ValidationError(f"{levels} levels, limit {self.settings.max_topic_levels}")

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        topic_filter, qos = subscription
        limit = self.settings.max_subscriptions
        client_id = session.client_id or ""
        try:
            self._check_topic_limits(topic_filter)
        except ValidationError as exc:
            self._audit_denied("subscribe_denied", session, topic_filter, f"limit: {exc}")
            return SUBACK_FAILURE
        if limit and len(self._subtree.filters_of(client_id)) >= limit and \
                topic_filter not in self._subtree.filters_of(client_id):
            self._audit_denied("subscribe_denied", session, topic_filter, "max_subscriptions")
            return SUBACK_FAILURE
        decision = self._decide(session, topic_filter, Action.SUBSCRIBE)
        if not decision.allowed:
            self._audit_denied("subscribe_denied", session, topic_filter, decision.reason)
            return SUBACK_FAILURE
        max_qos = self.config.get("max-qos", qos)
        qos = min(qos, max_qos) if isinstance(max_qos, int) else qos
        self._subtree.add(topic_filter, session.client_id, qos)
        return qos

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        return 1 if self._subtree.remove(a_filter, session.client_id) else 0

    async def _del_all_subscriptions(self, session: Session) -> None:
        if session.client_id:
            self._subtree.remove_subscriber(session.client_id)

    @property
    def subscriptions(self) -> dict[str, list[tuple[Session, int]]]:
        """amqtt's view (filter -> [(session, qos)]), rebuilt from the trie; not a hot path."""
        view: dict[str, list[tuple[Session, int]]] = {}
        for session, _ in self._sessions.values():
            for topic_filter, qos in self._subtree.filters_of(session.client_id).items():
                view.setdefault(topic_filter, []).append((session, qos))
        return view

    # ------------------------------------------------------------------ routing
    async def _run_broadcast(self, running_tasks: Any) -> None:
        """Only what is still put on amqtt's queue by amqtt's own code paths."""
        broadcast = await self._broadcast_queue.get()
        self._route(broadcast["topic"], broadcast["data"], QOS_2, broadcast.get("qos"))

    def _route(self, topic: str, data: bytes | bytearray, pub_qos: int,
               forced: int | None) -> None:
        """Deliver to every session whose filters match and whose policy may read topic.

        QoS 0 to a TCP/TLS client: the PUBLISH bytes are built once per message and
        written to the transport directly (one write() per packet keeps packets whole
        even while amqtt awaits a drain for another one); a transport holding more than
        max_buffered_bytes is a slow consumer. QoS 1/2 (and WebSocket) keep amqtt's
        acknowledged flow, bounded by max_queued_messages per session.
        """
        decide = self._decide
        sessions = self._sessions
        packet: bytes | None = None
        for client_id, sub_qos in self._subtree.match(topic).items():
            entry = sessions.get(client_id)
            if entry is None:
                continue
            target, handler = entry
            if getattr(target, "kb_kicked", None) or \
                    not decide(target, topic, Action.RECEIVE).allowed:
                continue
            qos = forced if forced is not None else min(pub_qos, sub_qos)
            if target.transitions.state != "connected":
                # Persistent sessions keep QoS 1/2 messages while offline [MQTT-3.1.2-5].
                if not target.clean_session and qos in (QOS_1, QOS_2):
                    self._queue_offline(target, topic, data, qos)
                continue
            if qos == QOS_0:
                stream = getattr(handler.writer, "_writer", None)
                if isinstance(stream, asyncio.StreamWriter):
                    transport = stream.transport
                    if transport.is_closing():
                        continue
                    if transport.get_write_buffer_size() > self.settings.max_session_bytes:
                        self._slow_consumer(client_id)
                        continue
                    if packet is None:
                        packet = PublishPacket.build(topic, bytes(data), None, False, QOS_0,
                                                     False).to_bytes()
                    transport.write(packet)
                    continue
            self._deliver_with_flow(client_id, handler, topic, data, qos)

    def _deliver_with_flow(self, client_id: str, handler: BrokerProtocolHandler, topic: str,
                           data: bytes | bytearray, qos: int) -> None:
        pending = self._pending.get(client_id, 0)
        if pending >= self.settings.max_queued_messages:
            self._slow_consumer(client_id)
            return
        self._pending[client_id] = pending + 1
        task = asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain=False))
        self._deliveries.add(task)
        task.add_done_callback(partial(self._delivered, client_id))

    def _queue_offline(self, session: Session, topic: str, data: bytes | bytearray,
                       qos: int) -> None:
        queue = session.retained_messages
        if queue.qsize() >= self.settings.max_queued_messages:
            logger.info("offline queue of %s full: message on %r dropped",
                        session.client_id, topic)
            return
        queue.put_nowait(RetainedApplicationMessage(None, topic, data, qos))

    def _delivered(self, client_id: str, task: asyncio.Future[Any]) -> None:
        self._deliveries.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("delivery to %s failed: %r", client_id, task.exception())
        left = self._pending.get(client_id, 1) - 1
        if left > 0:
            self._pending[client_id] = left
        else:
            self._pending.pop(client_id, None)

    def _slow_consumer(self, client_id: str) -> None:
        entry = self._sessions.get(client_id)
        if entry is None or getattr(entry[0], "kb_kicked", None):
            return
        entry[0].kb_kicked = "slow_consumer"  # kick once
        spawn(self.kick(client_id, "slow_consumer", publish_will=True))

    # ------------------------------------------------------------------ retained
    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        if topic_name is not None:
            self._retain(source_session, topic_name, data, qos)

    def _retain(self, source_session: Session | None, topic_name: str,
                data: bytes | bytearray | None, qos: int | None) -> None:
        if data:
            limit = self.settings.max_retained_messages
            if limit and topic_name not in self._retained and len(self._retained) >= limit:
                # Delivered live, not kept: retained messages are held in memory.
                if source_session is not None:
                    self._audit_denied("retain_refused", source_session, topic_name,
                                       f"max_retained_messages {limit} reached")
                return
            message = RetainedApplicationMessage(source_session, topic_name, data, qos)
            self._retained.set(topic_name, message)
            self._retained_messages[topic_name] = message
        else:  # an empty retained payload deletes the retained message [MQTT-3.3.1-10]
            self._retained.delete(topic_name)
            self._retained_messages.pop(topic_name, None)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter, qos = subscription
        handler = self._get_handler(session)
        if handler is None:
            return
        matching = [
            (retained, min(qos, retained.qos if retained.qos is not None else qos))
            for topic, retained in self._retained.matching(topic_filter)
            if self._decide(session, topic, Action.RECEIVE).allowed
        ]
        if matching:
            # Sent by a task of its own, a window at a time: amqtt awaited them all inside
            # the session's message loop, where a client withholding PUBACKs could stall
            # the loop (and with it kicks) for 5 s per message.
            task = asyncio.ensure_future(self._send_retained(handler, matching))
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)

    @staticmethod
    async def _send_retained(handler: BrokerProtocolHandler,
                             matching: list[tuple[RetainedApplicationMessage, int]]) -> None:
        window = 32
        for start in range(0, len(matching), window):
            await asyncio.gather(*(
                handler.mqtt_publish(message.topic, message.data, qos, retain=True)
                for message, qos in matching[start : start + window]
            ), return_exceptions=True)
            if handler.session is None:
                return

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Messages queued while a persistent session was offline, checked with the new grant."""
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        while not session.retained_messages.empty():
            message = session.retained_messages.get_nowait()
            if not self._decide(session, message.topic, Action.RECEIVE).allowed:
                continue
            tasks.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(message.topic, message.data, message.qos, retain=False)
                )
            )
        if tasks:
            await asyncio.wait(tasks)


def _effective_keepalive(keep_alive: int, settings: Settings) -> int:
    """Seconds of silence tolerated: keepalive_factor x the client's keep-alive (0 = never)."""
    if keep_alive <= 0:
        return 0
    return max(1, math.ceil(keep_alive * settings.keepalive_factor))


def _ssl_context(listener: Listener) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(listener.certfile), str(listener.keyfile))
    return context


async def _send_connack(writer: WriterAdapter, code: int, session_present: int = 0) -> None:
    try:
        await ConnackPacket.build(session_present, code).to_stream(writer)
    except (ConnectionError, OSError, websockets.exceptions.ConnectionClosed):
        logger.debug("peer gone before CONNACK")


def _abort(writer: WriterAdapter) -> None:
    """Close without awaiting (for a cancelled task); StreamWriterAdapter keeps the asyncio
    StreamWriter in ``_writer`` (covered by tests/test_broker_hooks.py). Data still
    buffered then is for a peer that is not reading: drop it rather than hold it."""
    stream = getattr(writer, "_writer", None)
    if isinstance(stream, asyncio.StreamWriter):
        if stream.transport.get_write_buffer_size():
            stream.transport.abort()
        else:
            stream.close()


def _hard_close(handler: BrokerProtocolHandler) -> None:
    """End a connection now: abort its transport (TCP/TLS, or the WebSocket's)."""
    writer = handler.writer
    stream = getattr(writer, "_writer", None)
    transport = stream.transport if isinstance(stream, asyncio.StreamWriter) else getattr(
        getattr(writer, "_protocol", None), "transport", None)
    if transport is not None:
        transport.abort()


async def _close_quietly(writer: WriterAdapter) -> None:
    try:
        await writer.close()
    except (ConnectionError, OSError, websockets.exceptions.ConnectionClosed):
        pass
    finally:
        _abort(writer)
