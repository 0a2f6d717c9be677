"""Byte-level defences in front of amqtt's packet parser (spec §5, hardening).

``FramedReader`` reads one whole MQTT packet (fixed header + remaining length) before
amqtt sees any of it, so that:
  * a packet larger than ``max_packet_size`` closes the connection before its body is
    buffered (amqtt would read any announced length up to 256 MiB);
  * a packet, once started, must complete within ``packet_timeout`` seconds, so a
    slowloris writer cannot hold a connection half-way through a packet forever (the
    wait *between* packets is bounded by the keep-alive, enforced elsewhere). Rather
    than a timer per packet, the reader records when its current packet started and
    ``PacketWatchdog`` sweeps all open readers once a second;
  * a remaining length longer than 4 bytes is rejected at once.
It then serves amqtt's reads from that buffer, exactly like a stream.

``read_proxy_header`` reads an optional PROXY protocol v1/v2 header at the start of a
TCP connection (haproxy's proxy-protocol.txt) and returns what follows it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from amqtt.adapters import ReaderAdapter

from broker.clientip import (
    PROXY_V1_MAX,
    PROXY_V2_SIGNATURE,
    ProxyInfo,
    parse_proxy_v1,
    parse_proxy_v2,
    proxy_v2_length,
)
from broker.periodic import Periodic
from keystore.errors import ValidationError


class PacketError(Exception):
    """A packet that closes the connection (too large, malformed length, too slow)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class FramedReader(ReaderAdapter):
    def __init__(
        self,
        inner: ReaderAdapter,
        *,
        max_packet_size: int,
        packet_timeout: float,
        prefix: bytes = b"",
        on_violation: Callable[[PacketError], None] | None = None,
    ) -> None:
        self._inner = inner
        self._prefix = prefix
        self._max = max_packet_size
        self._timeout = packet_timeout
        self._buf = bytearray()
        self._pos = 0
        self._on_violation = on_violation
        self.packet_started: float | None = None  # loop time of the current packet's 1st byte
        self._reading: asyncio.Task[Any] | None = None

    async def read(self, n: int = -1) -> bytes:
        if n < 0:  # amqtt never reads "everything"; keep the adapter contract anyway
            n = max(len(self._buf) - self._pos, 1)
        while len(self._buf) - self._pos < n:
            if not await self._next_packet():
                break
        data = bytes(self._buf[self._pos : self._pos + n])
        self._pos += len(data)
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        return data

    def feed_eof(self) -> None:
        self._inner.feed_eof()

    async def _raw(self, n: int) -> bytes:
        if self._prefix:
            head, self._prefix = self._prefix[:n], self._prefix[n:]
            if len(head) == n:
                return head
            return head + await self._raw_inner(n - len(head))
        return await self._raw_inner(n)

    async def _raw_inner(self, n: int) -> bytes:
        try:
            data: bytes = await self._inner.read(n)
            return data
        except asyncio.IncompleteReadError as exc:
            return exc.partial

    async def _next_packet(self) -> bool:
        first = await self._raw(1)  # idle wait: bounded by keep-alive / connect timeout
        if not first:
            return False
        self.packet_started = asyncio.get_running_loop().time()
        self._reading = asyncio.current_task()
        try:
            packet = await self._rest_of_packet(first)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self.packet_started is None and task is not None:  # cancelled by the watchdog
                task.uncancel()  # the cancellation becomes this error, not a task cancel
                self._violation(
                    PacketError("slow_packet", f"not completed in {self._timeout:g}s"))
            raise
        finally:
            self._reading = None
        self.packet_started = None
        if packet is None:
            return False
        self._buf += packet
        return True

    def expire(self, now: float) -> bool:
        """Called by the watchdog: stop a packet that has taken too long. True if stopped."""
        started, task = self.packet_started, self._reading
        if started is None or task is None or now - started <= self._timeout:
            return False
        self.packet_started = None
        task.cancel()
        return True

    async def _rest_of_packet(self, first: bytes) -> bytes | None:
        header = bytearray(first)
        length = 0
        for shift in (0, 7, 14, 21):
            byte = await self._raw(1)
            if not byte:
                return None
            header += byte
            length |= (byte[0] & 0x7F) << shift
            if byte[0] < 0x80:
                break
        else:
            self._violation(PacketError("malformed_length", "remaining length over 4 bytes"))
        total = len(header) + length
        if total > self._max:
            self._violation(PacketError("packet_too_large",
                                        f"{total} bytes, limit {self._max}"))
        body = await self._raw(length) if length else b""
        if len(body) < length:
            return None
        problem = packet_problem(first[0], body)
        if problem is not None:
            self._violation(PacketError("malformed_packet", problem))
        return bytes(header) + body

    def _violation(self, error: PacketError) -> None:
        if self._on_violation is not None:
            self._on_violation(error)
        raise error


