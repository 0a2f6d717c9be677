"""Whole-packet reading and the byte-level checks in front of parsing
(broker.mqtt.framing): FramedReader on StreamReaders fed bytes, its limits and the
watchdog's expiry; packet_problem on every rule; the PROXY header at a connection's start."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from broker.core.clientip import PROXY_V2_SIGNATURE, ProxyInfo
from broker.mqtt.framing import (
    FramedReader,
    PacketError,
    PacketWatchdog,
    packet_problem,
    read_proxy_header,
)
from keystore.errors import ValidationError
from tests.support.waiting import async_wait_until


def u16(value: int) -> bytes:
    return struct.pack("!H", value)


def string(data: str | bytes) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return u16(len(raw)) + raw


def stream(data: bytes = b"", *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


class Seen:
    """What a FramedReader reported: violations and expiries."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.expired: list[str] = []

    def reader(self, inner: object, **options: object) -> FramedReader:
        settings: dict[str, object] = {"max_packet_size": 1024, "packet_timeout": 10.0}
        settings.update(options)
        return FramedReader(inner, on_violation=lambda e: self.violations.append(e.reason),  # type: ignore[arg-type]
                            on_expire=self.expired.append, **settings)  # type: ignore[arg-type]


PINGREQ = b"\xc0\x00"
LONG_PUBLISH = b"\x30" + b"\xc8\x01" + string("a/b") + b"x" * 195  # 200-byte body


# ------------------------------------------------------------------ FramedReader

async def test_packets_are_read_whole_one_after_another_then_none_at_the_end() -> None:
    subscribe = b"\x82" + bytes([2 + 5 + 1]) + u16(7) + string("a/#") + b"\x01"
    framed = Seen().reader(stream(PINGREQ + LONG_PUBLISH + subscribe))
    assert await framed.packet() == (0xC0, b"")
    assert await framed.packet() == (0x30, LONG_PUBLISH[3:])
    assert await framed.packet() == (0x82, subscribe[2:])
    assert await framed.packet() is None


async def test_a_packet_arriving_in_pieces_is_one_packet_timed_from_its_first_byte() -> None:
    inner = stream(eof=False)
    framed = Seen().reader(inner)
    reading = asyncio.ensure_future(framed.packet())
    assert framed.packet_started is None  # waiting between packets is not a packet
    inner.feed_data(LONG_PUBLISH[:1])
    await async_wait_until(lambda: framed.packet_started is not None)
    for offset in range(1, len(LONG_PUBLISH), 50):
        inner.feed_data(LONG_PUBLISH[offset:offset + 50])
    assert await reading == (0x30, LONG_PUBLISH[3:])
    assert framed.packet_started is None


@pytest.mark.parametrize("cut", [1, 2, 3, 50], ids=["after-type", "mid-length",
                                                     "after-length", "mid-body"])
async def test_the_end_of_the_stream_inside_a_packet_is_the_end(cut: int) -> None:
    seen = Seen()
    assert await seen.reader(stream(LONG_PUBLISH[:cut])).packet() is None
    assert seen.violations == []


async def test_a_packet_over_the_size_limit_is_refused_before_its_body_arrives() -> None:
    seen = Seen()
    inner = stream(b"\x30\xe8\x07", eof=False)  # announces 1,000 bytes; none of them sent
    framed = seen.reader(inner, max_packet_size=1000)
    with pytest.raises(PacketError, match="1003 bytes, limit 1000") as raised:
        await asyncio.wait_for(framed.packet(), 5)
    assert raised.value.reason == "packet_too_large"
    assert seen.violations == ["packet_too_large"]


async def test_the_size_limit_counts_the_whole_packet_header_included() -> None:
    body = string("t") + b"x" * 97  # 100 bytes: 1 + 1 + 100 = 102 in all
    framed = Seen().reader(stream(b"\x30\x64" + body), max_packet_size=102)
    assert await framed.packet() == (0x30, body)
    with pytest.raises(PacketError, match="102 bytes, limit 101"):
        await Seen().reader(stream(b"\x30\x64" + body), max_packet_size=101).packet()


