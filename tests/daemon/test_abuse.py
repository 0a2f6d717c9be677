"""One device must not be able to freeze, starve or bloat the broker: each attack run with
one ordinary device key against a real daemon, next to a victim whose traffic must keep
flowing. Raw sockets where a client library would hide the attack."""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from pathlib import Path

import pytest

from broker.core.audit import AuditLog
from broker.policy.guard import GuardSettings
from keystore import KeyStore
from tests.support import mqtt_raw as raw
from tests.support.harness import TIMEOUT, Client, RunningBroker, StartDaemon, revocation_bound
from tests.support.waiting import wait_until

PUBLISH, SUBACK = 3, 9
# The daemon's once-a-second housekeeping (bans ended, suppressed counts) writes its audit
# lines within this: generous, not a speed.
HOUSEKEEPING = 5.0


def start(daemon_with: StartDaemon, **overrides: object) -> RunningBroker:
    daemon = daemon_with(**overrides)
    for device in ("att", "victim", "feeder"):
        daemon.ks("add_device", device)
    return daemon


@pytest.fixture
def daemon(daemon_with: StartDaemon) -> RunningBroker:
    return start(daemon_with, max_retained_per_key=0, slow_consumer_timeout=1.0)


def attacker(daemon: RunningBroker, **options: object) -> tuple[str, str]:
    """An ordinary device key: one device, no custom topics (unless options say so)."""
    key, secret = daemon.ks("create_key", device_ids=["att"], **options)
    return key.key, secret


class Victim:
    """A well-behaved device doing QoS 1 round trips (publish, receive its own echo) one
    after another while an attack runs. Every round trip must complete: one whose echo
    does not arrive within the harness's wait for a message (TIMEOUT) ends the victim
    and is counted in ``lost``."""

    def __init__(self, daemon: RunningBroker) -> None:
        key, secret = daemon.ks("create_key", device_ids=["victim"])
        self.client = Client(daemon.port(), "victim", key.key, secret)
        assert self.client.connect() == 0
        assert self.client.subscribe("losant/victim/echo", 1) == 1
        self.rounds = 0
        self.lost = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.client.publish("losant/victim/echo", str(self.rounds), qos=1)
            message = self.client.get(timeout=TIMEOUT)
            if message is None or message.payload != str(self.rounds).encode():
                self.lost += 1
                return
            self.rounds += 1

    def kept_going(self, since: int, more: int = 3) -> None:
        """``more`` round trips completed after the count was ``since``, none lost."""
        wait_until(lambda: self.rounds >= since + more or self.lost, 3 * TIMEOUT)
        assert self.lost == 0 and self.rounds >= since + more, (self.rounds, self.lost)

    def __enter__(self) -> Victim:
        self._thread.start()
        self.kept_going(0, 1)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(2 * TIMEOUT)
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


# --- one SUBSCRIBE freezes the broker ---------------------------------------------------

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
        before = victim.rounds
        sock.sendall(subscribe_packet(["#"] * 5000))
        suback = read_suback(sock)
        assert suback.body[2:] == bytes(5000)  # every copy granted QoS 0, one per request
        received = drain_publishes(sock)
        victim.kept_going(before)  # its round trips went on through the attack and after
        assert daemon.broker.router.subtree.count_of("att") == 1  # one subscription
    # Its own 20 retained messages once each (not 5,000 times each), nothing of the fleet.
    assert sorted(p.topic for p in received) == sorted(f"losant/att/r{i}" for i in range(20))


def test_filters_past_the_subscription_cap_are_refused_cheaply(daemon: RunningBroker) -> None:
    key, secret = attacker(daemon)
    sock, _ = raw.session(daemon.port(), "att", key, secret)
    filters = [f"losant/att/{i}" for i in range(14_000)]
    with sock, Victim(daemon) as victim:
        before = victim.rounds
        sock.sendall(subscribe_packet(filters))
        suback = read_suback(sock)
        victim.kept_going(before)  # through the attack and after it
        limit = daemon.settings.max_subscriptions
        assert daemon.broker.router.subtree.count_of("att") == limit  # while connected
    assert suback.body[2:] == bytes(limit) + bytes([0x80]) * (len(filters) - limit)
    refused = [e for e in daemon.audit_events() if e["event"] == "subscribe_denied"]
    assert len(refused) == 1 and f"{len(filters) - limit} filters refused" in refused[0]["reason"]


