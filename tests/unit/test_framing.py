"""Whole-packet cutting and the byte-level checks in front of parsing
(broker.mqtt.framing): the Framer fed bytes as a transport delivers them, its limits and
the watchdog's expiry; packet_problem on every rule; the PROXY header at a connection's
start."""

from __future__ import annotations

import socket
import struct

import pytest

from broker.core.clientip import PROXY_V2_SIGNATURE, ProxyInfo
from broker.mqtt.framing import (
    Framer,
    PacketError,
    PacketWatchdog,
    packet_problem,
    read_proxy_header,
)
from keystore.errors import ValidationError


def u16(value: int) -> bytes:
    return struct.pack("!H", value)


def string(data: str | bytes) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return u16(len(raw)) + raw


class Seen:
    """What a Framer reported: violations and expiries."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.expired: list[str] = []

    def framer(self, *chunks: bytes, **options: float) -> Framer:
        settings: dict[str, float] = {"max_packet_size": 1024, "packet_timeout": 10.0}
        settings.update(options)
        framer = Framer(on_violation=lambda e: self.violations.append(e.reason),
                        on_expire=self.expired.append, **settings)  # type: ignore[arg-type]
        for chunk in chunks:
            framer.feed(chunk)
        return framer


def drain(framer: Framer) -> list[tuple[int, bytes]]:
    """Every whole packet the framer holds now."""
    packets = []
    while (packet := framer.next()) is not None:
        packets.append(packet)
    return packets


PINGREQ = b"\xc0\x00"
LONG_PUBLISH = b"\x30" + b"\xc8\x01" + string("a/b") + b"x" * 195  # 200-byte body
SUBSCRIBE = b"\x82" + bytes([2 + 5 + 1]) + u16(7) + string("a/#") + b"\x01"


# ------------------------------------------------------------------ Framer

async def test_every_whole_packet_of_one_read_comes_out_in_order() -> None:
    framer = Seen().framer(PINGREQ + LONG_PUBLISH + SUBSCRIBE)
    assert drain(framer) == [(0xC0, b""), (0x30, LONG_PUBLISH[3:]), (0x82, SUBSCRIBE[2:])]
    assert framer.pending == 0 and framer.packet_started is None


@pytest.mark.parametrize("cut", [1, 2, 3, 50, len(LONG_PUBLISH) - 1],
                         ids=["after-type", "mid-length", "after-length", "mid-body", "last-byte"])
async def test_a_packet_cut_anywhere_comes_out_whole_once_the_rest_arrives(cut: int) -> None:
    seen = Seen()
    framer = seen.framer(PINGREQ + LONG_PUBLISH[:cut])
    assert drain(framer) == [(0xC0, b"")]
    assert framer.pending == cut  # only the packet in progress is kept
    assert framer.packet_started is not None  # timed from its first byte
    framer.feed(LONG_PUBLISH[cut:] + PINGREQ)
    assert drain(framer) == [(0x30, LONG_PUBLISH[3:]), (0xC0, b"")]
    assert framer.pending == 0 and framer.packet_started is None
    assert seen.violations == []


async def test_a_large_packet_read_in_many_small_pieces_is_joined_once_whole() -> None:
    body = string("big") + bytes(range(256)) * 40  # 10,245 bytes: a 2-byte length
    packet = b"\x30" + bytes([(len(body) & 0x7F) | 0x80, len(body) >> 7]) + body
    framer = Seen().framer(max_packet_size=20_000)
    for offset in range(0, len(packet), 100):
        framer.feed(packet[offset:offset + 100])
        if offset + 100 < len(packet):
            assert framer.next() is None
            assert framer.pending == offset + 100
    assert drain(framer) == [(0x30, body)]
    assert framer.pending == 0


async def test_a_packet_over_the_size_limit_is_refused_before_its_body_arrives() -> None:
    seen = Seen()
    framer = seen.framer(b"\x30\xe8\x07", max_packet_size=1000)  # announces 1,000 bytes
    with pytest.raises(PacketError, match="1003 bytes, limit 1000") as raised:
        framer.next()
    assert raised.value.reason == "packet_too_large"
    assert seen.violations == ["packet_too_large"]


async def test_the_size_limit_counts_the_whole_packet_header_included() -> None:
    body = string("t") + b"x" * 97  # 100 bytes: 1 + 1 + 100 = 102 in all
    assert drain(Seen().framer(b"\x30\x64" + body, max_packet_size=102)) == [(0x30, body)]
    with pytest.raises(PacketError, match="102 bytes, limit 101"):
        Seen().framer(b"\x30\x64" + body, max_packet_size=101).next()


@pytest.mark.parametrize("split", [False, True], ids=["one-read", "byte-by-byte"])
async def test_a_remaining_length_of_five_bytes_is_refused(split: bool) -> None:
    seen = Seen()
    data = b"\x30\xff\xff\xff\xff\x01"
    framer = seen.framer()
    with pytest.raises(PacketError) as raised:
        for byte in data if split else [data]:
            framer.feed(bytes([byte]) if split else byte)  # type: ignore[arg-type]
            framer.next()
    assert raised.value.reason == "malformed_length"
    assert seen.violations == ["malformed_length"]


async def test_a_whole_packet_that_breaks_a_rule_is_refused_with_the_rule() -> None:
    seen = Seen()
    with pytest.raises(PacketError, match="invalid_topic") as raised:
        seen.framer(b"\x30\x05" + string("a/#")).next()
    assert raised.value.reason == "malformed_packet"
    assert seen.violations == ["malformed_packet"]


async def test_a_framer_checks_packets_by_its_connections_protocol() -> None:
    framer = Seen().framer(b"\xf0\x00" * 2)
    framer.version = 5
    assert framer.next() == (0xF0, b"")
    framer.version = 4
    with pytest.raises(PacketError, match="reserved packet type 15"):
        framer.next()


# ------------------------------------------------------------------ expiry (the watchdog)

async def test_a_packet_not_completed_within_the_packet_timeout_expires() -> None:
    seen = Seen()
    framer = seen.framer(LONG_PUBLISH[:10], packet_timeout=2.0)
    assert framer.next() is None
    started = framer.packet_started
    assert started is not None
    assert framer.expire(started + 2.0) is None  # not past it yet
    assert seen.expired == []
    assert framer.expire(started + 2.01) == "slow_packet"
    assert seen.expired == ["slow_packet"] and seen.violations == ["slow_packet"]
    assert framer.expire(started + 10) is None  # reported once


async def test_a_connection_silent_past_its_idle_limit_expires_unless_held_back() -> None:
    seen = Seen()
    framer = seen.framer(idle_limit=5.0)
    last = framer.last_packet
    assert framer.expire(last + 5.0) is None
    framer.held_back = True  # not read by the broker's choice: not the client's silence
    assert framer.expire(last + 60) is None
    framer.held_back = False
    assert framer.expire(last + 5.01) == "idle"
    assert seen.expired == ["idle"] and seen.violations == []


async def test_reading_again_after_holding_back_restarts_both_clocks() -> None:
    seen = Seen()
    framer = seen.framer(LONG_PUBLISH[:10], idle_limit=5.0, packet_timeout=2.0)
    assert framer.next() is None
    framer.held_back = True
    framer.last_packet -= 100
    framer.packet_started = framer.last_packet  # both long past their limits ...
    framer.reading_again()  # ... while the broker was the one not reading
    assert not framer.held_back
    assert framer.expire(framer.last_packet + 1.0) is None
    assert seen.expired == []


async def test_without_an_idle_limit_silence_never_expires() -> None:
    seen = Seen()
    framer = seen.framer()
    assert framer.expire(framer.last_packet + 1e9) is None
    assert seen.expired == []


async def test_bytes_read_reset_the_idle_clock() -> None:
    framer = Seen().framer(idle_limit=5.0)
    framer.last_packet -= 100  # silent for long ...
    framer.feed(PINGREQ)  # ... until now
    assert framer.expire(framer.last_packet + 4.0) is None


async def test_the_watchdog_sweeps_every_framer_it_holds() -> None:
    seen = Seen()
    quiet, busy = (seen.framer(idle_limit=1.0) for _ in range(2))
    quiet.last_packet -= 10
    watchdog = PacketWatchdog()
    watchdog.framers.update({quiet, busy})
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


# ------------------------------------------------------------------ PROXY header

class Stream:
    """A connection's bytes as read_proxy_header sees them: peek the first, read exactly."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def peek(self) -> bytes:
        return self.data[:1]

    async def read(self, n: int) -> bytes:
        out, self.data = self.data[:n], self.data[n:]
        return out

    async def header(self) -> tuple[ProxyInfo | None, bool]:
        return await read_proxy_header(self.peek, self.read)


