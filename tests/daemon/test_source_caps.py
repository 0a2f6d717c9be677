"""Per-source caps never lock out a device's neighbours (docs/limits.md#per-source-caps):
devices behind one address (a NAT, a CGNAT, a site gateway) connect whatever half-open
sockets that address also holds, a site's devices reconnecting at once all get in, the
connections closed are the ones idle longest, and closing them bans nobody. Real daemon,
raw sockets from 127.0.0.1 (one source)."""

from __future__ import annotations

import resource
import select
import socket
from pathlib import Path

import pytest
import requests

from broker.policy.guard import GuardSettings
from tests.support import mqtt_raw as raw
from tests.support.harness import Client, RunningBroker, StartDaemon
from tests.support.metrics import parse_samples
from tests.support.process import DaemonProcess
from tests.support.waiting import wait_until

CONNACK_OK = bytes([0x20, 2, 0, 0])


def device_key(daemon: RunningBroker, *devices: str) -> tuple[str, str]:
    for device in devices:
        daemon.ks("add_device", device)
    key, secret = daemon.ks("create_key", device_ids=list(devices))
    return key.key, secret


def connects(daemon: RunningBroker, device: str, key: str, secret: str) -> int:
    """The CONNACK code of one CONNECT."""
    with raw.open_socket(daemon.port()) as sock:
        sock.sendall(raw.connect(device, key, secret))
        packet = raw.read_packet(sock)
        assert packet is not None and packet.kind == 2, packet
        return packet.body[1]


def evicted_count(daemon: RunningBroker, reason: str) -> float:
    """keybroker_connects_refused_total for a connection closed before any CONNECT."""
    text = requests.get(daemon.api_url() + "/metrics", timeout=5).text
    return parse_samples(text).get(
        ("keybroker_connects_refused_total", (("code", "none"), ("reason", reason))), 0.0)


def test_half_open_sockets_do_not_lock_out_a_device_of_the_same_address(
    broker: RunningBroker,
) -> None:
    key, secret = device_key(broker, "site-1", "site-2")
    half_open = [raw.open_socket(broker.port()) for _ in range(200)]
    try:
        # Over the cap of 32 pending: the oldest are closed, down to the cap.
        wait_until(lambda: sum(map(raw.is_closed, half_open)) == 200 - 32, what="168 closed")
        assert all(raw.is_closed(sock) for sock in half_open[:168])
        assert not any(raw.is_closed(sock) for sock in half_open[168:])
        with Client(broker.port(), "site-1", key, secret) as one, \
                Client(broker.port(), "site-2", key, secret) as two:
            assert one.connect() == 0 and two.connect() == 0
            assert two.subscribe("losant/site-1/state", qos=1) == 1
            one.publish("losant/site-1/state", b'{"ok": 1}', qos=1)
            message = two.get()
            assert message is not None and message.payload == b'{"ok": 1}'
        assert evicted_count(broker, "evicted_unauthenticated") >= 168
        assert not any(e["event"] == "ban" for e in broker.audit_events())
    finally:
        for sock in half_open:
            sock.close()


def test_a_burst_of_100_devices_from_one_address_all_connect(broker: RunningBroker) -> None:
    """A site's devices reconnecting at once: all 100 connects started together, each
    CONNECT written the moment its socket is connected (a few milliseconds for all)."""
    devices = [f"burst-{n}" for n in range(100)]
    key, secret = device_key(broker, *devices)
    sockets = [socket.socket() for _ in devices]
    try:
        for sock in sockets:
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", broker.port()))
        unsent = {sock: raw.connect(device, key, secret)
                  for sock, device in zip(sockets, devices, strict=True)}
        while unsent:
            _, writable, _ = select.select([], list(unsent), [], 5)
            assert writable, f"{len(unsent)} sockets not connected within 5 s"
            for sock in writable:
                sock.sendall(unsent.pop(sock))
        answers = []
        for sock in sockets:
            sock.settimeout(5)
            answers.append(sock.recv(4))
        assert answers == [CONNACK_OK] * 100
        assert wait_until(lambda: sum(s.online for s in broker.broker.sessions.values())
                          == 100)
    finally:
        for sock in sockets:
            sock.close()


def test_the_pending_connection_idle_longest_is_the_one_closed(
        daemon_with: StartDaemon) -> None:
    daemon = daemon_with(max_unauthenticated_per_source=4)
    first = raw.open_socket(daemon.port())
    others = [raw.open_socket(daemon.port()) for _ in range(3)]
    admission = daemon.broker.admission
    wait_until(lambda: len(admission.connections) == 4)
    # The first socket opened sends the first byte of a CONNECT: it is no longer the
    # one idle longest; the second opened is.
    first.sendall(b"\x10")
    wait_until(lambda: any(c.framer.packet_started is not None
                           for c in admission.connections))
    extra = raw.open_socket(daemon.port())  # one over the cap
    wait_until(lambda: raw.is_closed(others[0]), what="the second opened is closed")
    assert not raw.is_closed(first) and not raw.is_closed(extra)
    assert not any(raw.is_closed(sock) for sock in others[1:])
    for sock in (first, *others, extra):
        sock.close()
    assert any(e["event"] == "connect_invalid" and e["reason"] == "evicted_unauthenticated"
               for e in daemon.audit_events())