async def test_a_remaining_length_of_five_bytes_is_refused() -> None:
    seen = Seen()
    with pytest.raises(PacketError) as raised:
        await seen.reader(stream(b"\x30\xff\xff\xff\xff\x01")).packet()
    assert raised.value.reason == "malformed_length"
    assert seen.violations == ["malformed_length"]


async def test_a_whole_packet_that_breaks_a_rule_is_refused_with_the_rule() -> None:
    seen = Seen()
    with pytest.raises(PacketError, match="invalid_topic") as raised:
        await seen.reader(stream(b"\x30\x05" + string("a/#"))).packet()
    assert raised.value.reason == "malformed_packet"
    assert seen.violations == ["malformed_packet"]


async def test_bytes_already_read_are_read_first() -> None:
    """After a PROXY check the first MQTT byte has been read: it is the prefix."""
    framed = Seen().reader(stream(b"\x00" + PINGREQ), prefix=b"\xc0")
    assert await framed.packet() == (0xC0, b"")
    assert await framed.packet() == (0xC0, b"")
    assert await framed.packet() is None


class Adapter:
    """amqtt's ReaderAdapter (WebSocket): ``read(n)`` gives at most n bytes."""

    def __init__(self, data: bytes, error: Exception | None = None) -> None:
        self.data, self.error = data, error

    async def read(self, n: int) -> bytes:
        if not self.data and self.error is not None:
            raise self.error
        out, self.data = self.data[:n], self.data[n:]
        return out


async def test_an_adapter_is_read_like_a_stream() -> None:
    framed = Seen().reader(Adapter(PINGREQ + LONG_PUBLISH))
    assert await framed.packet() == (0xC0, b"")
    assert await framed.packet() == (0x30, LONG_PUBLISH[3:])
    assert await framed.packet() is None


async def test_a_connection_error_while_reading_is_the_end_of_the_stream() -> None:
    framed = Seen().reader(Adapter(LONG_PUBLISH[:10], ConnectionResetError()))
    assert await framed.packet() is None


# ------------------------------------------------------------------ expiry (the watchdog)

async def test_a_packet_not_completed_within_the_packet_timeout_expires() -> None:
    seen = Seen()
    inner = stream(LONG_PUBLISH[:10], eof=False)
    framed = seen.reader(inner, packet_timeout=2.0)
    reading = asyncio.ensure_future(framed.packet())
    started = await async_wait_until(lambda: framed.packet_started)
    assert framed.expire(started + 2.0) is None  # not past it yet
    assert seen.expired == []
    assert framed.expire(started + 2.01) == "slow_packet"
    assert seen.expired == ["slow_packet"] and seen.violations == ["slow_packet"]
    assert framed.expire(started + 10) is None  # reported once
    reading.cancel()
    await asyncio.gather(reading, return_exceptions=True)


async def test_a_connection_silent_past_its_idle_limit_expires_unless_held_back() -> None:
    seen = Seen()
    framed = seen.reader(stream(eof=False), idle_limit=5.0)
    last = framed.last_packet
    assert framed.expire(last + 5.0) is None
    framed.held_back = True  # not read by the broker's choice: not the client's silence
    assert framed.expire(last + 60) is None
    framed.held_back = False
    assert framed.expire(last + 5.01) == "idle"
    assert seen.expired == ["idle"] and seen.violations == []


async def test_without_an_idle_limit_silence_never_expires() -> None:
    seen = Seen()
    framed = seen.reader(stream(eof=False))
    assert framed.expire(framed.last_packet + 1e9) is None
    assert seen.expired == []


async def test_reading_a_packet_resets_the_idle_clock() -> None:
    inner = stream(eof=False)
    framed = Seen().reader(inner, idle_limit=5.0)
    framed.last_packet -= 100  # silent for long ...
    inner.feed_data(PINGREQ)
    await framed.packet()  # ... until now
    assert framed.expire(asyncio.get_running_loop().time() + 4.0) is None