def _string_at(body: bytes, offset: int) -> tuple[str, int]:
    """An MQTT UTF-8 string at ``offset``: strictly valid, no U+0000 (MQTT-1.5.3-1/2)."""
    if offset + 2 > len(body):
        raise ValueError("string length beyond the packet")
    size = int.from_bytes(body[offset : offset + 2], "big")
    end = offset + 2 + size
    if end > len(body):
        raise ValueError("string beyond the packet")
    text = body[offset + 2 : end].decode("utf-8")  # strict: rejects surrogates too
    if "\x00" in text:
        raise ValueError("NUL in a string")
    return text, end


def packet_problem(first: int, body: bytes) -> str | None:
    """What makes a complete packet unacceptable before amqtt parses it, or None.

    amqtt discards a PUBLISH with a wildcard topic *after* reading only its topic (the
    payload is then parsed as the next packet) and turns invalid UTF-8 into "b'...'"
    strings; MQTT-1.5.3-1 says such a connection is closed. Checked here on whole packets.
    """
    kind = first >> 4
    try:
        if kind in (0, 15):
            return f"reserved packet type {kind}"
        if kind == 3:  # PUBLISH
            topic, _ = _string_at(body, 0)
            if not topic or "+" in topic or "#" in topic:
                return f"invalid_topic {topic!r} in PUBLISH"
        elif kind in (8, 10):  # SUBSCRIBE, UNSUBSCRIBE: packet id, then filters
            offset = 2
            while offset < len(body):
                _, offset = _string_at(body, offset)
                if kind == 8:  # requested QoS: 0-2, upper bits zero (MQTT-3.8.3-4)
                    if offset >= len(body) or body[offset] > 2:
                        return "invalid requested QoS in SUBSCRIBE"
                    offset += 1
            if offset == 2:
                return "no topic filter"
        elif kind == 1:  # CONNECT: strings after the 10-byte variable header
            if len(body) < 10:
                return "truncated CONNECT"
            flags, offset = body[7], 10
            _, offset = _string_at(body, offset)  # client id
            if flags & 0x04:
                _, offset = _string_at(body, offset)  # will topic
                offset += 2 + int.from_bytes(body[offset : offset + 2], "big")  # will message
            if flags & 0x80:
                _, offset = _string_at(body, offset)  # username (password is binary)
    except (ValueError, UnicodeDecodeError) as exc:
        return f"bad string: {exc}"
    return None


class PacketWatchdog(Periodic):
    """One sweep a second over the open FramedReaders (instead of a timer per packet)."""

    name = "keybroker-packet-watchdog"

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__(interval)
        self.readers: set[FramedReader] = set()

    async def tick(self) -> None:
        now = asyncio.get_running_loop().time()
        for reader in list(self.readers):
            reader.expire(now)


async def read_proxy_header(
    read: Callable[[int], Awaitable[bytes]],
) -> tuple[ProxyInfo | None, bool, bytes]:
    """Read a PROXY header if the stream starts with one.

    Returns (info, had_header, leftover): ``info`` is None for LOCAL/UNKNOWN headers or
    when there is no header; ``leftover`` holds bytes read that belong to MQTT.
    ``read(n)`` must return exactly n bytes or fewer at EOF.
    """
    first: bytes = await read(1)
    if first == b"P":
        line = bytearray(first)
        while not line.endswith(b"\r\n"):
            if len(line) >= PROXY_V1_MAX:
                raise ValidationError("invalid PROXY v1 header: no CRLF within 107 bytes")
            byte: bytes = await read(1)
            if not byte:
                raise ValidationError("invalid PROXY v1 header: truncated")
            line += byte
        return parse_proxy_v1(bytes(line)), True, b""
    if first == PROXY_V2_SIGNATURE[:1]:
        head = first + await read(15)
        if not head.startswith(PROXY_V2_SIGNATURE):
            raise ValidationError("invalid PROXY v2 header: bad signature")
        total = proxy_v2_length(head)
        rest: bytes = await read(total - len(head))
        return parse_proxy_v2(head + rest), True, b""
    return None, False, first