def test_a_source_at_its_connection_cap_makes_room_from_its_pending_ones(
    daemon_with: StartDaemon,
) -> None:
    daemon = daemon_with(max_connections_per_source=3)
    key, secret = device_key(daemon, "a", "b", "c")
    first, second = raw.open_socket(daemon.port()), raw.open_socket(daemon.port())
    device, _ = raw.session(daemon.port(), "a", key, secret)  # the 3rd: at the cap
    # A 4th: the pending one idle longest makes room (the first opened).
    fourth, connack = raw.session(daemon.port(), "b", key, secret)
    assert connack.body[1] == 0
    wait_until(lambda: raw.is_closed(first))
    assert not raw.is_closed(second)
    fifth, connack = raw.session(daemon.port(), "c", key, secret)
    assert connack.body[1] == 0
    wait_until(lambda: raw.is_closed(second))
    # Every connection of the source is past CONNECT: the newcomer is refused.
    with raw.open_socket(daemon.port()) as refused:
        assert raw.closed_by_peer(refused, within=3)
    for sock in (first, second, device, fourth, fifth):
        sock.close()
    assert evicted_count(daemon, "evicted_per_source") == 2
    assert evicted_count(daemon, "max_connections_per_source") == 1


def test_evictions_and_silent_timeouts_never_ban_but_garbage_does(
        daemon_with: StartDaemon) -> None:
    guard = GuardSettings(max_failures=3, window=60, ban=60, max_ban=60)
    daemon = daemon_with(guard=guard, connect_timeout=0.5,
                   max_unauthenticated_per_source=3)
    key, secret = device_key(daemon, "victim")
    silent = [raw.open_socket(daemon.port()) for _ in range(10)]  # 7 evicted, 3 time out
    wait_until(lambda: all(map(raw.is_closed, silent)), what="every silent socket closed")
    for sock in silent:
        sock.close()
    wait_until(lambda: any(e["event"] == "connect_invalid"
                           and e["reason"] == "connect_timeout"
                           for e in daemon.audit_events()))
    assert connects(daemon, "victim", key, secret) == 0  # not banned
    for _ in range(3):  # bytes that are no CONNECT: three failures ban the source
        with raw.open_socket(daemon.port()) as sock:
            sock.sendall(b"\xf0\x00")
            assert raw.closed_by_peer(sock, within=3)
    wait_until(lambda: any(e["event"] == "ban" for e in daemon.audit_events()))
    assert connects(daemon, "victim", key, secret) == 5  # banned now


def _rss_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def _connected(port: int) -> socket.socket:
    """A connected socket. A SYN dropped while the listener's accept queue is full is
    retried by the kernel only after a second: a fresh attempt is quicker."""
    for _ in range(200):
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=0.05)
        except TimeoutError:
            continue
    raise AssertionError(f"cannot connect to 127.0.0.1:{port}")


# The figure docs/limits.md states for one address's half-open sockets.
HALF_OPEN_RSS_BOUND_MIB = 32


def test_ten_thousand_half_open_sockets_from_one_address_stay_within_the_memory_bound(
    tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 10_500:
        pytest.skip(f"needs 10,500 open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 19_000)), hard))
    request.addfinalizer(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
    process = DaemonProcess(tmp_path, "[api]\nenabled = false\n[persistence]\nenabled = false\n")
    port = process.start()
    sockets: list[socket.socket] = []
    try:
        assert process.proc is not None
        pid = process.proc.pid
        with raw.open_socket(port) as warm:  # the accept path has run once
            warm.sendall(b"\xe0\x00")
            assert raw.closed_by_peer(warm, within=5)
        before = _rss_kib(pid, "VmRSS")
        poller = select.poll()
        for _ in range(10_000):
            sock = _connected(port)
            poller.register(sock, select.POLLIN)
            sockets.append(sock)

        def closed_by_daemon() -> bool:
            return len(poller.poll(0)) >= 10_000 - 32

        wait_until(closed_by_daemon, timeout=60, what="all but 32 closed by the daemon")
        grown_mib = (_rss_kib(pid, "VmHWM") - before) / 1024
        assert grown_mib <= HALF_OPEN_RSS_BOUND_MIB, f"RSS peak grew {grown_mib:.1f} MiB"
    finally:
        for sock in sockets:
            sock.close()
        process.kill()
