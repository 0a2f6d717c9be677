"""Hand-built MQTT 3.1.1 packets for tests that must send what no real client would."""

from __future__ import annotations

import socket
import struct


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + remaining_length(len(body)) + body


def field(data: bytes | str) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return struct.pack("!H", len(raw)) + raw


def connect(client_id: bytes | str, key: bytes | str | None = None,
            secret: bytes | str | None = None, keepalive: int = 30) -> bytes:
    flags = 0x02 | (0x80 if key is not None else 0) | (0x40 if secret is not None else 0)
    body = field("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + field(client_id)
    if key is not None:
        body += field(key)
    if secret is not None:
        body += field(secret)
    return packet(0x10, body)


def publish(topic: bytes | str, payload: bytes = b"x") -> bytes:
    return packet(0x30, field(topic) + payload)


def subscribe(topic_filter: bytes | str, packet_id: int = 1, qos: int = 0) -> bytes:
    return packet(0x82, struct.pack("!H", packet_id) + field(topic_filter) + bytes([qos]))


def open_socket(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """True when the broker closes the connection (EOF or reset) within `within` s."""
    sock.settimeout(within)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
