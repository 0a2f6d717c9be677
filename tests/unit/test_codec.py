"""MQTT 3.1.1 packets as bytes (broker.mqtt.codec): each encoder against the bytes the
spec gives, each decoder on good packets and on every malformed case it must refuse."""

from __future__ import annotations

import struct

import pytest

from broker.mqtt import codec
from broker.mqtt.codec import MalformedPacket, Publish


def u16(value: int) -> bytes:
    return struct.pack("!H", value)


def string(text: str) -> bytes:
    data = text.encode()
    return u16(len(data)) + data


# ------------------------------------------------------------------ encoders

@pytest.mark.parametrize(("size", "encoded"), [
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16_383, b"\xff\x7f"),
    (16_384, b"\x80\x80\x01"), (2_097_151, b"\xff\xff\x7f"), (2_097_152, b"\x80\x80\x80\x01"),
    (268_435_455, b"\xff\xff\xff\x7f"),
])
def test_remaining_length_is_the_variable_byte_integer_of_the_spec(size: int,
                                                                    encoded: bytes) -> None:
    """MQTT 3.1.1 §2.2.3, table 2.4: the boundaries of one to four bytes."""
    assert codec.remaining_length(size) == encoded


def test_a_qos0_publish_has_no_packet_id() -> None:
    packet = codec.publish_packet(b"a/b", b"hi", 0, False, packet_id=7)
    assert packet == b"\x30" + bytes([2 + 3 + 2]) + string("a/b") + b"hi"


def test_a_qos1_publish_carries_its_packet_id_and_its_flags() -> None:
    packet = codec.publish_packet(b"t", b"x" * 200, 1, True, packet_id=513, dup=True)
    # 0x30 | DUP 0x08 | QoS 1 << 1 | RETAIN 0x01; 2+1+2+200 = 205 needs two length bytes.
    assert packet[0] == 0x3B
    assert packet[1:3] == b"\xcd\x01"
    assert packet[3:] == string("t") + u16(513) + b"x" * 200


def test_a_qos2_publish_sets_qos_2_and_nothing_else() -> None:
    packet = codec.publish_packet(b"t", b"", 2, False, packet_id=1)
    assert packet == b"\x34\x05" + string("t") + u16(1)


@pytest.mark.parametrize(("kind", "first"), [
    (codec.PUBACK, 0x40), (codec.PUBREC, 0x50), (codec.PUBREL, 0x62), (codec.PUBCOMP, 0x70),
    (codec.UNSUBACK, 0xB0),
])
def test_acknowledgements_carry_the_flags_their_type_requires(kind: int, first: int) -> None:
    """PUBREL alone has flags 0b0010 (MQTT-3.6.1-1)."""
    assert codec.ack_packet(kind, 0x1234) == bytes([first, 2, 0x12, 0x34])


def test_a_suback_has_one_code_per_filter_in_order() -> None:
    assert codec.suback_packet(9, [0, 1, codec.SUBACK_FAILURE, 2]) == \
        b"\x90\x06" + u16(9) + bytes([0, 1, 0x80, 2])


def test_connack_session_present_only_when_accepted() -> None:
    """MQTT-3.2.2-4: a refused CONNECT has session present 0 whatever the session."""
    assert codec.connack_packet(True, 0) == b"\x20\x02\x01\x00"
    assert codec.connack_packet(False, 0) == b"\x20\x02\x00\x00"
    assert codec.connack_packet(True, 5) == b"\x20\x02\x00\x05"


def test_pingresp_is_the_two_byte_packet() -> None:
    assert codec.PINGRESP_PACKET == bytes([codec.PINGRESP << 4, 0])


# ------------------------------------------------------------------ PUBLISH

@pytest.mark.parametrize(("qos", "retain", "dup", "packet_id"), [
    (0, False, False, 0), (0, True, False, 0), (1, False, True, 1), (2, True, True, 65535),
])
def test_parse_publish_reads_back_what_publish_packet_writes(qos: int, retain: bool, dup: bool,
                                                             packet_id: int) -> None:
    packet = codec.publish_packet("ünï/çode".encode(), b"\x00payload\xff", qos, retain,
                                  packet_id, dup)
    body = packet[1 + len(codec.remaining_length(len(packet) - 2)):]
    assert codec.parse_publish(packet[0], body) == Publish(
        "ünï/çode", b"\x00payload\xff", qos, retain, dup, packet_id)


def test_a_publish_may_have_an_empty_payload() -> None:
    assert codec.parse_publish(0x31, string("t")) == Publish("t", b"", 0, True, False, 0)


@pytest.mark.parametrize(("first", "body", "problem"), [
    (0x36, string("t") + u16(1), "QoS 3"),
    (0x38, string("t"), "DUP set on a QoS 0"),
    (0x30, b"\x00", "string length beyond the packet"),
    (0x30, u16(5) + b"abc", "string beyond the packet"),
    (0x32, string("t"), "without packet id"),
    (0x32, string("t") + b"\x01", "without packet id"),
    (0x34, string("t") + u16(0) + b"x", "packet id 0"),
])
def test_a_malformed_publish_is_refused(first: int, body: bytes, problem: str) -> None:
    with pytest.raises(MalformedPacket, match=problem):
        codec.parse_publish(first, body)


# ------------------------------------------------------------------ SUBSCRIBE, UNSUBSCRIBE

def test_parse_subscribe_reads_every_filter_with_its_qos() -> None:
    body = u16(10) + string("a/#") + b"\x01" + string("b/+") + b"\x02" + string("c") + b"\x00"
    assert codec.parse_subscribe(body) == (10, [("a/#", 1), ("b/+", 2), ("c", 0)])


@pytest.mark.parametrize(("body", "problem"), [
    (u16(1), "without a topic filter"),
    (u16(1) + string("a"), "filter without QoS"),
    (u16(0) + string("a") + b"\x00", "packet id 0"),
    (b"\x01", "2-byte packet id"),
    (u16(1) + u16(9) + b"a", "string beyond the packet"),
])
def test_a_malformed_subscribe_is_refused(body: bytes, problem: str) -> None:
    with pytest.raises(MalformedPacket, match=problem):
        codec.parse_subscribe(body)


def test_parse_unsubscribe_reads_every_filter() -> None:
    assert codec.parse_unsubscribe(u16(3) + string("a/#") + string("b")) == (3, ["a/#", "b"])


@pytest.mark.parametrize(("body", "problem"), [
    (u16(3), "without a topic filter"),
    (u16(0) + string("a"), "packet id 0"),
    (u16(3) + b"\x00", "string length beyond the packet"),
])
def test_a_malformed_unsubscribe_is_refused(body: bytes, problem: str) -> None:
    with pytest.raises(MalformedPacket, match=problem):
        codec.parse_unsubscribe(body)


# ------------------------------------------------------------------ packet ids

def test_packet_id_of_reads_two_bytes_big_endian() -> None:
    assert codec.packet_id_of(b"\x01\x02") == 258


@pytest.mark.parametrize(("body", "problem"), [
    (b"", "got 0 bytes"), (b"\x01", "got 1 bytes"), (b"\x00\x01\x02", "got 3 bytes"),
    (b"\x00\x00", "packet id 0"),
])
def test_a_bad_packet_id_is_refused(body: bytes, problem: str) -> None:
    """An acknowledgement's body is exactly a non-zero packet id (MQTT-2.3.1-1)."""
    with pytest.raises(MalformedPacket, match=problem):
        codec.packet_id_of(body)

