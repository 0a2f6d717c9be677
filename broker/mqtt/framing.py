"""Byte-level defences in front of packet parsing (docs: limits).

``Framer`` cuts whole MQTT packets (fixed header + remaining length) out of what a
connection reads before anything parses them, so that:
  * a packet larger than ``max_packet_size`` closes the connection as soon as its
    length is read, before its body is kept (amqtt would read any announced length up
    to 256 MiB);
  * a packet, once started, must complete within ``packet_timeout`` seconds, so a
    slowloris writer cannot hold a connection half-way through a packet forever (the
    wait *between* packets is bounded by the keep-alive, below). Rather than a timer
    per packet, the framer records when its current packet started and
    ``PacketWatchdog`` sweeps all open framers once a second;
  * a remaining length longer than 4 bytes is rejected at once;
  * a connection silent for longer than its limit (the CONNECT timeout, then 1.5 x
    the keep-alive) is ended by the same sweep.

``read_proxy_header`` reads an optional PROXY protocol v1/v2 header at the start of a
TCP connection (haproxy's proxy-protocol.txt), and nothing that follows it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

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


class Framer:
    """Whole packets out of a connection's bytes as they arrive, as (first byte, body).

    ``feed`` takes what the transport read; ``next`` returns the next whole packet (its
    size, strings and flags checked) or None until more bytes come. Nothing is copied
    for packets that arrive whole: the chunk read is kept as it is and each body is one
    slice of it. Only the bytes of an incomplete packet stay between reads."""

    __slots__ = ("_data", "_pos", "_more", "_more_bytes", "_need", "_max", "_timeout",
                 "_on_violation", "_on_expire", "idle_limit", "last_packet",
                 "packet_started", "held_back", "version", "publish_parsed")

    def __init__(
        self,
        *,
        max_packet_size: int,
        packet_timeout: float,
        idle_limit: float = 0.0,
        on_violation: Callable[[PacketError], None] | None = None,
        on_expire: Callable[[str], None] | None = None,
    ) -> None:
        self._data = b""  # read and not consumed from _pos on
        self._pos = 0
        # Chunks of a large packet still incomplete, joined once it is whole (None: none).
        self._more: list[bytes] | None = None
        self._more_bytes = 0
        self._need = 0  # bytes from _pos the packet in progress needs (0: not known yet)
        self._max = max_packet_size
        self._timeout = packet_timeout
        self._on_violation = on_violation
        self._on_expire = on_expire
        # Seconds without a byte after which the watchdog ends the connection (the
        # CONNECT timeout at first, then the keep-alive; 0 = no limit).
        self.idle_limit = idle_limit
        self.last_packet = asyncio.get_running_loop().time()
        self.packet_started: float | None = None  # loop time an incomplete packet was seen
        self.held_back = False  # not read by the broker's choice (backpressure): not idle
        self.version = 4  # the connection's protocol level, once its CONNECT is accepted
        # A connected client's PUBLISH is checked by its parser, which decodes its topic
        # anyway (codec.parse_publish, parse_publish5), not twice.
        self.publish_parsed = False

    def feed(self, data: bytes) -> None:
        """Bytes read from the connection, in order."""
        self.last_packet = asyncio.get_running_loop().time()
        if self._pos >= len(self._data):  # nothing pending: keep the chunk as it is
            self._data, self._pos = data, 0
            return
        if self._need:
            have = len(self._data) - self._pos + self._more_bytes + len(data)
            if have < self._need:  # still incomplete: joined once, when whole
                if self._more is None:
                    self._more = []
                self._more.append(data)
                self._more_bytes += len(data)
                return
        more = b"".join(self._more) if self._more else b""
        self._data = self._data[self._pos:] + more + data
        self._pos, self._more, self._more_bytes = 0, None, 0

    @property
    def pending(self) -> int:
        """Bytes read that no packet returned yet holds."""
        return len(self._data) - self._pos + self._more_bytes

    def next(self) -> tuple[int, bytes] | None:
        """The next whole packet, or None until more bytes are fed. Raises PacketError
        (after reporting it to ``on_violation``) for a packet that closes the connection."""
        data, pos = self._data, self._pos
        size = len(data)
        if self._more is not None or pos + 2 > size:
            self._incomplete(data, pos, size)
            return None
        length = data[pos + 1]
        start = pos + 2
        if length >= 0x80:
            length &= 0x7F
            shift = 7
            while True:
                if start >= size:
                    self._incomplete(data, pos, size)
                    return None
                byte = data[start]
                start += 1
                length |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
                if shift == 28:
                    self._violation(PacketError("malformed_length",
                                                "remaining length over 4 bytes"))
        total = start - pos + length
        if total > self._max:
            self._violation(PacketError("packet_too_large", f"{total} bytes, limit {self._max}"))
        end = start + length
        if end > size:
            self._need = total
            self._incomplete(data, pos, size)
            return None
        first = data[pos]
        body = data[start:end]
        if end == size:
            self._data, self._pos = b"", 0  # the chunk is not kept past its packets
        else:
            self._pos = end
        self._need = 0
        self.packet_started = None
        if first >> 4 != 3 or not self.publish_parsed:
            problem = packet_problem(first, body, self.version)
            if problem is not None:
                self._violation(PacketError("malformed_packet", problem))
        return first, body

    def _incomplete(self, data: bytes, pos: int, size: int) -> None:
        """No whole packet left: keep only the bytes of the one in progress."""
        if pos >= size:
            self._data, self._pos = b"", 0
            return
        if pos:
            self._data, self._pos = data[pos:], 0
        if self.packet_started is None:
            self.packet_started = asyncio.get_running_loop().time()

    def expire(self, now: float) -> str | None:
        """Called by the watchdog: the reason to end this connection now, if any (reported
        to ``on_expire``, which closes the connection). Neither limit runs while the
        broker itself does not read the connection (``held_back``)."""
        if self.held_back:
            return None
        started = self.packet_started
        if started is not None:
            if now - started <= self._timeout:
                return None
            self.packet_started = None
            reason = "slow_packet"
            self._report(PacketError(reason, f"not completed in {self._timeout:g}s"))
        elif self.idle_limit and now - self.last_packet > self.idle_limit:
            reason = "idle"
        else:
            return None
        if self._on_expire is not None:
            self._on_expire(reason)
        return reason

    def reading_again(self) -> None:
        """The broker reads the connection again after holding it back: the limits start
        over (the client was not the one waiting)."""
        now = asyncio.get_running_loop().time()
        self.held_back = False
        self.last_packet = now
        if self.packet_started is not None:
            self.packet_started = now

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
    """One sweep a second over the open connections' Framers (instead of a timer per
    packet and per connection): ends packets that take too long and connections silent
    too long."""

    name = "keybroker-packet-watchdog"

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__(interval)
        self.framers: set[Framer] = set()

    async def tick(self) -> None:
        now = asyncio.get_running_loop().time()
        for framer in list(self.framers):
            framer.expire(now)


async def read_proxy_header(
    peek: Callable[[], Awaitable[bytes]],
    read: Callable[[int], Awaitable[bytes]],
) -> tuple[ProxyInfo | None, bool]:
    """Read a PROXY header if the stream starts with one, and not one byte more.

    Returns (info, had_header): ``info`` is None for LOCAL/UNKNOWN headers or when there
    is no header. ``peek()`` returns the stream's first byte without consuming it (b"" at
    its end); ``read(n)`` consumes exactly n bytes, or fewer at its end.
    """
    first = await peek()
    if first == b"P":
        line = bytearray()
        while not line.endswith(b"\r\n"):
            if len(line) >= PROXY_V1_MAX:
                raise ValidationError("invalid PROXY v1 header: no CRLF within 107 bytes")
            byte: bytes = await read(1)
            if not byte:
                raise ValidationError("invalid PROXY v1 header: truncated")
            line += byte
        return parse_proxy_v1(bytes(line)), True
    if first == PROXY_V2_SIGNATURE[:1]:
        head = await read(16)
        if not head.startswith(PROXY_V2_SIGNATURE):
            raise ValidationError("invalid PROXY v2 header: bad signature")
        total = proxy_v2_length(head)
        rest: bytes = await read(total - len(head))
        return parse_proxy_v2(head + rest), True
    return None, False
