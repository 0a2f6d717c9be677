"""Plumbing for scripts/abuse_check: a keybroker daemon of any source tree as a subprocess,
its keystore through that tree's CLI, and blocking raw-socket MQTT 3.1.1 / WebSocket
clients. Nothing here imports the project's ``broker`` or ``keystore`` packages, so the
same code drives an older checkout (``PYTHONPATH=<tree> python -m broker.cli``).

Everything talks to 127.0.0.1 only, and every wait is bounded by a deadline.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
CLI_TIMEOUT = 60.0

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14
DISCONNECT_PACKET = b"\xe0\x00"
MAX_REMAINING = 268_435_455
# PUBLISH frames are returned with at most this much of their body (topic + packet id):
# enough to identify them, without copying 250 KiB payloads around.
PUBLISH_HEAD = 1_100


class ProtocolError(Exception):
    """Malformed or unexpected MQTT / WebSocket data."""


class Closed(Exception):
    """The peer closed the connection (EOF or reset)."""


# --------------------------------------------------------------------------- trees, CLI


@dataclass(frozen=True)
class Tree:
    """A keybroker source tree run with ``python`` and ``PYTHONPATH=path``."""

    name: str
    path: Path
    python: str

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("KEYBROKER_CONFIG", "KEYBROKER_DB", "PYTHONPATH")}
        env["PYTHONPATH"] = str(self.path)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env

    def describe(self) -> dict[str, Any]:
        """Commit, dirty paths and where ``broker`` is imported from (a sanity check)."""
        info: dict[str, Any] = {"path": str(self.path), "python": self.python}
        git = ["git", "-C", str(self.path)]
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["commit"] = subprocess.run(
                [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                timeout=10, check=True).stdout.strip()
            dirty = subprocess.run([*git, "status", "--porcelain", "--", "broker", "keystore"],
                                   capture_output=True, text=True, timeout=10).stdout
            info["dirty_code"] = [line[3:] for line in dirty.splitlines()]
        out = subprocess.run(
            [self.python, "-c", "import broker; print(broker.__file__)"],
            capture_output=True, text=True, timeout=30, env=self.env(), cwd="/")
        info["broker_module"] = out.stdout.strip()
        if not info["broker_module"].startswith(str(self.path.resolve())):
            raise RuntimeError(f"tree {self.name}: `import broker` resolves to "
                               f"{info['broker_module'] or out.stderr.strip()!r}, not {self.path}")
        return info


class Keystore:
    """Devices and keys created through the tree's own CLI (``--db DB``)."""

    def __init__(self, tree: Tree, db: Path) -> None:
        self.tree, self.db = tree, db

    def cli(self, *args: str) -> str:
        argv = [self.tree.python, "-m", "broker.cli", "--db", str(self.db), *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=CLI_TIMEOUT,
                              env=self.tree.env(), cwd=self.db.parent, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {done.returncode}: "
                               f"{(done.stderr or done.stdout).strip()}")
        return done.stdout

    def device(self, *device_ids: str) -> None:
        for device_id in device_ids:
            self.cli("devices", "add", device_id)

    def key(self, *devices: str, topics: str | None = None) -> tuple[str, str]:
        """(key, secret) of a new key restricted to ``devices``."""
        args = ["keys", "create", "--json"]
        for device_id in devices:
            args += ["--device", device_id]
        if topics is not None:
            args += ["--topics", topics]
        doc = json.loads(self.cli(*args))
        return str(doc["key"]), str(doc["secret"])


# --------------------------------------------------------------------------- daemon

_LISTENING = re.compile(r"keybroker listening: (.*)")
_LIVE: set[Daemon] = set()
_LIVE_PROCS: set[subprocess.Popen[str]] = set()


def stop_everything() -> None:
    """Stop every daemon and helper process this module started and is still running."""
    for proc in list(_LIVE_PROCS):
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        _LIVE_PROCS.discard(proc)
    for daemon in list(_LIVE):
        daemon.stop()