async def test_the_watchdog_sweeps_every_reader_it_holds() -> None:
    seen = Seen()
    quiet, busy = (seen.reader(stream(eof=False), idle_limit=1.0) for _ in range(2))
    quiet.last_packet -= 10
    watchdog = PacketWatchdog()
    watchdog.readers.update({quiet, busy})
    await watchdog.tick()
    assert seen.expired == ["idle"]  # the quiet one only


# ------------------------------------------------------------------ packet_problem

def connect_body(flags: int, *fields: bytes) -> bytes:
    return string("MQTT") + bytes([4, flags]) + u16(30) + b"".join(fields)


VALID = {
    "pingreq": (0xC0, b""),
    "publish": (0x30, string("a/b") + b"payload"),
    "publish-qos2-retain-dup": (0x3D, string("a/b") + u16(1)),
    "puback": (0x40, u16(1)),
    "pubrel": (0x62, u16(1)),
    "subscribe": (0x82, u16(1) + string("a/#") + b"\x02" + string("+/b") + b"\x00"),
    "unsubscribe": (0xA2, u16(1) + string("a/#")),
    "disconnect": (0xE0, b""),
    "connect": (0x10, connect_body(0x02, string("dev"))),
}


@pytest.mark.parametrize(("first", "body"), VALID.values(), ids=VALID.keys())
def test_well_formed_packets_have_no_problem(first: int, body: bytes) -> None:
    assert packet_problem(first, body) is None


INVALID = {
    "reserved-type-0": (0x00, b"", "reserved packet type 0"),
    "reserved-type-15": (0xF0, b"", "reserved packet type 15"),
    "pubrel-flags-0": (0x60, u16(1), "invalid flags 0b0000 on packet type 6"),
    "puback-flags": (0x42, u16(1), "invalid flags 0b0010 on packet type 4"),
    "subscribe-flags-0": (0x80, u16(1) + string("a") + b"\x00", "invalid flags"),
    "unsubscribe-flags": (0xA0, u16(1) + string("a"), "invalid flags"),
    "pingreq-flags": (0xC1, b"", "invalid flags"),
    "publish-qos-3": (0x36, string("a") + u16(1), "QoS 3"),
    "publish-empty-topic": (0x30, string(""), "invalid_topic ''"),
    "publish-plus": (0x30, string("a/+"), "invalid_topic"),
    "publish-hash": (0x30, string("#"), "invalid_topic"),
    "publish-nul": (0x30, string("a\x00b"), "NUL"),
    "publish-bad-utf8": (0x30, string(b"a\xff"), "bad string"),
    "publish-surrogate": (0x30, string(b"\xed\xa0\x80"), "bad string"),
    "publish-topic-beyond": (0x30, u16(10) + b"abc", "string beyond the packet"),
    "publish-no-topic": (0x30, b"\x00", "string length beyond"),
    "subscribe-qos-3": (0x82, u16(1) + string("a") + b"\x03", "invalid requested QoS"),
    "subscribe-upper-bits": (0x82, u16(1) + string("a") + b"\x81", "invalid requested QoS"),
    "subscribe-no-qos": (0x82, u16(1) + string("a"), "invalid requested QoS"),
    "subscribe-no-filter": (0x82, u16(1), "no topic filter"),
    "subscribe-bad-utf8": (0x82, u16(1) + string(b"\xc3") + b"\x00", "bad string"),
    "unsubscribe-no-filter": (0xA2, u16(1), "no topic filter"),
}


@pytest.mark.parametrize(("first", "body", "problem"), INVALID.values(), ids=INVALID.keys())
def test_each_rule_names_its_problem(first: int, body: bytes, problem: str) -> None:
    """CONNECT is checked whole by its parser (test_codec)."""
    found = packet_problem(first, body)
    assert found is not None and problem in found, found


def test_mqtt5_packets_are_checked_for_their_type_and_flags_only() -> None:
    """MQTT 5 fields carry properties between them, which its parsers check: here only
    what the fixed header says. AUTH (type 15) exists in MQTT 5 only; a PUBLISH may have
    an empty topic there (a Topic Alias stands for it)."""
    assert packet_problem(0xF0, b"\x00", version=5) is None
    assert packet_problem(0x30, string("") + b"\x00", version=5) is None
    assert packet_problem(0x30, string(""), version=4) is not None
    assert packet_problem(0x00, b"", version=5) == "reserved packet type 0"
    assert packet_problem(0x60, u16(1), version=5) == "invalid flags 0b0000 on packet type 6"
    assert packet_problem(0x36, string("a") + u16(1), version=5) == "PUBLISH with QoS 3"