# --- memory bounded by bytes ------------------------------------------------------------

def test_an_offline_queue_is_bounded_by_bytes(daemon_with: StartDaemon) -> None:
    daemon = start(daemon_with, max_session_bytes=256 * 1024)
    key, secret = daemon.ks("create_key", device_ids=["att", "feeder"])
    sock, _ = raw.session(daemon.port(), "att", key.key, secret, clean=False)
    sock.sendall(raw.subscribe("losant/att/command", 1, 1))
    read_suback(sock)
    sock.close()
    wait_until(lambda: daemon.offline("att"))
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


def test_retained_bytes_are_bounded_globally(daemon_with: StartDaemon) -> None:
    daemon = start(daemon_with, max_retained_bytes=300_000, device_retained_reserve=0)
    key, secret = attacker(daemon)
    with Client(daemon.port(), "att", key, secret) as client:
        assert client.connect() == 0
        for i in range(5):  # each PUBACK comes once its message is retained or refused
            client.publish(f"losant/att/big{i}", b"x" * 100_000, qos=1, retain=True)
    assert len(daemon.broker.router.retained) == 2
    assert daemon.audited("retain_refused", "max_retained_bytes")


# --- one device takes every retained slot -----------------------------------------------

def test_retained_quota_per_key_and_a_reserve_for_a_devices_own_topics(
        daemon_with: StartDaemon) -> None:
    daemon = start(daemon_with, max_retained_per_key=5, max_retained_messages=8,
                   device_retained_reserve=2)
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
    reasons = [e["reason"] for e in daemon.audited("retain_refused")]
    assert any("key quota" in r for r in reasons) and any("max_retained_messages" in r
                                                          for r in reasons)


# --- the slow-consumer bound on WebSocket -------------------------------------------------

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
        while sent < 1000 and not daemon.audited("kick"):
            for _ in range(10):
                publisher.publish("losant/att/feed", b"z" * 10_000, qos=1)
            sent += 10
    kicks = daemon.audited("kick")
    assert kicks and kicks[0]["reason"] == "slow_consumer"
    # ~256 KiB of budget plus what the kernel buffers: amqtt held 1,025 messages (+259 MiB).
    assert sent <= 600, f"disconnected only after {sent} messages of 10 KB"
    ws.close()


# --- audit flood from an unauthenticated source -------------------------------------------

def test_refusals_while_banned_are_one_line_per_ban(daemon_with: StartDaemon) -> None:
    guard = GuardSettings(max_failures=3, window=60, ban=2, max_ban=2)
    daemon = start(daemon_with, guard=guard)
    key, secret = attacker(daemon)
    for _ in range(200):  # 3 failures ban the source; 197 more tries while banned
        with raw.open_socket(daemon.port()) as sock:
            sock.sendall(raw.connect("att", key, "wrong"))
            raw.closed_by_peer(sock, within=2)
    # When the ban is over: its 2 s, then the once-a-second housekeeping.
    daemon.wait_audited("ban_ended", timeout=guard.ban + HOUSEKEEPING)
    events = daemon.audit_events()
    assert len([e for e in events if e["event"] == "connect_refused"]) == 3
    assert [e["event"] for e in events].count("ban") == 1
    assert [e["reason"] for e in events if e["event"] == "ban_ended"] == [
        "197 CONNECTs refused during the ban"]
    with Client(daemon.port(), "att", key, secret) as client:
        assert client.connect() == 0  # the ban is over


