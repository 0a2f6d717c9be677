"""One device must not be able to freeze, starve or bloat the broker: each attack found by
the adversarial review of 1fab2f7, run with one ordinary device key against a real daemon,
next to a victim whose traffic must keep flowing. Raw sockets where a client library
would hide the attack."""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.core.audit import AuditLog
from broker.policy.guard import GuardSettings
from keystore import KeyStore
from tests.support import mqtt_raw as raw
from tests.support.harness import Client, RunningBroker, broker_settings

PUBLISH, SUBACK = 3, 9


def wait_for_event(daemon: RunningBroker, event: str, within: float = 3.0) -> None:
    """Audit lines written by the daemon's once-a-second housekeeping."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if any(e["event"] == event for e in daemon.audit_events()):
            return
        time.sleep(0.1)


def start(tmp_path: Path, **overrides: object) -> RunningBroker:
    daemon = RunningBroker(broker_settings(tmp_path, **overrides)).start()
    for device in ("att", "victim", "feeder"):
        daemon.ks("add_device", device)
    return daemon


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[RunningBroker]:
    running = start(tmp_path, max_retained_per_key=0, slow_consumer_timeout=1.0)
    try:
        yield running
    finally:
        running.stop()


def attacker(daemon: RunningBroker, **options: object) -> tuple[str, str]:
    """An ordinary device key: one device, no custom topics (unless options say so)."""
    key, secret = daemon.ks("create_key", device_ids=["att"], **options)
    return key.key, secret


class Victim:
    """A well-behaved device measuring its QoS 1 round trips while an attack runs."""

    def __init__(self, daemon: RunningBroker) -> None:
        key, secret = daemon.ks("create_key", device_ids=["victim"])
        self.client = Client(daemon.port(), "victim", key.key, secret)
        assert self.client.connect() == 0
        assert self.client.subscribe("losant/victim/echo", 1) == 1
        self.worst = 0.0
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.client.publish("losant/victim/echo", b"ping", qos=1)
            message = self.client.get(timeout=30)
            assert message is not None
            self.worst = max(self.worst, time.monotonic() - started)
            self.rounds += 1
            time.sleep(0.02)

    def __enter__(self) -> Victim:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(35)
        self.client.close()


def subscribe_packet(filters: list[str], packet_id: int = 1) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(raw.field(f) + b"\x00" for f in filters)
    return raw.packet(0x82, body)


def read_suback(sock: socket.socket) -> raw.Packet:
    while True:
        packet = raw.read_packet(sock, 10)
        assert packet is not None, "no SUBACK"
        if packet.kind == SUBACK:
            return packet


def drain_publishes(sock: socket.socket, quiet: float = 1.0) -> list[raw.Packet]:
    out = []
    while (packet := raw.read_packet(sock, quiet)) is not None:
        if packet.kind == PUBLISH:
            out.append(packet)
    return out


def retain_many(daemon: RunningBroker, count: int) -> None:
    key, secret = daemon.ks("create_key", device_ids=["feeder"], topic_mode="all")
    with Client(daemon.port(), "feeder", key.key, secret) as feeder:
        assert feeder.connect() == 0
        for i in range(count):
            feeder.client.publish(f"fleet/{i}/config", b"c" * 100, qos=0, retain=True)
        feeder.publish("fleet/last", b"x", qos=1, retain=True)  # after all the others
    assert len(daemon.broker.router.retained) == count + 1


# --- 1. one SUBSCRIBE freezes the broker ---------------------------------------------------

def test_a_subscribe_repeating_hash_neither_stalls_others_nor_multiplies_deliveries(
    daemon: RunningBroker,
) -> None:
    retain_many(daemon, 5000)
    key, secret = attacker(daemon)
    with Client(daemon.port(), "att", key, secret) as own:
        assert own.connect() == 0
        for i in range(20):
            own.publish(f"losant/att/r{i}", b"mine", qos=1, retain=True)
    sock, _ = raw.session(daemon.port(), "att", key, secret)
    with sock, Victim(daemon) as victim:
        sock.sendall(subscribe_packet(["#"] * 5000))
        suback = read_suback(sock)
        assert suback.body[2:] == bytes(5000)  # every copy granted QoS 0, one per request
        received = drain_publishes(sock)
        time.sleep(0.5)
    # Its own 20 retained messages once each (not 5,000 times each), nothing of the fleet.
    assert sorted(p.topic for p in received) == sorted(f"losant/att/r{i}" for i in range(20))
    assert victim.rounds > 0 and victim.worst < 2.0, f"victim stalled {victim.worst:.1f}s"


def test_filters_past_the_subscription_cap_are_refused_cheaply(daemon: RunningBroker) -> None:
    key, secret = attacker(daemon)
    sock, _ = raw.session(daemon.port(), "att", key, secret)
    filters = [f"losant/att/{i}" for i in range(14_000)]
    with sock, Victim(daemon) as victim:
        sock.sendall(subscribe_packet(filters))
        suback = read_suback(sock)
        time.sleep(0.3)
    limit = daemon.settings.max_subscriptions
    assert suback.body[2:] == bytes(limit) + bytes([0x80]) * (len(filters) - limit)
    assert victim.worst < 2.0, f"victim stalled {victim.worst:.1f}s"
    refused = [e for e in daemon.audit_events() if e["event"] == "subscribe_denied"]
    assert len(refused) == 1 and f"{len(filters) - limit} filters refused" in refused[0]["reason"]


# --- 2. memory bounded by bytes ------------------------------------------------------------

def test_an_offline_queue_is_bounded_by_bytes(tmp_path: Path) -> None:
    daemon = start(tmp_path, max_session_bytes=256 * 1024)
    try:
        key, secret = daemon.ks("create_key", device_ids=["att", "feeder"])
        sock, _ = raw.session(daemon.port(), "att", key.key, secret, clean=False)
        sock.sendall(raw.subscribe("losant/att/command", 1, 1))
        read_suback(sock)
        sock.close()
        time.sleep(0.3)
        with Client(daemon.port(), "feeder", key.key, secret) as feeder:
            assert feeder.connect() == 0
            for i in range(20):
                feeder.publish("losant/att/command", bytes([i]) * 100_000, qos=1)
        session = daemon.broker.sessions["att"]
        assert session.outbox.held_bytes <= 256 * 1024
        sock, connack = raw.session(daemon.port(), "att", key.key, secret, clean=False)
        with sock:
            assert connack.body == bytes([1, 0])
            got = drain_publishes(sock)
        assert [p.payload[0] for p in got] == [0, 1]  # the first ones, in order; 18 dropped
        assert daemon.broker.router.traffic.dropped["offline_queue_full"] == 18
    finally:
        daemon.stop()


def test_retained_bytes_are_bounded_globally(tmp_path: Path) -> None:
    daemon = start(tmp_path, max_retained_bytes=300_000, device_retained_reserve=0)
    try:
        key, secret = attacker(daemon)
        with Client(daemon.port(), "att", key, secret) as client:
            assert client.connect() == 0
            for i in range(5):
                client.publish(f"losant/att/big{i}", b"x" * 100_000, qos=1, retain=True)
        time.sleep(0.2)
        assert len(daemon.broker.router.retained) == 2
        assert any(e["event"] == "retain_refused" and "max_retained_bytes" in e["reason"]
                   for e in daemon.audit_events())
    finally:
        daemon.stop()


# --- 3. one device takes every retained slot -----------------------------------------------

def test_retained_quota_per_key_and_a_reserve_for_a_devices_own_topics(tmp_path: Path) -> None:
    daemon = start(tmp_path, max_retained_per_key=5, max_retained_messages=8,
                   device_retained_reserve=2)
    try:
        key, secret = attacker(daemon, topic_mode="all")
        other, other_secret = daemon.ks("create_key", device_ids=["feeder"], topic_mode="all")
        victim, victim_secret = daemon.ks("create_key", device_ids=["victim"])
        with Client(daemon.port(), "att", key, secret) as client:
            assert client.connect() == 0
            for i in range(50):
                client.publish(f"grab/{i}", b"mine", qos=1, retain=True)
            for i in range(3):  # its own device topics: the reserve of 2, then its quota
                client.publish(f"losant/att/s{i}", b"own", qos=1, retain=True)
        retained = daemon.broker.router.retained.store
        assert sum(1 for _ in retained.matching("+/grab/#")) == 5  # the key's quota, not 50
        assert sum(1 for _ in retained.matching("+/losant/att/#")) == 2  # reserve; quota full
        with Client(daemon.port(), "feeder", other.key, other_secret) as client:
            assert client.connect() == 0
            for i in range(5):
                client.publish(f"other/{i}", b"theirs", qos=1, retain=True)
        # The global cap (8) is now full, yet a device can still retain its own state.
        assert sum(1 for _ in retained.matching("+/other/#")) == 3
        with Client(daemon.port(), "victim", victim.key, victim_secret) as client:
            assert client.connect() == 0
            client.publish("losant/victim/state", b"ok", qos=1, retain=True)
        assert [m.topic for _, m in retained.matching("+/losant/victim/state")] == [
            "losant/victim/state"]
        reasons = [e["reason"] for e in daemon.audit_events() if e["event"] == "retain_refused"]
        assert any("key quota" in r for r in reasons) and any("max_retained_messages" in r
                                                              for r in reasons)
    finally:
        daemon.stop()


# --- 4. the slow-consumer bound on WebSocket -------------------------------------------------

def test_a_websocket_subscriber_that_never_reads_is_bounded_like_tcp(
    daemon: RunningBroker,
) -> None:
    key, secret = attacker(daemon)
    feeder, feeder_secret = daemon.ks("create_key", device_ids=["feeder", "att"])
    ws = raw.ws_open(daemon.port("ws"), rcvbuf=4096)
    raw.ws_send(ws, raw.connect("att", key, secret))
    assert raw.ws_recv(ws) == bytes([0x20, 2, 0, 0])
    raw.ws_send(ws, raw.subscribe("losant/att/feed"))
    assert raw.ws_recv(ws)[0] == 0x90
    # From here on the subscriber reads nothing.
    sent = 0
    with Client(daemon.port(), "feeder", feeder.key, feeder_secret) as publisher:
        assert publisher.connect() == 0
        while sent < 1000 and not any(e["event"] == "kick" for e in daemon.audit_events()):
            for _ in range(10):
                publisher.publish("losant/att/feed", b"z" * 10_000, qos=1)
            sent += 10
    kicks = [e for e in daemon.audit_events() if e["event"] == "kick"]
    assert kicks and kicks[0]["reason"] == "slow_consumer"
    # ~256 KiB of budget plus what the kernel buffers: amqtt held 1,025 messages (+259 MiB).
    assert sent <= 600, f"disconnected only after {sent} messages of 10 KB"
    ws.close()


# --- 5. audit flood from an unauthenticated source -------------------------------------------

def test_refusals_while_banned_are_one_line_per_ban(tmp_path: Path) -> None:
    guard = GuardSettings(max_failures=3, window=60, ban=2, max_ban=2)
    daemon = start(tmp_path, guard=guard)
    try:
        key, secret = attacker(daemon)
        for _ in range(200):  # 3 failures ban the source; 197 more tries while banned
            with raw.open_socket(daemon.port()) as sock:
                sock.sendall(raw.connect("att", key, "wrong"))
                raw.closed_by_peer(sock, within=2)
        time.sleep(1.0)
        wait_for_event(daemon, "ban_ended")  # when the ban is over, within a second
        events = daemon.audit_events()
        assert len([e for e in events if e["event"] == "connect_refused"]) == 3
        assert [e["event"] for e in events].count("ban") == 1
        assert [e["reason"] for e in events if e["event"] == "ban_ended"] == [
            "197 CONNECTs refused during the ban"]
        with Client(daemon.port(), "att", key, secret) as client:
            assert client.connect() == 0  # the ban is over
    finally:
        daemon.stop()


def test_bad_packets_from_one_source_are_rate_limited_in_the_audit(tmp_path: Path) -> None:
    daemon = start(tmp_path, guard=GuardSettings(max_failures=0))  # no ban: only the limit
    try:
        for _ in range(300):  # garbage instead of CONNECT
            with raw.open_socket(daemon.port()) as sock:
                sock.sendall(b"\xf0\x00")  # a reserved packet type
                raw.closed_by_peer(sock, within=2)
        wait_for_event(daemon, "audit_suppressed")  # counts are written once a second
        events = daemon.audit_events()
        bad = [e for e in events if e["event"] == "bad_packet"]
        suppressed = [e for e in events if e["event"] == "audit_suppressed"]
        assert len(bad) <= 60, f"{len(bad)} lines for 300 bad connections"
        counted = sum(int(e["reason"].split()[0]) for e in suppressed)
        assert len(bad) + counted == 300  # nothing unaccounted for
    finally:
        daemon.stop()


# --- 6. per-source connection limits ---------------------------------------------------------

def test_unauthenticated_connections_are_capped_per_source(tmp_path: Path) -> None:
    """Over the cap, the source's connection idle longest is closed, not the newest."""
    daemon = start(tmp_path, max_unauthenticated_per_source=5, max_connections=60)
    try:
        key, secret = daemon.ks("create_key", device_ids=["victim"])
        silent = [raw.open_socket(daemon.port()) for _ in range(5)]
        with raw.open_socket(daemon.port()) as extra:
            assert raw.closed_by_peer(silent[0], within=2)  # the oldest
            assert not raw.is_closed(extra)  # not the newest
        # Another source is not affected.
        other = socket.socket()
        other.bind(("127.0.0.2", 0))
        other.settimeout(5)
        other.connect(("127.0.0.1", daemon.port()))
        with other:
            other.sendall(raw.connect("victim", key.key, secret))
            assert other.recv(4) == bytes([0x20, 2, 0, 0])
        assert any(e["event"] == "connect_invalid"
                   and e["reason"] == "evicted_unauthenticated"
                   for e in daemon.audit_events())
        for sock in silent:
            sock.close()
    finally:
        daemon.stop()


