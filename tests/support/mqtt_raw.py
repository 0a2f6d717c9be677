"""Hand-built MQTT 3.1.1 and 5.0 packets for tests that must send what no real client
would, and the broker's answers read back byte by byte."""

from __future__ import annotations

import socket
import struct
import time
from typing import Any, NamedTuple

from paho.mqtt.properties import Properties


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


def is_closed(sock: socket.socket) -> bool:
    """Has the peer closed this socket (EOF or reset waiting)? Does not wait; leaves the
    socket non-blocking."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def connect_packet(client_id: str, key: str, secret: str, *, clean: bool = True,
                   keepalive: int = 30) -> bytes:
    """CONNECT with credentials; clean=False asks for a persistent session."""
    packet = connect(client_id, key, secret, keepalive)
    if not clean:  # clear the clean-session flag (bit 1 of the connect flags byte)
        packet = packet[:9] + bytes([packet[9] & ~0x02]) + packet[10:]
    return packet


def publish_qos(topic: str, payload: bytes, qos: int, packet_id: int, *, dup: bool = False,
                retain: bool = False) -> bytes:
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    return packet(first, field(topic) + struct.pack("!H", packet_id) + payload)


def ack(kind: int, packet_id: int) -> bytes:
    """PUBACK (4), PUBREC (5), PUBREL (6, flags 0b0010) or PUBCOMP (7)."""
    return bytes([kind << 4 | (2 if kind == 6 else 0), 2]) + struct.pack("!H", packet_id)


class Packet:
    """A packet read back from the broker."""

    def __init__(self, first: int, body: bytes) -> None:
        self.first, self.body = first, body
        self.kind = first >> 4

    @property
    def packet_id(self) -> int:
        if self.kind == 3:
            size = struct.unpack("!H", self.body[:2])[0]
            return int(struct.unpack("!H", self.body[2 + size : 4 + size])[0])
        return int(struct.unpack("!H", self.body[:2])[0])

    @property
    def topic(self) -> str:
        size = struct.unpack("!H", self.body[:2])[0]
        return self.body[2 : 2 + size].decode()

    @property
    def payload(self) -> bytes:
        size = struct.unpack("!H", self.body[:2])[0]
        return self.body[2 + size + (2 if self.qos else 0):]

    @property
    def qos(self) -> int:
        return (self.first >> 1) & 3

    @property
    def dup(self) -> bool:
        return bool(self.first & 0x08)

    @property
    def retain(self) -> bool:
        return bool(self.first & 0x01)

    def __repr__(self) -> str:
        return f"Packet(kind={self.kind}, first={self.first:#x}, body={self.body[:40]!r})"


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed by the broker")
        data += chunk
    return data


def read_packet(sock: socket.socket, timeout: float = 5.0) -> Packet | None:
    """The next whole packet from the broker, or None if nothing arrives in time."""
    sock.settimeout(timeout)
    try:
        first = sock.recv(1)
    except TimeoutError:
        return None
    if not first:
        raise ConnectionError("closed by the broker")
    sock.settimeout(5.0)
    length, shift = 0, 0
    while True:
        byte = _exactly(sock, 1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    return Packet(first[0], _exactly(sock, length))


def session(port: int, client_id: str, key: str, secret: str, *,
            clean: bool = True) -> tuple[socket.socket, Packet]:
    """A connected raw socket and its CONNACK."""
    sock = open_socket(port)
    sock.sendall(connect_packet(client_id, key, secret, clean=clean))
    connack = read_packet(sock)
    assert connack is not None and connack.kind == 2, connack
    return sock, connack


def ws_open(port: int, *, rcvbuf: int | None = None) -> socket.socket:
    """A WebSocket (subprotocol mqtt) on a plain socket: nothing reads it unless the test
    does, unlike a client library's background reader."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += _exactly(sock, 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def ws_send(sock: socket.socket, data: bytes) -> None:
    """One masked binary frame (clients must mask)."""
    size = len(data)
    if size < 126:
        head = bytes([0x82, 0x80 | size])
    elif size < 65536:
        head = bytes([0x82, 0x80 | 126]) + struct.pack("!H", size)
    else:
        head = bytes([0x82, 0x80 | 127]) + struct.pack("!Q", size)
    mask = b"\x01\x02\x03\x04"
    sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))


