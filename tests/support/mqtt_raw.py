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