def test_incomplete_connects_count_in_the_guard_and_silence_does_not(tmp_path: Path) -> None:
    """A CONNECT begun and never finished is a failure; a socket that sends nothing until
    the CONNECT timeout is not (it may be a neighbour's, behind the same address)."""
    guard = GuardSettings(max_failures=3, window=60, ban=60, max_ban=60)
    daemon = start(tmp_path, guard=guard, connect_timeout=0.5, packet_timeout=0.5)
    try:
        key, secret = daemon.ks("create_key", device_ids=["victim"])
        silent = [raw.open_socket(daemon.port()) for _ in range(3)]
        for sock in silent:
            assert raw.closed_by_peer(sock, within=3)
            sock.close()
        with Client(daemon.port(), "victim", key.key, secret) as client:
            assert client.connect() == 0  # three timeouts: not banned
        started = [raw.open_socket(daemon.port()) for _ in range(3)]
        for sock in started:
            sock.sendall(raw.connect("victim", key.key, secret)[:5])
        for sock in started:
            assert raw.closed_by_peer(sock, within=3)
            sock.close()
        wait_for_event(daemon, "ban")
        with Client(daemon.port(), "victim", key.key, secret) as client:
            assert client.connect() == 5  # banned, although the key is right
        assert any(e["event"] == "ban" for e in daemon.audit_events())
    finally:
        daemon.stop()