class Daemon:
    """``python -m broker.cli --db DB serve --config CONF`` of one tree, in ``workdir``.

    A sampler thread reads VmRSS every 0.1 s, keeps the peak since ``mark()``, and kills
    the daemon (SIGKILL) when it passes ``rss_cap_kib``: a runaway broker must not take
    the machine with it.
    """

    def __init__(self, tree: Tree, workdir: Path, db: Path, *, rss_cap_kib: int,
                 log_level: str = "INFO") -> None:
        self.tree, self.workdir, self.db = tree, workdir, db
        self.rss_cap_kib, self.log_level = rss_cap_kib, log_level
        self.audit_path = workdir / "audit.jsonl"
        self.conf_path = workdir / "keybroker.toml"
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.peak_kib = 0
        self.killed_for_rss: int | None = None
        self.exit_code: int | None = None
        self.stop_seconds: float | None = None
        self.stop_signal = ""
        self._sampler: threading.Thread | None = None
        self._sampling = threading.Event()

    def write_config(self) -> None:
        # Only keys both trees know: the newer tree rejects unknown ones.
        self.conf_path.write_text(
            f'[keystore]\npath = "{self.db}"\n\n'
            f'[listeners.tcp]\ntype = "tcp"\nhost = "{HOST}"\nport = 0\n\n'
            f'[listeners.ws]\ntype = "ws"\nhost = "{HOST}"\nport = 0\n\n'
            f'[audit]\npath = "{self.audit_path}"\n',
            encoding="utf-8")

    def start(self) -> Daemon:
        self.write_config()
        argv = [self.tree.python, "-m", "broker.cli", "--db", str(self.db), "serve",
                "--config", str(self.conf_path), "--log-level", self.log_level]
        with open(self.log_path, "wb") as log:
            # Own session: a Ctrl-C in the terminal reaches this script, which stops it.
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.workdir,
                                         env=self.tree.env(), start_new_session=True)
        _LIVE.add(self)
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise
        self._sampling.set()
        self._sampler = threading.Thread(target=self._sample, name="rss", daemon=True)
        self._sampler.start()
        return self

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"daemon exited with {self.proc and self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            match = _LISTENING.search(self.log_path.read_text(errors="replace"))
            if match:
                for name, url in re.findall(r"(\w+)=(\w+://[^\s]+)", match.group(1)):
                    port = re.search(r":(\d+)$", url)
                    if port:
                        self.ports[name] = int(port.group(1))
                if "tcp" not in self.ports or "ws" not in self.ports:
                    raise RuntimeError(f"no tcp/ws port in {match.group(0)!r}")
                return
            time.sleep(0.05)
        raise RuntimeError(f"no 'keybroker listening' line within {START_TIMEOUT}s:\n"
                           f"{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def tcp(self) -> int:
        return self.ports["tcp"]

    @property
    def ws(self) -> int:
        return self.ports["ws"]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kib(self) -> int | None:
        """VmRSS in KiB (also counted in the peak), None once the process is gone."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                kib = int(line.split()[1])
                self.peak_kib = max(self.peak_kib, kib)
                return kib
        return None

    def rss_mib(self) -> float | None:
        kib = self.rss_kib()
        return None if kib is None or not self.alive() else round(kib / 1024, 1)

    def mark(self) -> None:
        """Restart the peak from the current RSS."""
        self.peak_kib = 0
        self.rss_kib()

    def peak_mib(self) -> float:
        """Highest RSS since ``mark()``, including a reading taken now."""
        self.rss_kib()
        return round(self.peak_kib / 1024, 1)

    def _sample(self) -> None:
        while self._sampling.is_set() and self.alive():
            kib = self.rss_kib()
            if kib is not None:
                if kib > self.rss_cap_kib and self.proc is not None:
                    self.killed_for_rss = kib
                    with contextlib.suppress(OSError):
                        self.proc.kill()
                    return
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; records how long it took."""
        self._sampling.clear()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            started = time.monotonic()
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
            self.stop_signal = "SIGTERM"
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.stop_signal = "SIGKILL"
                proc.kill()
                proc.wait(10)
            self.stop_seconds = round(time.monotonic() - started, 2)
        if proc is not None:
            self.exit_code = proc.returncode
        if self._sampler is not None:
            self._sampler.join(2)
        _LIVE.discard(self)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def audit_size(self) -> int:
        try:
            return self.audit_path.stat().st_size
        except OSError:
            return 0

    def audit_events(self, offset: int = 0) -> list[dict[str, Any]]:
        """Audit lines from byte ``offset`` on (a partial last line is skipped)."""
        try:
            with open(self.audit_path, "rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except OSError:
            return []
        out = []
        for line in data.split(b"\n"):
            with contextlib.suppress(ValueError):
                if line.strip():
                    out.append(json.loads(line))
        return out


# --------------------------------------------------------------------------- MQTT codec


def remaining_length(n: int) -> bytes:
    if not 0 <= n <= MAX_REMAINING:
        raise ValueError(f"remaining length {n} out of range")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def mqtt_str(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("!H", len(raw)) + raw


def packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + remaining_length(len(body)) + body


def connect_packet(client_id: str, username: str, password: str, *, keepalive: int = 60,
                   clean_session: bool = True) -> bytes:
    flags = 0xC0 | (0x02 if clean_session else 0)
    body = (mqtt_str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
            + mqtt_str(client_id) + mqtt_str(username) + mqtt_str(password))
    return packet(CONNECT << 4, body)


def subscribe_packet(packet_id: int, filters: Iterable[tuple[str, int]]) -> bytes:
    body = bytearray(struct.pack("!H", packet_id))
    for topic_filter, qos in filters:
        body += mqtt_str(topic_filter) + bytes([qos])
    return packet((SUBSCRIBE << 4) | 0x02, bytes(body))


def publish_packet(topic: str, payload: bytes, *, qos: int = 0, packet_id: int = 0,
                   retain: bool = False) -> bytes:
    head = mqtt_str(topic) + (struct.pack("!H", packet_id) if qos else b"")
    return packet((PUBLISH << 4) | (qos << 1) | int(retain), head + payload)


def ack_packet(ptype: int, packet_id: int) -> bytes:
    flags = 0x02 if ptype == PUBREL else 0
    return bytes([(ptype << 4) | flags, 2]) + struct.pack("!H", packet_id)


@dataclass(frozen=True, slots=True)
class Frame:
    """One MQTT packet. For PUBLISH ``body`` is only its first PUBLISH_HEAD bytes."""

    ptype: int
    flags: int
    body: bytes
    length: int

    @property
    def retain(self) -> bool:
        return bool(self.flags & 0x01)

    @property
    def qos(self) -> int:
        return (self.flags >> 1) & 0x03

    def topic(self) -> str:
        size = int.from_bytes(self.body[:2], "big")
        return self.body[2:2 + size].decode("utf-8", "replace")

    def packet_id(self) -> int:
        """Packet id of a PUBLISH with QoS > 0, or of an ack / SUBACK."""
        if self.ptype == PUBLISH:
            pos = 2 + int.from_bytes(self.body[:2], "big")
            return int.from_bytes(self.body[pos:pos + 2], "big")
        return int.from_bytes(self.body[:2], "big")


class FrameParser:
    """Bytes in, complete frames out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf
        buf += data
        out: list[Frame] = []
        pos, end = 0, len(buf)
        while end - pos >= 2:
            length, mult, i = 0, 1, pos + 1
            while True:
                if i >= end:
                    length = -1
                    break
                if i - pos > 4:
                    raise ProtocolError("malformed remaining length")
                byte = buf[i]
                i += 1
                length += (byte & 0x7F) * mult
                if byte < 0x80:
                    break
                mult <<= 7
            if length < 0 or end - i < length:
                break
            ptype = buf[pos] >> 4
            keep = min(length, PUBLISH_HEAD) if ptype == PUBLISH else length
            out.append(Frame(ptype, buf[pos] & 0x0F, bytes(buf[i:i + keep]), length))
            pos = i + length
        if pos:
            del buf[:pos]
        return out


# --------------------------------------------------------------------------- raw clients


def send_until(sock: socket.socket, data: bytes | memoryview, deadline: float) -> int:
    """Send as much of ``data`` as the peer takes before ``deadline``; bytes sent.
    Raises Closed when the peer resets the connection."""
    view = memoryview(data)
    sent = 0
    while sent < len(view):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        _, writable, _ = select.select([], [sock], [], min(left, 0.5))
        if not writable:
            continue
        try:
            sent += sock.send(view[sent:])
        except BlockingIOError:
            continue
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise Closed(str(exc)) from None
    return sent


class Transport:
    """A non-blocking loopback socket with deadline-bounded reads and writes."""

    def __init__(self, port: int, *, rcvbuf: int | None = None, timeout: float = 10.0) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        try:
            sock.connect((HOST, port))
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        self.sock = sock
        self.closed = False

    def send_all(self, data: bytes | memoryview, timeout: float = 10.0) -> None:
        sent = send_until(self.sock, data, time.monotonic() + timeout)
        if sent < len(data):
            raise TimeoutError(f"peer took {sent} of {len(data)} bytes in {timeout}s")

    def recv(self, deadline: float, size: int = 1 << 18) -> bytes:
        """Some bytes, or b"" at the deadline. Raises Closed on EOF/reset."""
        if self.closed:
            raise Closed("closed")
        # A deadline already past still polls once (select with timeout 0).
        left = max(0.0, deadline - time.monotonic())
        readable, _, _ = select.select([self.sock], [], [], left)
        if not readable:
            return b""
        try:
            data = self.sock.recv(size)
        except BlockingIOError:
            return b""
        except (ConnectionResetError, BrokenPipeError) as exc:
            self.closed = True
            raise Closed(str(exc)) from None
        if not data:
            self.closed = True
            raise Closed("EOF")
        return data

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()


class MqttClient:
    """Blocking raw MQTT 3.1.1 client over TCP (or, subclassed, WebSocket)."""

    def __init__(self, port: int, *, rcvbuf: int | None = None) -> None:
        self.port, self.rcvbuf = port, rcvbuf
        self.transport: Transport | None = None
        self.parser = FrameParser()
        self.pending: list[Frame] = []
        self.session_present = False

    # transport hooks (WebSocket overrides them)
    def _open(self, timeout: float) -> None:
        self.transport = Transport(self.port, rcvbuf=self.rcvbuf, timeout=timeout)

    def send(self, data: bytes | memoryview, timeout: float = 10.0) -> None:
        assert self.transport is not None
        self.transport.send_all(data, timeout)

    def _recv_frames(self, deadline: float) -> list[Frame]:
        assert self.transport is not None
        return self.parser.feed(self.transport.recv(deadline))

    # MQTT
    def connect(self, client_id: str, key: str, secret: str, *, clean_session: bool = True,
                keepalive: int = 60, timeout: float = 10.0) -> int:
        """CONNACK return code (0 = accepted). Raises Closed / TimeoutError."""
        self._open(timeout)
        self.send(connect_packet(client_id, key, secret, keepalive=keepalive,
                                 clean_session=clean_session))
        frame = self.expect(CONNACK, timeout)
        self.session_present = bool(frame.body[0] & 0x01)
        return frame.body[1]

    def frames(self, deadline: float) -> list[Frame]:
        """Frames already read, else wait for some until ``deadline`` (may be [])."""
        if self.pending:
            out, self.pending = self.pending, []
            return out
        return self._recv_frames(deadline)

    def expect(self, ptype: int, timeout: float) -> Frame:
        deadline = time.monotonic() + timeout
        while True:
            for index, frame in enumerate(self.pending):
                if frame.ptype == ptype:
                    del self.pending[index]
                    return frame
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no packet of type {ptype} within {timeout}s")
            self.pending.extend(self._recv_frames(deadline))

    def subscribe(self, filters: Sequence[str], qos: int = 0, *, packet_id: int = 1,
                  timeout: float = 10.0) -> bytes:
        """SUBACK return codes."""
        self.send(subscribe_packet(packet_id, [(f, qos) for f in filters]), timeout)
        return self.expect(SUBACK, timeout).body[2:]

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, packet_id: int = 0,
                retain: bool = False, timeout: float = 10.0) -> None:
        self.send(publish_packet(topic, payload, qos=qos, packet_id=packet_id, retain=retain),
                  timeout)

    def publish_acked(self, topic: str, payload: bytes, *, packet_id: int = 1,
                      retain: bool = False, timeout: float = 10.0) -> float:
        """QoS 1 PUBLISH and wait for its PUBACK; seconds taken."""
        started = time.monotonic()
        self.publish(topic, payload, qos=1, packet_id=packet_id, retain=retain, timeout=timeout)
        deadline = started + timeout
        while True:
            frame = self.expect(PUBACK, max(0.0, deadline - time.monotonic()))
            if frame.packet_id() == packet_id:
                return time.monotonic() - started

    def disconnect(self) -> None:
        if self.transport is not None and not self.transport.closed:
            with contextlib.suppress(Closed, OSError, TimeoutError):
                self.send(DISCONNECT_PACKET, timeout=1.0)
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass
class Drain:
    """What ``drain_publishes`` read."""

    publishes: int = 0
    retained: int = 0
    payload_bytes: int = 0
    other: dict[int, int] = field(default_factory=dict)
    closed_by_broker: bool = False
    seconds: float = 0.0
    first_frames: list[Frame] = field(default_factory=list)
    # seconds from the start of the drain to the first frame of each non-PUBLISH type
    first_seen: dict[int, float] = field(default_factory=dict)


def drain_publishes(client: MqttClient, *, until: float, idle: float | None = None,
                    ack: bool = True, max_publishes: int = 50_000_000,
                    keep: Iterable[int] = ()) -> Drain:
    """Read and count PUBLISH frames until ``until``, or ``idle`` seconds without any,
    or ``max_publishes``; QoS 1 ones are acknowledged when ``ack``. Frames of the
    types in ``keep`` are returned in ``first_frames`` (for SUBACKs read on the way)."""
    started = time.monotonic()
    out = Drain()
    keep_types = set(keep)
    last = started
    while out.publishes < max_publishes:
        now = time.monotonic()
        if now >= until or (idle is not None and now - last >= idle):
            break
        deadline = until if idle is None else min(until, last + idle)
        try:
            frames = client.frames(deadline)
        except Closed:
            out.closed_by_broker = True
            break
        if frames:
            last = time.monotonic()
        acks = bytearray()
        for frame in frames:
            if frame.ptype == PUBLISH:
                out.publishes += 1
                out.retained += frame.retain
                out.payload_bytes += frame.length
                if ack and frame.qos == 1:
                    acks += ack_packet(PUBACK, frame.packet_id())
                elif ack and frame.qos == 2:
                    acks += ack_packet(PUBREC, frame.packet_id())
            else:
                out.other[frame.ptype] = out.other.get(frame.ptype, 0) + 1
                out.first_seen.setdefault(frame.ptype, round(last - started, 4))
                if frame.ptype in keep_types:
                    out.first_frames.append(frame)
                if ack and frame.ptype == PUBREL:
                    acks += ack_packet(PUBCOMP, frame.packet_id())
        if acks:
            try:
                client.send(bytes(acks), timeout=5.0)
            except (Closed, TimeoutError):
                out.closed_by_broker = True
                break
    out.seconds = round(time.monotonic() - started, 3)
    return out


# --------------------------------------------------------------------------- WebSocket

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """One masked client frame (FIN set)."""
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        head = bytes([0x80 | opcode, 0x80 | size])
    elif size < 1 << 16:
        head = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", size)
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", size)
    repeat = (mask * (size // 4 + 1))[:size]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeat, "big")).to_bytes(size, "big")
    return head + mask + masked


class WsMqttClient(MqttClient):
    """MQTT over a hand-made WebSocket (RFC 6455) on a plain socket: HTTP upgrade with
    subprotocol ``mqtt``, masked binary frames out, unmasked frames in."""

    def __init__(self, port: int, *, rcvbuf: int | None = None, path: str = "/mqtt") -> None:
        super().__init__(port, rcvbuf=rcvbuf)
        self.path = path
        self._wsbuf = bytearray()
        self.close_code: int | None = None

    def _open(self, timeout: float) -> None:
        super()._open(timeout)
        assert self.transport is not None
        nonce = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET {self.path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
                   "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n"
                   "Sec-WebSocket-Protocol: mqtt\r\n\r\n")
        self.transport.send_all(request.encode(), timeout)
        deadline = time.monotonic() + timeout
        raw = b""
        while b"\r\n\r\n" not in raw:
            if time.monotonic() >= deadline or len(raw) > 16384:
                raise ProtocolError("no complete HTTP upgrade response")
            raw += self.transport.recv(deadline, 1)  # byte by byte: frames may follow
        head = raw.decode("latin-1")
        if not head.startswith("HTTP/1.1 101"):
            raise ProtocolError(f"upgrade refused: {head.splitlines()[0]!r}")
        accept = base64.b64encode(hashlib.sha1((nonce + WS_GUID).encode()).digest()).decode()  # noqa: S324 - RFC 6455
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in head.split("\r\n")[1:] if line)}
        if headers.get("sec-websocket-accept") != accept:
            raise ProtocolError("bad Sec-WebSocket-Accept")
        if headers.get("sec-websocket-protocol") != "mqtt":
            raise ProtocolError(f"subprotocol {headers.get('sec-websocket-protocol')!r}")

    def send(self, data: bytes | memoryview, timeout: float = 10.0) -> None:
        assert self.transport is not None
        self.transport.send_all(ws_frame(bytes(data)), timeout)

    def _recv_frames(self, deadline: float) -> list[Frame]:
        assert self.transport is not None
        self._wsbuf += self.transport.recv(deadline)
        out: list[Frame] = []
        buf = self._wsbuf
        while len(buf) >= 2:
            opcode, size, pos = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if buf[1] & 0x80:
                raise ProtocolError("masked server frame")
            if size == 126:
                if len(buf) < 4:
                    break
                size, pos = struct.unpack("!H", buf[2:4])[0], 4
            elif size == 127:
                if len(buf) < 10:
                    break
                size, pos = struct.unpack("!Q", buf[2:10])[0], 10
            if len(buf) < pos + size:
                break
            payload = bytes(buf[pos:pos + size])
            del buf[:pos + size]
            if opcode in (0x0, 0x2):
                out.extend(self.parser.feed(payload))
            elif opcode == 0x8:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 0
                self.transport.closed = True
                raise Closed(f"WebSocket close {self.close_code}")
            elif opcode == 0x9:
                self.transport.send_all(ws_frame(payload, 0xA), 5.0)
        return out


# --------------------------------------------------------------------------- victim

VICTIM_CODE = ("import sys; sys.path.insert(0, sys.argv[1]); "
               "from benchlib.abuse import victim_main; victim_main(sys.argv[2])")


def victim_main(arg: str) -> None:
    """Subprocess body: a well-behaved paho-mqtt device doing QoS 1 publish→receive round
    trips on its own echo topic for ``seconds`` (a round trip still open then may take
    ``grace`` seconds more, to learn its length). Prints "ready", then one JSON line."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    opts = json.loads(arg)
    topic = opts["topic"]
    cond = threading.Condition()
    state: dict[str, Any] = {"got": 0, "connected": False, "subscribed": False,
                             "disconnects": 0}

    def on_connect(client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        sock = client.socket()
        if sock is not None:  # paho leaves Nagle on: 40 ms delayed-ACK stalls otherwise
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not reason.is_failure:
            client.subscribe(topic, qos=1)  # again after a reconnect (clean session)
            with cond:
                state["connected"] = True
                cond.notify_all()

    def on_subscribe(_c: Any, _u: Any, _m: Any, _r: Any, _p: Any) -> None:
        with cond:
            state["subscribed"] = True
            cond.notify_all()

    def on_disconnect(_c: Any, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
        with cond:
            state["disconnects"] += 1
            state["subscribed"] = False

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        with contextlib.suppress(ValueError):
            seq = int(message.payload.split(b":")[0])
            with cond:
                state["got"] = max(state["got"], seq)
                cond.notify_all()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=opts["client_id"],
                         clean_session=True, protocol=mqtt.MQTTv311)
    client.username_pw_set(opts["key"], opts["secret"])
    client.on_connect, client.on_subscribe = on_connect, on_subscribe
    client.on_disconnect, client.on_message = on_disconnect, on_message
    client.connect(HOST, opts["port"], keepalive=60)
    client.loop_start()
    try:
        with cond:
            if not cond.wait_for(lambda: state["subscribed"], timeout=15):
                raise RuntimeError("victim could not connect and subscribe within 15 s")
        print("ready", flush=True)
        rtts: list[float] = []
        unfinished = late_answer = 0.0
        deadline = time.monotonic() + float(opts["seconds"])
        seq = 0
        while seq < 1_000_000 and time.monotonic() < deadline:
            seq += 1
            started = time.monotonic()
            client.publish(topic, f"{seq}:".encode().ljust(64, b"."), qos=1)
            with cond:
                done = cond.wait_for(lambda s=seq: state["got"] >= s,  # type: ignore[misc]
                                     timeout=max(0.0, deadline - started))
            if not done:
                # Still unanswered at the end of the window: wait up to ``grace`` more
                # seconds to learn how long this round trip really takes.
                with cond:
                    late = cond.wait_for(lambda s=seq: state["got"] >= s,  # type: ignore[misc]
                                         timeout=float(opts["grace"]))
                waited = time.monotonic() - started
                if late and waited >= 0.5:
                    late_answer = waited
                elif not late:
                    unfinished = waited
                break
            rtts.append(time.monotonic() - started)
        rtts_sorted = sorted(rtts)
        result = {
            "round_trips": len(rtts),
            "worst_s": round(max([*rtts, unfinished, late_answer], default=0.0), 4),
            "worst_in_window_s": round(max(rtts, default=0.0), 4),
            "answered_after_window_s": round(late_answer, 3) or None,
            "median_s": round(rtts_sorted[len(rtts) // 2], 5) if rtts else None,
            "unfinished_s": round(unfinished, 3),
            "disconnects": state["disconnects"],
        }
        print(json.dumps(result), flush=True)
    finally:
        client.disconnect()
        client.loop_stop()


class Victim:
    """Runs ``victim_main`` in its own process (so the attacker's reading does not share
    its interpreter); ``start()`` returns when it is subscribed."""

    def __init__(self, tree_python: str, scripts_dir: Path, *, port: int, key: str,
                 secret: str, client_id: str = "victim", seconds: float = 15.0,
                 grace: float = 15.0) -> None:
        self.opts: dict[str, Any] = {
            "port": port, "key": key, "secret": secret, "client_id": client_id,
            "topic": f"losant/{client_id}/echo", "seconds": seconds, "grace": grace}
        self.python, self.scripts_dir = tree_python, scripts_dir
        self.proc: subprocess.Popen[str] | None = None
        self.deadline = 0.0

    def start(self) -> Victim:
        self.proc = subprocess.Popen(
            [self.python, "-c", VICTIM_CODE, str(self.scripts_dir), json.dumps(self.opts)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True)
        _LIVE_PROCS.add(self.proc)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self.proc.kill()
            _, err = self.proc.communicate(timeout=5)
            raise RuntimeError(f"victim did not start: {line!r} {err.strip()[-500:]}")
        self.deadline = time.monotonic() + float(self.opts["seconds"])
        return self

    def result(self) -> dict[str, Any]:
        assert self.proc is not None
        try:
            out, err = self.proc.communicate(timeout=max(0.0, self.deadline - time.monotonic())
                                             + float(self.opts["grace"]) + 15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate(timeout=5)
            return {"error": "victim process did not finish (killed)"}
        finally:
            _LIVE_PROCS.discard(self.proc)
        for line in reversed(out.splitlines()):
            if line.startswith("{"):
                return dict(json.loads(line))
        return {"error": f"victim exit {self.proc.returncode}: {err.strip()[-500:]}"}
