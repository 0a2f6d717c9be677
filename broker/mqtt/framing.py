"""Byte-level defences in front of packet parsing (docs: limits).

``FramedReader`` reads one whole MQTT packet (fixed header + remaining length) before
anything parses it, so that:
  * a packet larger than ``max_packet_size`` closes the connection before its body is
    buffered (amqtt would read any announced length up to 256 MiB);
  * a packet, once started, must complete within ``packet_timeout`` seconds, so a
    slowloris writer cannot hold a connection half-way through a packet forever (the
    wait *between* packets is bounded by the keep-alive, below). Rather than a timer
    per packet, the reader records when its current packet started and
    ``PacketWatchdog`` sweeps all open readers once a second;
  * a remaining length longer than 4 bytes is rejected at once;
  * a connection silent for longer than its limit (the CONNECT timeout, then 1.5 x
    the keep-alive) is ended by the same sweep.

``read_proxy_header`` reads an optional PROXY protocol v1/v2 header at the start of a
TCP connection (haproxy's proxy-protocol.txt) and returns what follows it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from amqtt.adapters import ReaderAdapter

from broker.core.clientip import (
    PROXY_V1_MAX,
    PROXY_V2_SIGNATURE,
    ProxyInfo,
    parse_proxy_v1,
    parse_proxy_v2,
    proxy_v2_length,
)
from broker.core.periodic import Periodic
from broker.mqtt.codec import REQUIRED_FLAGS
from keystore.errors import ValidationError
from keystore.topics import is_topic_name


class PacketError(Exception):
    """A packet that closes the connection (too large, malformed length, too slow)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class FramedReader:
    """Whole packets from a connection's byte stream, as (first byte, body)."""

    __slots__ = ("_read", "_prefix", "_max", "_timeout", "_on_violation", "_on_expire",
                 "idle_limit", "last_packet", "packet_started", "held_back", "version")

    def __init__(
        self,
        inner: ReaderAdapter | asyncio.StreamReader,
        *,
        max_packet_size: int,
        packet_timeout: float,
        idle_limit: float = 0.0,
        prefix: bytes = b"",
        on_violation: Callable[[PacketError], None] | None = None,
        on_expire: Callable[[str], None] | None = None,
    ) -> None:
        # Read exactly n bytes (fewer at the end of the stream). A TCP stream is read
        # directly: no adapter object, and no extra coroutine frame held while idle.
        self._read: Callable[[int], Awaitable[bytes]] = (
            inner.readexactly if isinstance(inner, asyncio.StreamReader) else inner.read)
        self._prefix = prefix
        self._max = max_packet_size
        self._timeout = packet_timeout
        self._on_violation = on_violation
        self._on_expire = on_expire
        # Seconds without a packet after which the watchdog ends the connection (the
        # CONNECT timeout at first, then the keep-alive; 0 = no limit).
        self.idle_limit = idle_limit
        self.last_packet = asyncio.get_running_loop().time()
        self.packet_started: float | None = None  # loop time of the current packet's 1st byte
        self.held_back = False  # not read by the broker's choice (backpressure): not idle
        self.version = 4  # the connection's protocol level, once its CONNECT is accepted

    async def packet(self) -> tuple[int, bytes] | None:
        """The next whole packet, or None at the end of the stream. Raises PacketError
        (after reporting it to ``on_violation``) for a packet that closes the connection."""
        first = await self._raw(1)  # idle wait: bounded by the keep-alive (watchdog)
        if not first:
            return None
        loop_time = asyncio.get_running_loop().time
        self.packet_started = loop_time()
        try:
            packet = await self._rest_of_packet(first[0])
        finally:
            self.packet_started = None
        self.last_packet = loop_time()
        return packet

    def expire(self, now: float) -> str | None:
        """Called by the watchdog: the reason to end this connection now, if any (reported
        to ``on_expire``, which closes the connection)."""
        started = self.packet_started
        if started is not None:
            if now - started <= self._timeout:
                return None
            self.packet_started = None
            reason = "slow_packet"
            self._report(PacketError(reason, f"not completed in {self._timeout:g}s"))
        elif self.idle_limit and not self.held_back and now - self.last_packet > self.idle_limit:
            reason = "idle"
        else:
            return None
        if self._on_expire is not None:
            self._on_expire(reason)
        return reason

    async def _raw(self, n: int) -> bytes:
        head = b""
        if self._prefix:
            head, self._prefix = self._prefix[:n], self._prefix[n:]
            if len(head) == n:
                return head
            n -= len(head)
        try:
            data = await self._read(n)
        except asyncio.IncompleteReadError as exc:
            data = exc.partial
        except (ConnectionError, OSError):
            data = b""
        return head + data if head else data

    async def _rest_of_packet(self, first: int) -> tuple[int, bytes] | None:
        length = 0
        for shift in (0, 7, 14, 21):
            byte = await self._raw(1)
            if not byte:
                return None
            length |= (byte[0] & 0x7F) << shift
            if byte[0] < 0x80:
                break
        else:
            self._violation(PacketError("malformed_length", "remaining length over 4 bytes"))
        total = 1 + (shift // 7 + 1) + length
        if total > self._max:
            self._violation(PacketError("packet_too_large",
                                        f"{total} bytes, limit {self._max}"))
        body = await self._raw(length) if length else b""
        if len(body) < length:
            return None
        problem = packet_problem(first, body, self.version)
        if problem is not None:
            self._violation(PacketError("malformed_packet", problem))
        return first, body

    def _report(self, error: PacketError) -> None:
        if self._on_violation is not None:
            self._on_violation(error)

    def _violation(self, error: PacketError) -> None:
        self._report(error)
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


def packet_problem(first: int, body: bytes, version: int = 4) -> str | None:
    """What makes a complete packet unacceptable before it is parsed, or None.

    amqtt discarded a PUBLISH with a wildcard topic *after* reading only its topic (the
    payload was then parsed as the next packet) and turned invalid UTF-8 into "b'...'"
    strings; MQTT-1.5.3-1 says such a connection is closed. Checked here on whole packets,
    with the fixed-header flags each packet type must carry (MQTT-2.2.2-2, MQTT-3.3.1-4).
    """
    kind = first >> 4
    try:
        if kind == 0 or (kind == 15 and version != 5):
            return f"reserved packet type {kind}"
        required = REQUIRED_FLAGS.get(kind)
        if required is not None and first & 0x0F != required:
            return f"invalid flags {first & 0x0F:#06b} on packet type {kind}"
        if version == 5:
            # MQTT 5 packets carry properties between their fields (and a PUBLISH topic
            # may be empty, with a Topic Alias): their own parser checks every string.
            return "PUBLISH with QoS 3" if kind == 3 and (first >> 1) & 3 == 3 else None
        if kind == 3:  # PUBLISH
            if (first >> 1) & 3 == 3:
                return "PUBLISH with QoS 3"
            topic, _ = _string_at(body, 0)
            if not is_topic_name(topic):
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
        # CONNECT (3.1.1 or 5.0) is checked whole by its parser (codec.parse_connect).
    except (ValueError, UnicodeDecodeError) as exc:
        return f"bad string: {exc}"
    return None


class PacketWatchdog(Periodic):
    """One sweep a second over the open FramedReaders (instead of a timer per packet and
    per connection): ends packets that take too long and connections silent too long."""

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