def ws_recv(sock: socket.socket) -> bytes:
    """The payload of the next frame from the server (unmasked)."""
    first, second = _exactly(sock, 2)
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", _exactly(sock, 2))[0]
    elif size == 127:
        size = struct.unpack("!Q", _exactly(sock, 8))[0]
    return _exactly(sock, size)


# ------------------------------------------------------------------ MQTT 5.0
# Properties are written and read by paho's own implementation (``props`` below), not
# the broker's: a test never checks the broker's encoding against itself.

NO_PROPS = b"\x00"


def props(packet_type: int, **values: Any) -> bytes:
    """An encoded property list of ``packet_type`` (paho's PacketTypes) with ``values``
    by their paho names (``SessionExpiryInterval=60``)."""
    out = Properties(packet_type)
    for name, value in values.items():
        setattr(out, name, value)
    packed: bytes = out.pack()
    return packed


def connect5(client_id: bytes | str, key: bytes | str | None = None,
             secret: bytes | str | None = None, *, keepalive: int = 30,
             clean_start: bool = True, properties: bytes = NO_PROPS,
             will: tuple[str, bytes, int, bool, bytes] | None = None) -> bytes:
    """An MQTT 5 CONNECT; ``will``: (topic, payload, qos, retain, encoded Will properties)."""
    flags = (0x02 if clean_start else 0) | (0x80 if key is not None else 0) | (
        0x40 if secret is not None else 0)
    tail = b""
    if will is not None:
        topic, payload, qos, retain, will_props = will
        flags |= 0x04 | qos << 3 | (0x20 if retain else 0)
        tail = will_props + field(topic) + field(payload)
    body = (field("MQTT") + bytes([5, flags]) + struct.pack("!H", keepalive) + properties
            + field(client_id) + tail)
    if key is not None:
        body += field(key)
    if secret is not None:
        body += field(secret)
    return packet(0x10, body)


def publish5(topic: bytes | str, payload: bytes = b"x", qos: int = 0, packet_id: int = 0, *,
             retain: bool = False, dup: bool = False, properties: bytes = NO_PROPS) -> bytes:
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    head = field(topic) + (struct.pack("!H", packet_id) if qos else b"")
    return packet(first, head + properties + payload)


def options(qos: int = 0, *, no_local: bool = False, retain_as_published: bool = False,
            retain_handling: int = 0) -> int:
    """Subscription options (MQTT 5 §3.8.3.1)."""
    return qos | (0x04 if no_local else 0) | (0x08 if retain_as_published else 0) | (
        retain_handling << 4)


def subscribe5(filters: list[tuple[str, int]], packet_id: int = 1,
               properties: bytes = NO_PROPS) -> bytes:
    """SUBSCRIBE of (filter, options byte) pairs."""
    body = struct.pack("!H", packet_id) + properties
    for topic_filter, opts in filters:
        body += field(topic_filter) + bytes([opts])
    return packet(0x82, body)


def unsubscribe5(filters: list[str], packet_id: int = 1) -> bytes:
    return packet(0xA2, struct.pack("!H", packet_id) + NO_PROPS
                  + b"".join(field(f) for f in filters))


def ack5(kind: int, packet_id: int, reason: int = 0) -> bytes:
    """PUBACK (4), PUBREC (5), PUBREL (6) or PUBCOMP (7) with a reason code."""
    return packet(kind << 4 | (2 if kind == 6 else 0),
                  struct.pack("!H", packet_id) + bytes([reason]) + NO_PROPS)