def test_bad_packets_from_one_source_are_rate_limited_in_the_audit(
        daemon_with: StartDaemon) -> None:
    daemon = start(daemon_with, guard=GuardSettings(max_failures=0))  # no ban: only the limit
    for _ in range(300):  # garbage instead of CONNECT
        with raw.open_socket(daemon.port()) as sock:
            sock.sendall(b"\xf0\x00")  # a reserved packet type
            raw.closed_by_peer(sock, within=2)

    def accounted() -> tuple[int, int] | None:
        """The bad_packet lines and the count of those suppressed, once these add up to
        every bad connection (the counts are written once a second)."""
        bad = len(daemon.audited("bad_packet"))
        counted = sum(int(e["reason"].split()[0]) for e in daemon.audited("audit_suppressed"))
        return (bad, counted) if bad + counted >= 300 else None

    bad, counted = wait_until(accounted, HOUSEKEEPING)
    assert bad <= 60, f"{bad} lines for 300 bad connections"
    assert bad + counted == 300  # nothing unaccounted for


# --- per-source connection limits ---------------------------------------------------------

def test_unauthenticated_connections_are_capped_per_source(daemon_with: StartDaemon) -> None:
    """Over the cap, the source's connection idle longest is closed, not the newest."""
    daemon = start(daemon_with, max_unauthenticated_per_source=5, max_connections=60)
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
    assert any(e["reason"] == "evicted_unauthenticated"
               for e in daemon.audited("connect_invalid"))
    for sock in silent:
        sock.close()


def test_incomplete_connects_count_in_the_guard_and_silence_does_not(
        daemon_with: StartDaemon) -> None:
    """A CONNECT begun and never finished is a failure; a socket that sends nothing until
    the CONNECT timeout is not (it may be a neighbour's, behind the same address)."""
    guard = GuardSettings(max_failures=3, window=60, ban=60, max_ban=60)
    daemon = start(daemon_with, guard=guard, connect_timeout=0.5, packet_timeout=0.5)
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
    daemon.wait_audited("ban")
    with Client(daemon.port(), "victim", key.key, secret) as client:
        assert client.connect() == 5  # banned, although the key is right


# --- narrowing a key reaches live sessions ---------------------------------------------------

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
        session = daemon.broker.sessions["att"]
        grant = session.grant
        daemon.ks("update_key", key.key, topic_mode="none")
        # The change watcher gave the live session the narrowed grant.
        wait_until(lambda: session.grant is not grant, revocation_bound(daemon.settings))
        client.publish("alerts/2", b"after", qos=1)
        watcher.publish("news/1", b"to-the-narrowed-session", qos=1)
        assert watcher.get(0.7) is None  # its publish was dropped
        assert client.get(0.7) is None  # and it no longer receives custom topics
        assert not client.disconnected.is_set()  # still connected for its device topics
        daemon.ks("update_key", key.key, address_mode="only", addresses=["10.0.0.0/8"])
        assert client.disconnected.wait(2)
    assert any(e["event"] == "kick" and e["reason"] == "ip_denied"
               for e in daemon.audit_events())


# --- retained data outlives its device -----------------------------------------------------

def test_removing_a_device_drops_its_retained_messages_and_session(
    daemon: RunningBroker,
) -> None:
    key, secret = daemon.ks("create_key", device_ids=["att"])
    with Client(daemon.port(), "att", key.key, secret, clean_session=False) as client:
        assert client.connect() == 0
        assert client.subscribe("losant/att/command", 1) == 1
        client.publish("losant/att/secret", b"old-owner", qos=1, retain=True)
    daemon.ks("remove_devices", ["att"])
    wait_until(lambda: "att" not in daemon.broker.sessions, revocation_bound(daemon.settings))
    daemon.ks("add_device", "att")
    fresh, fresh_secret = daemon.ks("create_key", device_ids=["att"])
    with Client(daemon.port(), "att", fresh.key, fresh_secret) as client:
        assert client.connect() == 0
        assert client.subscribe("losant/att/#", 1) == 1
        assert client.get(0.7) is None


# --- loose file modes ----------------------------------------------------------------------

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


# --- PUBLISH with QoS 3 -----------------------------------------------------------------------

def test_publish_with_qos_3_closes_the_connection(daemon: RunningBroker) -> None:
    key, secret = attacker(daemon)
    sock, _ = raw.session(daemon.port(), "att", key, secret)
    with sock:
        sock.sendall(raw.packet(0x36, raw.field("losant/att/x") + b"\x00\x01payload"))
        assert raw.closed_by_peer(sock, within=2)
    daemon.wait_audited("bad_packet", "QoS 3")
