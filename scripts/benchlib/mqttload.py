"""A small, fast MQTT 3.1.1 and 5.0 client for load generation (raw asyncio streams).

Only what the bench needs: CONNECT/CONNACK, SUBSCRIBE/SUBACK, PUBLISH (QoS 0/1/2) with
PUBACK or PUBREC/PUBREL/PUBCOMP both ways, PINGREQ, DISCONNECT. Packets are encoded once
and written in bursts; incoming bytes are split into frames by ``FrameBuffer`` without
copying more than one frame body at a time, so one process can push and count hundreds
of thousands of messages per second — faster than any broker under test.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Iterable

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14

PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"
MAX_REMAINING = 268_435_455


class MqttError(Exception):
    """Protocol violation, refused CONNECT, or a closed connection."""


class ConnectRefused(MqttError):
    def __init__(self, code: int) -> None:
        super().__init__(f"CONNACK return code {code}")
        self.code = code


def remaining_length(n: int) -> bytes:
    if not 0 <= n <= MAX_REMAINING:
        raise ValueError(f"remaining length {n} out of range")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("!H", len(raw)) + raw


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + remaining_length(len(body)) + body


def connect_packet(
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    *,
    keepalive: int = 60,
    clean_session: bool = True,
    protocol: int = 4,
    session_expiry: int = 0,
) -> bytes:
    """CONNECT of MQTT 3.1.1 (``protocol`` 4) or 5.0 (5: a Session Expiry Interval, or
    no property)."""
    flags = 0x02 if clean_session else 0
    payload = _utf8(client_id)
    if username is not None:
        flags |= 0x80
        payload += _utf8(username)
        if password is not None:
            flags |= 0x40
            payload += _utf8(password)
    header = _utf8("MQTT") + bytes([protocol, flags]) + struct.pack("!H", keepalive)
    if protocol == 5:
        header += (b"\x05\x11" + struct.pack("!I", session_expiry)) if session_expiry \
            else b"\x00"
    return _packet(CONNECT << 4, header + payload)


def subscribe_packet(packet_id: int, filters: Iterable[tuple[str, int]],
                     protocol: int = 4) -> bytes:
    body = struct.pack("!H", packet_id) + (b"\x00" if protocol == 5 else b"")
    for topic_filter, qos in filters:
        body += _utf8(topic_filter) + bytes([qos])
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def publish_packet(topic: str, payload: bytes, qos: int = 0, packet_id: int = 0, *,
                   retain: bool = False, protocol: int = 4) -> bytes:
    if qos not in (0, 1, 2):
        raise ValueError("QoS must be 0, 1 or 2")
    body = (_utf8(topic) + (struct.pack("!H", packet_id) if qos else b"")
            + (b"\x00" if protocol == 5 else b"") + payload)
    return _packet((PUBLISH << 4) | (qos << 1) | int(retain), body)


class QosPublisher:
    """PUBLISH QoS 1 or 2 packets for one topic/payload, differing only in the packet id
    (MQTT 5: an empty property list after it)."""

    def __init__(self, topic: str, payload: bytes, qos: int = 1, protocol: int = 4) -> None:
        head = _utf8(topic)
        props = b"\x00" if protocol == 5 else b""
        size = len(head) + 2 + len(props) + len(payload)
        self._prefix = bytes([(PUBLISH << 4) | (qos << 1)]) + remaining_length(size) + head
        self._payload = props + payload
        self._next = 0

    def next(self) -> bytes:
        self._next = self._next % 0xFFFF + 1
        return self._prefix + self._next.to_bytes(2, "big") + self._payload


def puback_packet(packet_id: int) -> bytes:
    return b"\x40\x02" + packet_id.to_bytes(2, "big")


def pubrec_packet(packet_id: int) -> bytes:
    return b"\x50\x02" + packet_id.to_bytes(2, "big")


def pubrel_packet(packet_id: int) -> bytes:
    return b"\x62\x02" + packet_id.to_bytes(2, "big")


def pubcomp_packet(packet_id: int) -> bytes:
    return b"\x70\x02" + packet_id.to_bytes(2, "big")


class FrameBuffer:
    """Accumulates bytes; ``frames()`` yields complete (type, flags, body) frames."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def frames(self) -> list[tuple[int, int, bytes]]:
        buf = self._buf
        out = []
        pos, end = 0, len(buf)
        while end - pos >= 2:
            first = buf[pos]
            byte = buf[pos + 1]
            if byte < 0x80:  # fast path: remaining length < 128
                length, i = byte, pos + 2
            else:
                length, mult, i = 0, 1, pos + 1
                while True:
                    if i >= end:
                        length = -1  # header incomplete
                        break
                    if i - pos > 4:
                        raise MqttError("malformed remaining length")
                    byte = buf[i]
                    i += 1
                    length += (byte & 0x7F) * mult
                    if byte < 0x80:
                        break
                    mult <<= 7
                if length < 0:
                    break
            if end - i < length:
                break  # body incomplete
            out.append((first >> 4, first & 0x0F, bytes(buf[i:i + length])))
            pos = i + length
        if pos:
            del buf[:pos]
        return out


