"""MQTT 3.1.1 packets the broker sends and receives after CONNECT, as bytes (pure, no I/O).

The daemon reads whole packets (``broker.mqtt.framing.FramedReader`` has already checked size,
UTF-8 strings and the remaining-length encoding), so decoding here is slicing a bytes
object; encoding builds each packet with one ``bytes`` concatenation. amqtt's packet
classes read field by field from a stream with an ``await`` per field and build objects
per header: fine for CONNECT (amqtt still parses it), too slow per message.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# Packet types (first byte >> 4), MQTT 3.1.1 §2.2.1.
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

# Fixed-header flags of the packets a client sends, but PUBLISH (MQTT-2.2.2-1/2): PUBREL,
# SUBSCRIBE and UNSUBSCRIBE 0b0010, the others 0.
REQUIRED_FLAGS = {CONNECT: 0, PUBACK: 0, PUBREC: 0, PUBREL: 2, PUBCOMP: 0, SUBSCRIBE: 2,
                  UNSUBSCRIBE: 2, PINGREQ: 0, DISCONNECT: 0}

PINGRESP_PACKET = b"\xd0\x00"
SUBACK_FAILURE = 0x80

_U16 = struct.Struct("!H")


class MalformedPacket(ValueError):
    """A packet whose fields break MQTT 3.1.1; the connection is closed."""


class Publish(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int  # 0 for QoS 0


def remaining_length(size: int) -> bytes:
    out = bytearray()
    while True:
        byte, size = size & 0x7F, size >> 7
        out.append(byte | 0x80 if size else byte)
        if not size:
            return bytes(out)


def publish_packet(topic: bytes, payload: bytes, qos: int, retain: bool,
                   packet_id: int = 0, dup: bool = False) -> bytes:
    """A PUBLISH; ``topic`` is already UTF-8 encoded (routing encodes it once per message)."""
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    head = _U16.pack(len(topic)) + topic
    if qos:
        head += _U16.pack(packet_id)
    return bytes((first,)) + remaining_length(len(head) + len(payload)) + head + payload


def ack_packet(kind: int, packet_id: int) -> bytes:
    """PUBACK, PUBREC, PUBREL, PUBCOMP or UNSUBACK for ``packet_id``."""
    return bytes((kind << 4 | REQUIRED_FLAGS.get(kind, 0), 2)) + _U16.pack(packet_id)


def suback_packet(packet_id: int, codes: list[int]) -> bytes:
    body = _U16.pack(packet_id) + bytes(codes)
    return bytes((SUBACK << 4,)) + remaining_length(len(body)) + body


def connack_packet(session_present: bool, code: int) -> bytes:
    return bytes((CONNACK << 4, 2, 1 if session_present and code == 0 else 0, code))


def _string(body: bytes, offset: int) -> tuple[str, int]:
    if offset + 2 > len(body):
        raise MalformedPacket("string length beyond the packet")
    end = offset + 2 + _U16.unpack_from(body, offset)[0]
    if end > len(body):
        raise MalformedPacket("string beyond the packet")
    return body[offset + 2 : end].decode("utf-8"), end


def packet_id_of(body: bytes) -> int:
    if len(body) != 2:
        raise MalformedPacket(f"expected a 2-byte packet id, got {len(body)} bytes")
    packet_id: int = _U16.unpack(body)[0]
    if packet_id == 0:
        raise MalformedPacket("packet id 0")  # MQTT-2.3.1-1
    return packet_id


def parse_publish(first: int, body: bytes) -> Publish:
    qos = (first >> 1) & 3
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")  # MQTT-3.3.1-4
    dup = bool(first & 0x08)
    if dup and qos == 0:
        raise MalformedPacket("DUP set on a QoS 0 PUBLISH")  # MQTT-3.3.1-2
    topic, offset = _string(body, 0)
    packet_id = 0
    if qos:
        if offset + 2 > len(body):
            raise MalformedPacket("PUBLISH without packet id")
        packet_id = _U16.unpack_from(body, offset)[0]
        if packet_id == 0:
            raise MalformedPacket("packet id 0")
        offset += 2
    return Publish(topic, body[offset:], qos, bool(first & 0x01), dup, packet_id)


def parse_subscribe(body: bytes) -> tuple[int, list[tuple[str, int]]]:
    packet_id = packet_id_of(body[:2])
    offset, filters = 2, []
    while offset < len(body):
        topic_filter, offset = _string(body, offset)
        if offset >= len(body):
            raise MalformedPacket("SUBSCRIBE filter without QoS")
        filters.append((topic_filter, body[offset]))
        offset += 1
    if not filters:
        raise MalformedPacket("SUBSCRIBE without a topic filter")  # MQTT-3.8.3-3
    return packet_id, filters


def parse_unsubscribe(body: bytes) -> tuple[int, list[str]]:
    packet_id = packet_id_of(body[:2])
    offset, filters = 2, []
    while offset < len(body):
        topic_filter, offset = _string(body, offset)
        filters.append(topic_filter)
    if not filters:
        raise MalformedPacket("UNSUBSCRIBE without a topic filter")  # MQTT-3.10.3-2
    return packet_id, filters
