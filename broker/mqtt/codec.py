"""MQTT 3.1.1 and 5.0 packets the broker sends and receives, as bytes (pure, no I/O).

The daemon reads whole packets (``broker.mqtt.framing.Framer`` has already checked size,
UTF-8 strings and the remaining-length encoding), so decoding here is slicing a bytes
object; encoding builds each packet with one ``bytes`` concatenation. amqtt's packet
classes read field by field from a stream with an ``await`` per field and build objects
per header, too slow per message; and amqtt parses no MQTT 5.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

from broker.mqtt import props as properties
from broker.mqtt.wire import MalformedPacket as MalformedPacket
from broker.mqtt.wire import read_binary, read_string
from broker.mqtt.wire import remaining_length as remaining_length
from keystore.topics import is_topic_name

# Packet types (first byte >> 4), MQTT 3.1.1 §2.2.1.
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
AUTH = 15  # MQTT 5 only

# Fixed-header flags of the packets a client sends, but PUBLISH (MQTT-2.2.2-1/2): PUBREL,
# SUBSCRIBE and UNSUBSCRIBE 0b0010, the others 0.
REQUIRED_FLAGS = {CONNECT: 0, PUBACK: 0, PUBREC: 0, PUBREL: 2, PUBCOMP: 0, SUBSCRIBE: 2,
                  UNSUBSCRIBE: 2, PINGREQ: 0, DISCONNECT: 0, AUTH: 0}

PINGRESP_PACKET = b"\xd0\x00"
SUBACK_FAILURE = 0x80

_U16 = struct.Struct("!H")


class ProtocolViolation(Exception):
    """A well-formed packet the protocol says ends the connection (MQTT 5: DISCONNECT
    0x82 Protocol Error; a malformed one is MalformedPacket, 0x81)."""


class Publish(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int  # 0 for QoS 0


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
    """A 3.1.1 packet's UTF-8 string: strictly valid, no U+0000 (MQTT-1.5.3-1/2)."""
    if offset + 2 > len(body):
        raise MalformedPacket("string length beyond the packet")
    end = offset + 2 + _U16.unpack_from(body, offset)[0]
    if end > len(body):
        raise MalformedPacket("string beyond the packet")
    try:
        text = body[offset + 2 : end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedPacket(f"bad string: {exc}") from None
    if "\x00" in text:
        raise MalformedPacket("bad string: NUL in a string")
    return text, end


def packet_id_of(body: bytes) -> int:
    if len(body) != 2:
        raise MalformedPacket(f"expected a 2-byte packet id, got {len(body)} bytes")
    packet_id: int = _U16.unpack(body)[0]
    if packet_id == 0:
        raise MalformedPacket("packet id 0")  # MQTT-2.3.1-1
    return packet_id


def _publish_fields(first: int, body: bytes) -> tuple[int, bool, str, int, int]:
    """QoS, DUP, topic (strictly decoded), packet id and the offset after them, of a PUBLISH
    of either version."""
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
    return qos, dup, topic, packet_id, offset


def parse_publish(first: int, body: bytes) -> Publish:
    """An MQTT 3.1.1 PUBLISH, its topic checked here (strict UTF-8 without NUL, no
    wildcard, not empty: MQTT-1.5.3-1/2, MQTT-3.3.2-1/2), where it is decoded: the framer
    leaves a connected client's PUBLISH to this (``Framer.publish_parsed``)."""
    qos, dup, topic, packet_id, offset = _publish_fields(first, body)
    if not is_topic_name(topic):
        raise MalformedPacket(f"invalid_topic {topic!r} in PUBLISH")
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


# ------------------------------------------------------------------ CONNECT (3.1.1 and 5.0)


class WillSpec(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: dict[int, Any]  # MQTT 5 Will properties (empty for 3.1.1)


class Connect(NamedTuple):
    """A CONNECT as read (§3.1): what admission checks and the session is made from."""

    protocol: str
    level: int  # 4: MQTT 3.1.1, 5: MQTT 5.0
    clean_start: bool
    keep_alive: int
    props: dict[int, Any]  # MQTT 5 CONNECT properties (empty for 3.1.1)
    client_id: str
    will: WillSpec | None
    username: str | None
    password: bytes | None


def parse_connect(body: bytes) -> Connect:
    """A CONNECT body of MQTT 3.1.1 or 5.0; MalformedPacket for anything else malformed.
    The protocol level is returned as it is (another level is refused by the caller with
    the CONNACK the standard asks for)."""
    protocol, offset = read_string(body, 0)
    if offset + 4 > len(body):
        raise MalformedPacket("truncated CONNECT")
    level, flags = body[offset], body[offset + 1]
    keep_alive = _U16.unpack_from(body, offset + 2)[0]
    offset += 4
    if protocol != "MQTT" or level not in (4, 5):
        return Connect(protocol, level, False, 0, {}, "", None, None, None)
    if flags & 0x01:
        raise MalformedPacket("reserved CONNECT flag set")  # MQTT-3.1.2-3
    will_flag, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 3, bool(flags & 0x20)
    if not will_flag and (will_qos or will_retain):
        raise MalformedPacket("Will QoS or retain without a Will")  # MQTT-3.1.2-11/13
    if will_qos == 3:
        raise MalformedPacket("Will QoS 3")  # MQTT-3.1.2-14
    props: dict[int, Any] = {}
    if level == 5:
        props, offset = properties.decode(body, offset, properties.CONNECT_PROPS)
    client_id, offset = read_string(body, offset)
    will = None
    if will_flag:
        will_props: dict[int, Any] = {}
        if level == 5:
            will_props, offset = properties.decode(body, offset, properties.WILL_PROPS)
        topic, offset = read_string(body, offset)
        payload, offset = read_binary(body, offset)
        will = WillSpec(topic, payload, will_qos, will_retain, will_props)
    username = password = None
    if flags & 0x80:
        username, offset = read_string(body, offset)
    if flags & 0x40:
        if level == 4 and username is None:
            raise MalformedPacket("password without user name")  # MQTT-3.1.2-22
        password, offset = read_binary(body, offset)
    if offset != len(body):
        raise MalformedPacket("bytes after the CONNECT payload")
    return Connect(protocol, level, bool(flags & 0x02), keep_alive, props, client_id, will,
                   username, password)


# ------------------------------------------------------------------ MQTT 5.0 packets


def connack5(session_present: bool, reason: int, props: bytes = b"\x00") -> bytes:
    """CONNACK with a reason code and an encoded property list."""
    body = bytes((1 if session_present and reason == 0 else 0, reason)) + props
    return bytes((CONNACK << 4,)) + remaining_length(len(body)) + body


def publish5(topic: bytes, payload: bytes, qos: int, retain: bool, packet_id: int = 0,
             dup: bool = False, props: bytes = b"\x00") -> bytes:
    """An MQTT 5 PUBLISH; ``props`` is the encoded property list (b"\\x00": none)."""
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    head = _U16.pack(len(topic)) + topic
    if qos:
        head += _U16.pack(packet_id)
    head += props
    return bytes((first,)) + remaining_length(len(head) + len(payload)) + head + payload


def ack5(kind: int, packet_id: int, reason: int = 0, props: bytes = b"") -> bytes:
    """PUBACK, PUBREC, PUBREL or PUBCOMP of MQTT 5: the reason code and the properties
    are left out when they are Success and none (§3.4.2.1)."""
    body = _U16.pack(packet_id)
    if reason or props:
        body += bytes((reason,)) + (props or b"\x00")
    return bytes((kind << 4 | REQUIRED_FLAGS.get(kind, 0),)) + remaining_length(len(body)) + body


def suback5(packet_id: int, codes: list[int], props: bytes = b"\x00") -> bytes:
    body = _U16.pack(packet_id) + props + bytes(codes)
    return bytes((SUBACK << 4,)) + remaining_length(len(body)) + body


def unsuback5(packet_id: int, codes: list[int], props: bytes = b"\x00") -> bytes:
    body = _U16.pack(packet_id) + props + bytes(codes)
    return bytes((UNSUBACK << 4,)) + remaining_length(len(body)) + body


def disconnect5(reason: int, props: bytes = b"") -> bytes:
    """A DISCONNECT the server sends (§3.14): a reason code and its properties."""
    body = bytes((reason,)) + (props or b"\x00") if reason or props else b""
    return bytes((DISCONNECT << 4,)) + remaining_length(len(body)) + body


class Subscription(NamedTuple):
    """One filter of an MQTT 5 SUBSCRIBE with its options (§3.8.3.1)."""

    topic_filter: str
    qos: int
    no_local: bool
    retain_as_published: bool
    retain_handling: int  # 0: send retained, 1: only if new, 2: never


def parse_publish5(first: int, body: bytes) -> tuple[Publish, dict[int, Any]]:
    """An MQTT 5 PUBLISH and its properties (the topic may be empty with a Topic Alias)."""
    qos, dup, topic, packet_id, offset = _publish_fields(first, body)
    if offset < len(body) and body[offset] == 0:  # no properties: the common case
        props: dict[int, Any] = properties.NONE
        offset += 1
    else:
        props, offset = properties.decode(body, offset, properties.PUBLISH_PROPS)
    return Publish(topic, body[offset:], qos, bool(first & 0x01), dup, packet_id), props


def parse_ack5(body: bytes) -> tuple[int, int]:
    """(packet id, reason code) of a PUBACK, PUBREC, PUBREL or PUBCOMP of MQTT 5."""
    if len(body) < 2:
        raise MalformedPacket("acknowledgement without packet id")
    packet_id = _U16.unpack_from(body, 0)[0]
    if packet_id == 0:
        raise MalformedPacket("packet id 0")
    reason = body[2] if len(body) > 2 else 0
    if len(body) > 3:
        _, end = properties.decode(body, 3, properties.ACK_PROPS)
        if end != len(body):
            raise MalformedPacket("bytes after the properties")
    return packet_id, reason


def parse_subscribe5(body: bytes) -> tuple[int, int, list[Subscription]]:
    """(packet id, subscription identifier or 0, subscriptions) of an MQTT 5 SUBSCRIBE."""
    packet_id = packet_id_of(body[:2])
    props, offset = properties.decode(body, 2, properties.SUBSCRIBE_PROPS)
    ids = props.get(properties.SUBSCRIPTION_ID, [])
    if len(ids) > 1 or (ids and ids[0] == 0):
        raise MalformedPacket("subscription identifier 0 or more than one")  # MQTT-3.8.2-1
    subscriptions = []
    while offset < len(body):
        topic_filter, offset = read_string(body, offset)
        if offset >= len(body):
            raise MalformedPacket("SUBSCRIBE filter without options")
        options = body[offset]
        offset += 1
        if options & 0xC0 or options & 3 == 3 or (options >> 4) & 3 == 3:
            raise MalformedPacket("invalid subscription options")  # MQTT-3.8.3-5
        subscriptions.append(Subscription(topic_filter, options & 3, bool(options & 4),
                                          bool(options & 8), (options >> 4) & 3))
    if not subscriptions:
        raise MalformedPacket("SUBSCRIBE without a topic filter")
    return packet_id, ids[0] if ids else 0, subscriptions


def parse_unsubscribe5(body: bytes) -> tuple[int, list[str]]:
    packet_id = packet_id_of(body[:2])
    _, offset = properties.decode(body, 2, properties.UNSUBSCRIBE_PROPS)
    filters = []
    while offset < len(body):
        topic_filter, offset = read_string(body, offset)
        filters.append(topic_filter)
    if not filters:
        raise MalformedPacket("UNSUBSCRIBE without a topic filter")
    return packet_id, filters


def parse_disconnect5(body: bytes) -> tuple[int, dict[int, Any]]:
    """(reason code, properties) of a client's MQTT 5 DISCONNECT."""
    if not body:
        return 0, {}
    reason = body[0]
    if len(body) == 1:
        return reason, {}
    props, end = properties.decode(body, 1, properties.DISCONNECT_PROPS)
    if end != len(body):
        raise MalformedPacket("bytes after the properties")
    return reason, props