def publish_fields(flags: int, body: bytes) -> tuple[str, int, int, bytes]:
    """(topic, qos, packet_id, payload) of a PUBLISH frame body."""
    tlen = int.from_bytes(body[:2], "big")
    topic = body[2:2 + tlen].decode("utf-8")
    qos = (flags >> 1) & 0x03
    pos = 2 + tlen
    packet_id = 0
    if qos:
        packet_id = int.from_bytes(body[pos:pos + 2], "big")
        pos += 2
    return topic, qos, packet_id, body[pos:]


class Client:
    """One MQTT connection. ``connect()`` returns CONNECT→CONNACK seconds."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.frames = FrameBuffer()
        self._pending: list[tuple[int, int, bytes]] = []
        self._packet_id = 0
        self.session_present = False
        self.protocol = 4  # set by connect()
        self.client_id = ""  # set by connect()

    async def connect(
        self,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        *,
        keepalive: int = 600,
        timeout: float = 10.0,
        clean_session: bool = True,
        source: str | None = None,
        protocol: int = 4,
    ) -> float:
        """CONNECT (from local address ``source`` when given, e.g. 127.0.0.7); returns
        the seconds from CONNECT written to CONNACK read. ``session_present`` is set."""
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=1 << 20,
                                    local_addr=(source, 0) if source else None), timeout
        )
        started = time.perf_counter()
        self.protocol, self.client_id = protocol, client_id
        self.writer.write(connect_packet(
            client_id, username, password, keepalive=keepalive, clean_session=clean_session,
            protocol=protocol, session_expiry=0 if clean_session else 86_400))
        ptype, _, body = await self.expect(CONNACK, timeout)
        elapsed = time.perf_counter() - started
        if len(body) < 2 or (protocol != 5 and len(body) != 2):
            raise MqttError(f"malformed CONNACK {body!r}")
        if body[1]:
            await self.close()
            raise ConnectRefused(body[1])
        self.session_present = bool(body[0] & 1)
        return elapsed

    def next_packet_id(self) -> int:
        self._packet_id = self._packet_id % 0xFFFF + 1
        return self._packet_id

    async def read_frames(self, timeout: float | None = None) -> list[tuple[int, int, bytes]]:
        """Frames already buffered, else wait for more bytes (empty list on timeout)."""
        if self._pending:
            out, self._pending = self._pending, []
            return out
        assert self.reader is not None
        while True:
            try:
                data = await asyncio.wait_for(self.reader.read(1 << 18), timeout)
            except TimeoutError:
                return []
            if not data:
                raise MqttError("connection closed by broker")
            self.frames.feed(data)
            out = self.frames.frames()
            if out:
                return out

    async def expect(self, ptype: int, timeout: float) -> tuple[int, int, bytes]:
        """Wait for the next frame of type ``ptype``; earlier frames of other types are
        kept for ``read_frames``."""
        deadline = time.monotonic() + timeout
        while True:
            for index, frame in enumerate(self._pending):
                if frame[0] == ptype:
                    del self._pending[index]
                    return frame
            left = deadline - time.monotonic()
            if left <= 0:
                raise MqttError(f"timed out waiting for packet type {ptype}")
            assert self.reader is not None
            try:
                data = await asyncio.wait_for(self.reader.read(1 << 18), left)
            except TimeoutError:
                continue
            if not data:
                raise MqttError(f"connection closed while waiting for packet type {ptype}")
            self.frames.feed(data)
            self._pending.extend(self.frames.frames())

    async def subscribe(
        self, filters: list[str], qos: int = 0, *, batch: int = 500, timeout: float = 60.0
    ) -> list[int]:
        """Subscribe in SUBSCRIBE packets of up to ``batch`` filters; returns the granted
        return codes in order. Sends every batch before reading the SUBACKs (pipelined)."""
        assert self.writer is not None
        sent: list[tuple[int, int]] = []
        for start in range(0, len(filters), batch):
            chunk = filters[start:start + batch]
            packet_id = self.next_packet_id()
            self.writer.write(subscribe_packet(packet_id, [(f, qos) for f in chunk],
                                               self.protocol))
            sent.append((packet_id, len(chunk)))
            if len(sent) % 20 == 0:
                await self.writer.drain()
        await self.writer.drain()
        granted: dict[int, bytes] = {}
        deadline = time.monotonic() + timeout
        while len(granted) < len(sent):
            _, _, body = await self.expect(SUBACK, max(0.01, deadline - time.monotonic()))
            codes_at = 2 + (1 + body[2] if self.protocol == 5 else 0)  # MQTT 5: properties
            granted[int.from_bytes(body[:2], "big")] = body[codes_at:]
        codes: list[int] = []
        for packet_id, count in sent:
            got = granted[packet_id]
            if len(got) != count:
                raise MqttError(f"SUBACK {packet_id} has {len(got)} codes for {count} filters")
            codes.extend(got)
        return codes

    def write(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)

    async def drain(self) -> None:
        assert self.writer is not None
        await self.writer.drain()

    async def disconnect(self) -> None:
        if self.writer is None:
            return
        try:
            self.writer.write(DISCONNECT_PACKET)
            await asyncio.wait_for(self.writer.drain(), 2)
        except (OSError, TimeoutError):
            pass
        await self.close()

    async def close(self) -> None:
        writer, self.writer = self.writer, None
        if writer is None:
            return
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 2)
        except (OSError, TimeoutError):
            pass