# --- 8. narrowing a key reaches live sessions ---------------------------------------------------

def test_narrowing_a_key_applies_to_its_live_sessions(daemon: RunningBroker) -> None:
    key, secret = daemon.ks("create_key", device_ids=["att"], topic_mode="all")
    watcher_key, watcher_secret = daemon.ks("create_key", device_ids=["victim"],
                                            topic_mode="all")
    with Client(daemon.port(), "att", key.key, secret) as client, \
            Client(daemon.port(), "victim", watcher_key.key, watcher_secret) as watcher:
        assert client.connect() == 0 and watcher.connect() == 0
        assert client.subscribe("news/#") == 0
        assert watcher.subscribe("alerts/#") == 0
        client.publish("alerts/1", b"before", qos=1)
        assert watcher.get() is not None
        daemon.ks("update_key", key.key, topic_mode="none")
        time.sleep(1.0)  # a few watcher ticks
        client.publish("alerts/2", b"after", qos=1)
        watcher.publish("news/1", b"to-the-narrowed-session", qos=1)
        assert watcher.get(0.7) is None  # its publish was dropped
        assert client.get(0.7) is None  # and it no longer receives custom topics
        assert not client.disconnected.is_set()  # still connected for its device topics
        daemon.ks("update_key", key.key, address_mode="only", addresses=["10.0.0.0/8"])
        assert client.disconnected.wait(2)
    assert any(e["event"] == "kick" and e["reason"] == "ip_denied"
               for e in daemon.audit_events())