def disconnect5(reason: int = 0, properties: bytes = NO_PROPS) -> bytes:
    return packet(0xE0, bytes([reason]) + properties)


class Reply5(NamedTuple):
    """What an MQTT 5 packet from the broker says: its reason code (for SUBACK and
    UNSUBACK, ``codes`` has one per filter) and its properties (paho's)."""

    code: int
    properties: Properties
    codes: tuple[int, ...] = ()

    @property
    def reason(self) -> str | None:
        return getattr(self.properties, "ReasonString", None)


class Publish5(NamedTuple):
    topic: str
    packet_id: int
    properties: Properties
    payload: bytes
    qos: int
    retain: bool


def reply5(reply: Packet) -> Reply5:
    """The reason code and properties of an MQTT 5 CONNACK, PUBACK/PUBREC/PUBREL/PUBCOMP,
    SUBACK, UNSUBACK or DISCONNECT."""
    kind, body = reply.kind, reply.body
    properties = Properties(kind)  # paho's PacketTypes are the packet types
    if kind == 2:  # CONNACK: flags, reason code, properties
        properties.unpack(body[2:])
        return Reply5(body[1], properties)
    if kind in (9, 11):  # SUBACK, UNSUBACK: packet id, properties, a code per filter
        _, used = properties.unpack(body[2:])
        codes = tuple(body[2 + used:])
        return Reply5(max(codes), properties, codes)
    offset = 0 if kind == 14 else 2  # DISCONNECT has no packet id
    if len(body) > offset + 1:
        properties.unpack(body[offset + 1:])
    return Reply5(body[offset] if len(body) > offset else 0, properties)


def publish_of(reply: Packet) -> Publish5:
    """An MQTT 5 PUBLISH from the broker, with its properties."""
    assert reply.kind == 3, reply
    body = reply.body
    size = struct.unpack("!H", body[:2])[0]
    topic, offset = body[2 : 2 + size].decode(), 2 + size
    packet_id = 0
    if reply.qos:
        packet_id = struct.unpack("!H", body[offset : offset + 2])[0]
        offset += 2
    properties = Properties(3)
    _, used = properties.unpack(body[offset:])
    return Publish5(topic, packet_id, properties, body[offset + used:], reply.qos, reply.retain)


def expect(sock: socket.socket, kind: int, timeout: float = 5.0) -> Packet:
    """The next packet, which must be of ``kind`` (a clear failure otherwise)."""
    reply = read_packet(sock, timeout)
    assert reply is not None, f"no packet of type {kind} within {timeout:g}s"
    assert reply.kind == kind, f"expected packet type {kind}, got {reply!r}"
    return reply


def session5(port: int, client_id: str, key: str, secret: str,
             **connect_options: Any) -> tuple[socket.socket, Reply5]:
    """A raw socket that sent an MQTT 5 CONNECT, and what its CONNACK said."""
    sock = open_socket(port)
    sock.sendall(connect5(client_id, key, secret, **connect_options))
    return sock, reply5(expect(sock, 2))


def server_disconnect(sock: socket.socket, within: float = 5.0) -> Reply5 | None:
    """The DISCONNECT the broker sends before it closes the connection (what comes before
    it is skipped), or None when it closes without one."""
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        try:
            reply = read_packet(sock, left)
        except (ConnectionError, OSError):
            return None
        if reply is None:
            break
        if reply.kind == 14:
            return reply5(reply)
    raise AssertionError(f"the broker neither sent a DISCONNECT nor closed within {within:g}s")


def unchecked_props(*pairs: tuple[int, bytes]) -> bytes:
    """A property list of (identifier, encoded value) pairs as given, for values paho
    refuses to write (a Topic Alias or Receive Maximum of 0)."""
    body = b"".join(remaining_length(ident) + value for ident, value in pairs)
    return remaining_length(len(body)) + body
