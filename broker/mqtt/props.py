"""MQTT 5.0 properties (§2.2.2) and reason codes (§2.4), as bytes (pure, no I/O).

A property list is a variable byte integer (its length) followed by (identifier, value)
pairs; each identifier has one type. ``decode`` reads a list into a ``Props`` dict
(identifier -> value; User Property and Subscription Identifier may repeat and are
kept as lists), checking each identifier is allowed in that packet and appears at most
once where the standard says so; ``encode`` writes one. What a message carries from its
publisher to its subscribers is kept encoded (``forwarded``), so a message's properties
are read once and written as they came.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from broker.mqtt.wire import U16 as _U16
from broker.mqtt.wire import U32 as _U32
from broker.mqtt.wire import (
    MalformedPacket,
    read_binary,
    read_string,
    read_varint,
    remaining_length,
)

# Identifiers (§2.2.2.2)
PAYLOAD_FORMAT = 0x01
MESSAGE_EXPIRY = 0x02
CONTENT_TYPE = 0x03
RESPONSE_TOPIC = 0x08
CORRELATION_DATA = 0x09
SUBSCRIPTION_ID = 0x0B
SESSION_EXPIRY = 0x11
ASSIGNED_CLIENT_ID = 0x12
SERVER_KEEP_ALIVE = 0x13
AUTH_METHOD = 0x15
AUTH_DATA = 0x16
REQUEST_PROBLEM_INFO = 0x17
WILL_DELAY = 0x18
REQUEST_RESPONSE_INFO = 0x19
RESPONSE_INFO = 0x1A
SERVER_REFERENCE = 0x1C
REASON_STRING = 0x1F
RECEIVE_MAXIMUM = 0x21
TOPIC_ALIAS_MAXIMUM = 0x22
TOPIC_ALIAS = 0x23
MAXIMUM_QOS = 0x24
RETAIN_AVAILABLE = 0x25
USER_PROPERTY = 0x26
MAXIMUM_PACKET_SIZE = 0x27
WILDCARD_SUB_AVAILABLE = 0x28
SUB_ID_AVAILABLE = 0x29
SHARED_SUB_AVAILABLE = 0x2A

BYTE, U16, U32, VARINT, STRING, BINARY, PAIR = range(7)
TYPES = {
    PAYLOAD_FORMAT: BYTE, MESSAGE_EXPIRY: U32, CONTENT_TYPE: STRING, RESPONSE_TOPIC: STRING,
    CORRELATION_DATA: BINARY, SUBSCRIPTION_ID: VARINT, SESSION_EXPIRY: U32,
    ASSIGNED_CLIENT_ID: STRING, SERVER_KEEP_ALIVE: U16, AUTH_METHOD: STRING,
    AUTH_DATA: BINARY, REQUEST_PROBLEM_INFO: BYTE, WILL_DELAY: U32,
    REQUEST_RESPONSE_INFO: BYTE, RESPONSE_INFO: STRING, SERVER_REFERENCE: STRING,
    REASON_STRING: STRING, RECEIVE_MAXIMUM: U16, TOPIC_ALIAS_MAXIMUM: U16, TOPIC_ALIAS: U16,
    MAXIMUM_QOS: BYTE, RETAIN_AVAILABLE: BYTE, USER_PROPERTY: PAIR,
    MAXIMUM_PACKET_SIZE: U32, WILDCARD_SUB_AVAILABLE: BYTE, SUB_ID_AVAILABLE: BYTE,
    SHARED_SUB_AVAILABLE: BYTE,
}
REPEATABLE = frozenset({USER_PROPERTY, SUBSCRIPTION_ID})

# What a client may send in each packet (§3.x.2.2); a property elsewhere is a protocol
# error (MQTT-2.2.2-2 lets a receiver refuse what does not belong).
CONNECT_PROPS = frozenset({SESSION_EXPIRY, AUTH_METHOD, AUTH_DATA, REQUEST_PROBLEM_INFO,
                           REQUEST_RESPONSE_INFO, RECEIVE_MAXIMUM, TOPIC_ALIAS_MAXIMUM,
                           USER_PROPERTY, MAXIMUM_PACKET_SIZE})
WILL_PROPS = frozenset({PAYLOAD_FORMAT, MESSAGE_EXPIRY, CONTENT_TYPE, RESPONSE_TOPIC,
                        CORRELATION_DATA, WILL_DELAY, USER_PROPERTY})
PUBLISH_PROPS = frozenset({PAYLOAD_FORMAT, MESSAGE_EXPIRY, CONTENT_TYPE, RESPONSE_TOPIC,
                           CORRELATION_DATA, TOPIC_ALIAS, USER_PROPERTY})
ACK_PROPS = frozenset({REASON_STRING, USER_PROPERTY})
SUBSCRIBE_PROPS = frozenset({SUBSCRIPTION_ID, USER_PROPERTY})
UNSUBSCRIBE_PROPS = frozenset({USER_PROPERTY})
DISCONNECT_PROPS = frozenset({SESSION_EXPIRY, REASON_STRING, USER_PROPERTY, SERVER_REFERENCE})
AUTH_PROPS = frozenset({AUTH_METHOD, AUTH_DATA, REASON_STRING, USER_PROPERTY})
# Carried from a PUBLISH (or Will) to its subscribers as they came (§3.3.2.3).
FORWARDED = frozenset({PAYLOAD_FORMAT, CONTENT_TYPE, RESPONSE_TOPIC, CORRELATION_DATA,
                       USER_PROPERTY})

Props = dict[int, Any]
NONE: Props = {}

# Reason codes (§2.4) the broker sends.
SUCCESS = 0x00
DISCONNECT_WITH_WILL = 0x04
NO_SUBSCRIPTION_EXISTED = 0x11
UNSPECIFIED_ERROR = 0x80
MALFORMED_PACKET = 0x81
PROTOCOL_ERROR = 0x82
IMPLEMENTATION_ERROR = 0x83
UNSUPPORTED_PROTOCOL_VERSION = 0x84
CLIENT_ID_NOT_VALID = 0x85
BAD_USERNAME_OR_PASSWORD = 0x86
NOT_AUTHORIZED = 0x87
SERVER_UNAVAILABLE = 0x88
SERVER_BUSY = 0x89
BANNED = 0x8A
SERVER_SHUTTING_DOWN = 0x8B
BAD_AUTH_METHOD = 0x8C
KEEP_ALIVE_TIMEOUT = 0x8D
SESSION_TAKEN_OVER = 0x8E
TOPIC_FILTER_INVALID = 0x8F
TOPIC_NAME_INVALID = 0x90
PACKET_ID_NOT_FOUND = 0x92
RECEIVE_MAXIMUM_EXCEEDED = 0x93
TOPIC_ALIAS_INVALID = 0x94
PACKET_TOO_LARGE = 0x95
MESSAGE_RATE_TOO_HIGH = 0x96
QUOTA_EXCEEDED = 0x97
ADMINISTRATIVE_ACTION = 0x98
PAYLOAD_FORMAT_INVALID = 0x99
SHARED_SUBS_NOT_SUPPORTED = 0x9E
CONNECTION_RATE_EXCEEDED = 0x9F
WILDCARD_SUBS_NOT_SUPPORTED = 0xA2


def decode(data: bytes, offset: int, allowed: frozenset[int]) -> tuple[Props, int]:
    """The property list at ``offset``: (properties, offset after the list)."""
    length, start = read_varint(data, offset)
    end = start + length
    if end > len(data):
        raise MalformedPacket("properties beyond the packet")
    props: Props = {}
    index = start
    while index < end:
        ident, index = read_varint(data, index)
        kind = TYPES.get(ident)
        if kind is None or ident not in allowed:
            raise MalformedPacket(f"property {ident:#04x} not allowed here")
        value: Any
        if kind == BYTE:
            if index >= end:
                raise MalformedPacket("property beyond its list")
            value, index = data[index], index + 1
        elif kind == U16:
            if index + 2 > end:
                raise MalformedPacket("property beyond its list")
            value, index = _U16.unpack_from(data, index)[0], index + 2
        elif kind == U32:
            if index + 4 > end:
                raise MalformedPacket("property beyond its list")
            value, index = _U32.unpack_from(data, index)[0], index + 4
        elif kind == VARINT:
            value, index = read_varint(data, index)
        elif kind == STRING:
            value, index = read_string(data, index)
        elif kind == BINARY:
            value, index = read_binary(data, index)
        else:
            name, index = read_string(data, index)
            text, index = read_string(data, index)
            value = (name, text)
        if index > end:
            raise MalformedPacket("property beyond its list")
        if ident in REPEATABLE:
            props.setdefault(ident, []).append(value)
        elif ident in props:
            raise MalformedPacket(f"property {ident:#04x} twice")  # MQTT-2.2.2-2
        else:
            props[ident] = value
    return props, end


def _value(ident: int, value: Any) -> bytes:
    kind = TYPES[ident]
    if kind == BYTE:
        return bytes((value,))
    if kind == U16:
        return _U16.pack(value)
    if kind == U32:
        return _U32.pack(value)
    if kind == VARINT:
        return remaining_length(value)
    if kind == STRING:
        raw: bytes = value.encode("utf-8")
        return _U16.pack(len(raw)) + raw
    if kind == BINARY:
        data: bytes = value
        return _U16.pack(len(data)) + data
    name: bytes = value[0].encode("utf-8")
    text: bytes = value[1].encode("utf-8")
    return _U16.pack(len(name)) + name + _U16.pack(len(text)) + text


def encode_body(props: Props | Iterable[tuple[int, Any]]) -> bytes:
    """The properties without their length (to join with more before ``framed``)."""
    items = props.items() if isinstance(props, dict) else props
    out = bytearray()
    for ident, value in items:
        for one in value if ident in REPEATABLE and isinstance(value, list) else (value,):
            out += remaining_length(ident) + _value(ident, one)
    return bytes(out)


def framed(body: bytes) -> bytes:
    """A property list from its encoded properties: their length first."""
    return remaining_length(len(body)) + body


def encode(props: Props | Iterable[tuple[int, Any]]) -> bytes:
    return framed(encode_body(props))


EMPTY = b"\x00"  # an empty property list


def forwarded(props: Props) -> bytes:
    """The encoded properties a message carries to its subscribers unchanged."""
    return encode_body([(ident, value) for ident, value in props.items()
                        if ident in FORWARDED])
