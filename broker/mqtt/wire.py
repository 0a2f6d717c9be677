"""The encodings every MQTT packet is made of (§1.5): variable byte integers, UTF-8
strings and binary data, and the one error for bytes that break them (pure, no I/O)."""

from __future__ import annotations

import struct

U16 = struct.Struct("!H")
U32 = struct.Struct("!I")


class MalformedPacket(ValueError):
    """A packet whose fields break the protocol; the connection is closed."""


def remaining_length(size: int) -> bytes:
    """A variable byte integer (§1.5.5), as packet lengths are written."""
    out = bytearray()
    while True:
        byte, size = size & 0x7F, size >> 7
        out.append(byte | 0x80 if size else byte)
        if not size:
            return bytes(out)


def read_varint(data: bytes, offset: int) -> tuple[int, int]:
    """A variable byte integer at ``offset``: (value, offset after it)."""
    value, shift = 0, 0
    for index in range(offset, min(offset + 4, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    raise MalformedPacket("malformed variable byte integer")


def read_binary(data: bytes, offset: int) -> tuple[bytes, int]:
    """Two-byte length, then that many bytes (§1.5.6)."""
    if offset + 2 > len(data):
        raise MalformedPacket("length beyond the packet")
    end = offset + 2 + U16.unpack_from(data, offset)[0]
    if end > len(data):
        raise MalformedPacket("data beyond the packet")
    return data[offset + 2 : end], end


def read_string(data: bytes, offset: int) -> tuple[str, int]:
    """A UTF-8 string: strictly valid, no U+0000 (MQTT-1.5.4-1/2)."""
    raw, end = read_binary(data, offset)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("invalid UTF-8 in a string") from None
    if "\x00" in text:
        raise MalformedPacket("NUL in a string")
    return text, end