def v2(command: int, addresses: bytes = b"", family: int = 0x11) -> bytes:
    return PROXY_V2_SIGNATURE + bytes([0x20 | command, family]) + u16(len(addresses)) + \
        addresses


CONNECT = b"\x10\x0c" + connect_body(0x02)


async def test_no_header_consumes_nothing() -> None:
    stream = Stream(CONNECT)
    assert await stream.header() == (None, False)
    assert stream.data == CONNECT


async def test_a_v1_header_gives_the_client_address_and_leaves_mqtt_unread() -> None:
    stream = Stream(b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 1883\r\n" + CONNECT)
    assert await stream.header() == (ProxyInfo("203.0.113.9", 40000, "127.0.0.1", 1883), True)
    assert stream.data == CONNECT


async def test_a_v1_unknown_header_is_a_header_without_an_address() -> None:
    stream = Stream(b"PROXY UNKNOWN\r\n" + CONNECT)
    assert await stream.header() == (None, True)
    assert stream.data == CONNECT


@pytest.mark.parametrize(("data", "problem"), [
    (b"PROXY TCP4 " + b"1" * 200, "no CRLF within 107 bytes"),
    (b"PROXY TCP4 203.0.113.9", "truncated"),
    (b"PING\r\n", "bad framing"),
    (b"PROXY TCP4 999.1.1.1 127.0.0.1 1 2\r\n", "bad address"),
])
async def test_a_bad_v1_header_is_refused(data: bytes, problem: str) -> None:
    tail = b"" if problem == "truncated" else CONNECT
    with pytest.raises(ValidationError, match=problem):
        await Stream(data + tail).header()


async def test_a_v2_header_gives_the_client_address_and_leaves_mqtt_unread() -> None:
    addresses = socket.inet_aton("198.51.100.7") + socket.inet_aton("10.0.0.1") + \
        struct.pack("!HH", 5555, 1883)
    stream = Stream(v2(0x1, addresses) + CONNECT)
    assert await stream.header() == (ProxyInfo("198.51.100.7", 5555, "10.0.0.1", 1883), True)
    assert stream.data == CONNECT


async def test_a_v2_local_header_is_a_header_without_an_address() -> None:
    stream = Stream(v2(0x0, family=0x00) + CONNECT)
    assert await stream.header() == (None, True)
    assert stream.data == CONNECT


async def test_a_v2_header_with_a_bad_signature_is_refused() -> None:
    with pytest.raises(ValidationError, match="bad signature"):
        await Stream(b"\r\n\r\n\x00\r\nQUIZ\n" + b"\x21\x11\x00\x00" + CONNECT).header()


async def test_a_connected_clients_publish_is_left_to_its_parser() -> None:
    """Once publish_parsed is set (a connected client), a PUBLISH is not checked
    twice: codec.parse_publish checks its topic where it decodes it (test_codec); every
    other packet type is still checked here."""
    bad_publish = b"\x30\x05" + string("a/#")
    framer = Seen().framer(bad_publish + b"\x82\x04" + u16(1) + u16(0))
    framer.publish_parsed = True
    assert framer.next() == (0x30, bad_publish[2:])
    with pytest.raises(PacketError, match="invalid requested QoS in SUBSCRIBE"):
        framer.next()