# --- 9. retained data outlives its device -----------------------------------------------------

def test_removing_a_device_drops_its_retained_messages_and_session(
    daemon: RunningBroker,
) -> None:
    key, secret = daemon.ks("create_key", device_ids=["att"])
    with Client(daemon.port(), "att", key.key, secret, clean_session=False) as client:
        assert client.connect() == 0
        assert client.subscribe("losant/att/command", 1) == 1
        client.publish("losant/att/secret", b"old-owner", qos=1, retain=True)
    daemon.ks("remove_devices", ["att"])
    deadline = time.monotonic() + 2
    while "att" in daemon.broker.sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "att" not in daemon.broker.sessions
    daemon.ks("add_device", "att")
    fresh, fresh_secret = daemon.ks("create_key", device_ids=["att"])
    with Client(daemon.port(), "att", fresh.key, fresh_secret) as client:
        assert client.connect() == 0
        assert client.subscribe("losant/att/#", 1) == 1
        assert client.get(0.7) is None


# --- 10. loose file modes ----------------------------------------------------------------------

async def test_existing_keystore_and_audit_files_are_made_private(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    db = tmp_path / "keystore.db"
    async with KeyStore.open(db) as ks:
        await ks.add_device("d")  # creates -wal/-shm next to it
    audit = tmp_path / "audit.jsonl"
    audit.write_text("")
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), audit):
        if path.exists():
            os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING):
        async with KeyStore.open(db):
            for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
                if path.exists():
                    assert path.stat().st_mode & 0o777 == 0o600, path
        AuditLog(audit).close()
    assert audit.stat().st_mode & 0o777 == 0o600
    assert any("tightened to 0600" in r.message and "keystore.db" in r.message
               for r in caplog.records)


# --- 11. PUBLISH with QoS 3 -----------------------------------------------------------------------

def test_publish_with_qos_3_closes_the_connection(daemon: RunningBroker) -> None:
    key, secret = attacker(daemon)
    sock, _ = raw.session(daemon.port(), "att", key, secret)
    with sock:
        sock.sendall(raw.packet(0x36, raw.field("losant/att/x") + b"\x00\x01payload"))
        assert raw.closed_by_peer(sock, within=2)
    time.sleep(0.1)
    assert any(e["event"] == "bad_packet" and "QoS 3" in (e["reason"] or "")
               for e in daemon.audit_events())
