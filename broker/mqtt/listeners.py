"""Listeners: TCP/TLS and WebSocket servers, the PROXY protocol header, the client IP.

amqtt's ListenerConfig.apply() silently rewrote listener fields equal to its defaults,
required a "default" listener, and passed neither the WebSocket request headers nor the
listener's trust settings on; keybroker starts its listeners itself. The client IP is the
TCP peer, except from a trusted proxy: then the PROXY header (TCP/TLS listeners with
``proxy_protocol``) or the right-most untrusted X-Forwarded-For hop (WebSocket).
"""

from __future__ import annotations

import asyncio
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

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, str, bytes,
                          str | None], Awaitable[None]]
WebSocketHandler = Callable[..., Awaitable[None]]


async def start_listener(listener: Listener, settings: Settings, on_stream: StreamHandler,
                         on_websocket: WebSocketHandler, gate: ProxyGate) -> Server:
    """Bind and serve one listener. A port in use (1883 often is, by a local mosquitto),
    an unknown host or a bad certificate is a KeybrokerError naming the listener."""
    try:
        return await _start(listener, settings, on_stream, on_websocket, gate)
    except OSError as exc:
        raise bind_error(f"listener {listener.name!r}", listener.host, listener.port,
                         exc) from None


async def _start(listener: Listener, settings: Settings, on_stream: StreamHandler,
                 on_websocket: WebSocketHandler, gate: ProxyGate) -> Server:
    context = ssl_context(listener.certfile, listener.keyfile) if listener.tls else None
    if listener.type == "tcp":
        if listener.proxy_protocol:
            # The PROXY header precedes the TLS handshake: TLS starts after reading it.
            async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                accepted = await gate.accept(reader, writer, listener.name, context)
                if accepted is not None:
                    prefix, client_ip = accepted
                    await on_stream(reader, writer, listener.name, prefix, client_ip)

            handler: Any = accept
        else:
            handler = partial(_plain, on_stream, listener.name)
        instance: Any = await asyncio.start_server(
            handler, ssl=None if listener.proxy_protocol else context,
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


async def _plain(on_stream: StreamHandler, listener_name: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
    await on_stream(reader, writer, listener_name, b"", None)


class ProxyGate:
    """Reads the PROXY protocol header on listeners that expect one."""

    def __init__(self, trusted: TrustedProxies, settings: Settings, audit: AuditLog) -> None:
        self.trusted = trusted
        self.settings = settings
        self.audit = audit

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     listener_name: str, context: ssl.SSLContext | None,
                     ) -> tuple[bytes, str | None] | None:
        """(bytes read past the header, client IP from it) or None = connection refused.

        Only trusted proxies may send one (else it could spoof the client IP), and a
        trusted proxy must send one (else every client would look like the proxy)."""
        peer = writer.get_extra_info("peername")
        peer_ip = normalize_ip(str(peer[0])) if peer else None
        trusted = peer_ip is not None and self.trusted.contains(peer_ip)

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
            self.audit.from_source("connect_invalid", peer_ip=peer_ip, client_ip=peer_ip,
                                   listener=listener_name, reason=reason)
            writer.transport.abort()
            return None
        client_ip = normalize_ip(info.src_ip) if info is not None else None
        if context is not None:
            try:
                await writer.start_tls(context)
            except (ssl.SSLError, ConnectionError, OSError):
                writer.transport.abort()
                return None
        return leftover, client_ip


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