async def test_a_reader_checks_packets_by_its_connections_protocol() -> None:
    framed = Seen().reader(stream(b"\xf0\x00" * 2))
    framed.version = 5
    assert await framed.packet() == (0xF0, b"")
    framed.version = 4
    with pytest.raises(PacketError, match="reserved packet type 15"):
        await framed.packet()


# ------------------------------------------------------------------ PROXY header

def reading(data: bytes) -> tuple[asyncio.StreamReader, object]:
    inner = stream(data)

    async def read(n: int) -> bytes:
        try:
            return await inner.readexactly(n)
        except asyncio.IncompleteReadError as exc:
            return exc.partial

    return inner, read


def v2(command: int, addresses: bytes = b"", family: int = 0x11) -> bytes:
    return PROXY_V2_SIGNATURE + bytes([0x20 | command, family]) + u16(len(addresses)) + \
        addresses


CONNECT = b"\x10\x0c" + connect_body(0x02)


async def test_no_header_gives_back_the_first_byte_read() -> None:
    inner, read = reading(CONNECT)
    assert await read_proxy_header(read) == (None, False, CONNECT[:1])  # type: ignore[arg-type]
    assert await inner.read() == CONNECT[1:]


async def test_a_v1_header_gives_the_client_address_and_leaves_mqtt_unread() -> None:
    inner, read = reading(b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 1883\r\n" + CONNECT)
    info = await read_proxy_header(read)  # type: ignore[arg-type]
    assert info == (ProxyInfo("203.0.113.9", 40000, "127.0.0.1", 1883), True, b"")
    assert await inner.read() == CONNECT


async def test_a_v1_unknown_header_is_a_header_without_an_address() -> None:
    inner, read = reading(b"PROXY UNKNOWN\r\n" + CONNECT)
    assert await read_proxy_header(read) == (None, True, b"")  # type: ignore[arg-type]
    assert await inner.read() == CONNECT


@pytest.mark.parametrize(("data", "problem"), [
    (b"PROXY TCP4 " + b"1" * 200, "no CRLF within 107 bytes"),
    (b"PROXY TCP4 203.0.113.9", "truncated"),
    (b"PING\r\n", "bad framing"),
    (b"PROXY TCP4 999.1.1.1 127.0.0.1 1 2\r\n", "bad address"),
])
async def test_a_bad_v1_header_is_refused(data: bytes, problem: str) -> None:
    _, read = reading(data + CONNECT)
    with pytest.raises(ValidationError, match=problem):
        await read_proxy_header(read)  # type: ignore[arg-type]


async def test_a_v2_header_gives_the_client_address_and_leaves_mqtt_unread() -> None:
    addresses = socket.inet_aton("198.51.100.7") + socket.inet_aton("10.0.0.1") + \
        struct.pack("!HH", 5555, 1883)
    inner, read = reading(v2(0x1, addresses) + CONNECT)
    info = await read_proxy_header(read)  # type: ignore[arg-type]
    assert info == (ProxyInfo("198.51.100.7", 5555, "10.0.0.1", 1883), True, b"")
    assert await inner.read() == CONNECT


async def test_a_v2_local_header_is_a_header_without_an_address() -> None:
    inner, read = reading(v2(0x0, family=0x00) + CONNECT)
    assert await read_proxy_header(read) == (None, True, b"")  # type: ignore[arg-type]
    assert await inner.read() == CONNECT


async def test_a_v2_header_with_a_bad_signature_is_refused() -> None:
    _, read = reading(b"\r\n\r\n\x00\r\nQUIZ\n" + b"\x21\x11\x00\x00" + CONNECT)
    with pytest.raises(ValidationError, match="bad signature"):
        await read_proxy_header(read)  # type: ignore[arg-type]
