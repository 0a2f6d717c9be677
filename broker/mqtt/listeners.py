"""Listeners: TCP/TLS and WebSocket servers, the PROXY protocol header, the client IP.

amqtt's ListenerConfig.apply() silently rewrote listener fields equal to its defaults,
required a "default" listener, and passed neither the WebSocket request headers nor the
listener's trust settings on; keybroker starts its listeners itself. The client IP is the
TCP peer, except from a trusted proxy: then the PROXY header (TCP/TLS listeners with
``proxy_protocol``) or the right-most untrusted X-Forwarded-For hop (WebSocket).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import websockets
from amqtt.broker import Server

from broker.core.audit import AuditLog
from broker.core.bind import bind_error
from broker.core.clientip import client_ip_from_forwarded
from broker.core.settings import Listener, Settings
from broker.core.tls import ssl_context
from broker.mqtt.framing import read_proxy_header
from broker.mqtt.session import ConnectionInfo
from broker.policy.addresses import TrustedProxies, normalize_ip
from keystore.errors import ValidationError

logger = logging.getLogger(__name__)

ProtocolFactory = Callable[[str, "str | None"], asyncio.Protocol]
WebSocketHandler = Callable[..., Awaitable[None]]


async def start_listener(listener: Listener, settings: Settings, factory: ProtocolFactory,
                         on_websocket: WebSocketHandler, gate: ProxyGate) -> Server:
    """Bind and serve one listener. A port in use (1883 often is, by a local mosquitto),
    an unknown host or a bad certificate is a KeybrokerError naming the listener.
    ``factory(listener name, client IP from a PROXY header or None)`` makes the protocol
    of each TCP or TLS connection."""
    try:
        return await _start(listener, settings, factory, on_websocket, gate)
    except OSError as exc:
        raise bind_error(f"listener {listener.name!r}", listener.host, listener.port,
                         exc) from None


async def _start(listener: Listener, settings: Settings, factory: ProtocolFactory,
                 on_websocket: WebSocketHandler, gate: ProxyGate) -> Server:
    context = ssl_context(listener.certfile, listener.keyfile) if listener.tls else None
    loop = asyncio.get_running_loop()
    if listener.type == "tcp":
        if listener.proxy_protocol:
            # The PROXY header precedes the TLS handshake: read from the socket first.
            instance: Any = await ProxyListener.start(listener, factory, context, gate)
        else:
            instance = await loop.create_server(partial(factory, listener.name, None),
                                                ssl=context,
                                                **_where(listener.host, listener.port))
    else:
        instance = await websockets.serve(
            partial(on_websocket, listener_name=listener.name),
            ssl=context, subprotocols=[websockets.Subprotocol("mqtt")],
            max_size=settings.max_packet_size + 16, **_where(listener.host, listener.port))
    return Server(listener.name, instance, -1)


def _where(host: str, port: int) -> dict[str, Any]:
    """Where to listen. ``::`` means every interface of both families: asyncio would bind
    an IPv6-only socket, so a dual-stack one is made here (IPv4 clients arrive as
    ::ffff:a.b.c.d, which the client IP logic folds back to IPv4)."""
    if host != "::":
        return {"host": host, "port": port}
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
    except OSError:
        sock.close()
        raise
    return {"sock": sock}


class ProxyListener:
    """A TCP listener whose connections start with a PROXY protocol header: each accepted
    socket's header is read from the socket itself, exactly (so that not one byte of the
    TLS handshake or MQTT that follows is taken), then the socket is handed to asyncio
    (``connect_accepted_socket``, with TLS when the listener has it)."""

    def __init__(self, sockets: list[socket.socket], factory: ProtocolFactory,
                 listener_name: str, context: ssl.SSLContext | None, gate: ProxyGate) -> None:
        self.sockets = sockets
        self._factory = factory
        self._name = listener_name
        self._context = context
        self._gate = gate
        self._accepting: list[asyncio.Task[None]] = []
        self._handshakes: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(cls, listener: Listener, factory: ProtocolFactory,
                    context: ssl.SSLContext | None, gate: ProxyGate) -> ProxyListener:
        where = _where(listener.host, listener.port)
        if "sock" in where:
            sockets = [where["sock"]]
        else:
            loop = asyncio.get_running_loop()
            infos = await loop.getaddrinfo(listener.host, listener.port,
                                           type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            sockets = []
            try:
                for family, kind, proto, _, address in dict.fromkeys(
                        (i[0], i[1], i[2], None, i[4]) for i in infos):
                    sock = socket.socket(family, kind, proto)
                    sockets.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind(address)
            except OSError:
                for sock in sockets:
                    sock.close()
                raise
        server = cls(sockets, factory, listener.name, context, gate)
        for sock in sockets:
            sock.listen(1024)
            sock.setblocking(False)
            server._accepting.append(asyncio.ensure_future(server._accept(sock)))
        return server

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE and the like: the listener carries on
                logger.warning("listener %r: accept failed: %s", self._name, exc)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.ensure_future(self._handshake(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        accepted, client_ip = await self._gate.accept(conn, self._name)
        if not accepted:
            conn.close()
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(partial(self._factory, self._name, client_ip),
                                               conn, ssl=self._context)
        except (ssl.SSLError, ConnectionError, OSError, TimeoutError):
            conn.close()

    def close(self) -> None:
        for task in self._accepting:
            task.cancel()
        for task in list(self._handshakes):
            task.cancel()
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        tasks = [*self._accepting, *self._handshakes]
        if tasks:
            await asyncio.wait(tasks)


class ProxyGate:
    """Reads the PROXY protocol header on listeners that expect one."""

    def __init__(self, trusted: TrustedProxies, settings: Settings, audit: AuditLog) -> None:
        self.trusted = trusted
        self.settings = settings
        self.audit = audit

    async def accept(self, conn: socket.socket, listener_name: str,
                     ) -> tuple[bool, str | None]:
        """(accepted, the client IP the header gives: None when it sent none, or a LOCAL
        or UNKNOWN one); a connection not accepted is audited and closed.

        Only trusted proxies may send one (else it could spoof the client IP), and a
        trusted proxy must send one (else every client would look like the proxy)."""
        try:
            peer = conn.getpeername()
        except OSError:
            return False, None
        peer_ip = normalize_ip(str(peer[0])) if peer else None
        trusted = peer_ip is not None and self.trusted.contains(peer_ip)
        loop = asyncio.get_running_loop()

        async def peek() -> bytes:
            while True:
                try:
                    return conn.recv(1, socket.MSG_PEEK)
                except (BlockingIOError, InterruptedError):
                    await _readable(loop, conn)

        async def read(n: int) -> bytes:
            data = b""
            while len(data) < n:
                chunk = await loop.sock_recv(conn, n - len(data))
                if not chunk:
                    break
                data += chunk
            return data

        reason = None
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                info, had_header = await read_proxy_header(peek, read)
        except (ValidationError, TimeoutError, ConnectionError, OSError) as exc:
            reason = f"bad_proxy_header: {exc}" if not isinstance(exc, TimeoutError) else (
                "proxy_header_timeout")
        else:
            if had_header and not trusted:
                reason = "proxy_header_from_untrusted_peer"
            elif trusted and not had_header:
                reason = "proxy_header_missing"
        if reason is not None:
            self.audit.from_source("connect_invalid", peer_ip=peer_ip, client_ip=peer_ip,
                                   listener=listener_name, reason=reason)
            return False, None
        return True, normalize_ip(info.src_ip) if info is not None else None


async def _readable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    """Until ``conn`` has something to read (or is at its end)."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(conn.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(conn.fileno())


def connection_info(listener_name: str, peer: tuple[str, int] | None,
                    trusted: TrustedProxies, proxied: str | None = None,
                    forwarded: list[str] | None = None) -> ConnectionInfo | None:
    """Who is connecting: ``proxied`` is the PROXY header's client (set only for trusted
    peers), ``forwarded`` the WebSocket upgrade's X-Forwarded-For values."""
    if peer is None:
        return None
    peer_ip = normalize_ip(str(peer[0])) or str(peer[0])
    if proxied is not None:
        client_ip = proxied
    elif forwarded:
        client_ip = client_ip_from_forwarded(peer_ip, forwarded, trusted)
    else:
        client_ip = peer_ip
    return ConnectionInfo(listener=listener_name, peer_ip=peer_ip, client_ip=client_ip)
