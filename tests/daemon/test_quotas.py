"""Memory an application can take through subscriptions and retained messages is bounded
in bytes (docs/limits.md): per session, per access key and per application for
subscriptions; per application for the devices' retained reserves."""

from __future__ import annotations

import socket
import struct

import pytest

from broker.mqtt.routing import subscription_cost
from tests.support import mqtt_raw as raw
from tests.support.harness import Client, RunningBroker, StartDaemon
from tests.support.waiting import wait_until

# 31 levels, about 1 KiB: what an attacker would pick to make each filter expensive.
DEEP = "/" + "/".join(["z" * 30] * 30)


def deep_filters(device: str, count: int, start: int = 0) -> list[str]:
    return [f"losant/{device}/{i:05d}" + DEEP[:870] for i in range(start, start + count)]


def subscribe(sock: socket.socket, filters: list[str], packet_id: int = 1) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(raw.field(f) + b"\x00" for f in filters)
    sock.sendall(raw.packet(0x82, body))
    while True:
        packet = raw.read_packet(sock, 10)
        assert packet is not None, "no SUBACK"
        if packet.kind == 9:
            return packet.body[2:]


COST = subscription_cost(deep_filters("dev-0", 1)[0])
LIMITS = {"max_subscription_bytes": 20 * COST, "max_subscription_bytes_per_key": 50 * COST,
          "max_subscription_bytes_per_app": 80 * COST}


@pytest.fixture
def daemon(daemon_with: StartDaemon) -> RunningBroker:
    running = daemon_with(**LIMITS)
    running.ks("upsert_devices", [(f"dev-{i}", None, []) for i in range(6)])
    return running


def test_one_session_holds_at_most_its_subscription_bytes(daemon: RunningBroker) -> None:
    key, secret = daemon.ks("create_key", device_ids=["dev-0"])
    sock, _ = raw.session(daemon.port(), "dev-0", key.key, secret)
    nodes_before = daemon.broker.router.subtree.node_count()
    with sock:
        codes = subscribe(sock, deep_filters("dev-0", 100))
        assert codes == bytes(20) + b"\x80" * 80  # granted within the budget, in order
        # A filter already held is replaced, not counted again; a cheap one still fits
        # nowhere once the budget is spent.
        assert subscribe(sock, deep_filters("dev-0", 1), 2) == b"\x00"
        assert subscribe(sock, ["losant/dev-0/command"], 3) == b"\x80"
        # Unsubscribing gives the bytes back.
        body = struct.pack("!H", 4) + raw.field(deep_filters("dev-0", 1)[0])
        sock.sendall(raw.packet(0xA2, body))
        assert raw.read_packet(sock) is not None  # UNSUBACK
        assert subscribe(sock, ["losant/dev-0/command"], 5) == b"\x00"
    # The trie grew by what was granted only: about 31 nodes a filter.
    grown = daemon.broker.router.subtree.node_count() - nodes_before
    assert grown <= 21 * 32
    refused = [e for e in daemon.audit_events() if e["event"] == "subscribe_denied"]
    assert refused and "max_subscription_bytes" in refused[0]["reason"]
    assert "80 filters refused" in refused[0]["reason"]


def test_subscribing_again_to_a_filter_held_counts_it_once(daemon: RunningBroker) -> None:
    key, secret = daemon.ks("create_key", device_ids=["dev-0"])
    sock, _ = raw.session(daemon.port(), "dev-0", key.key, secret)
    topic_filter = "losant/dev-0/command"
    with sock:
        for packet_id in (1, 2, 3):
            assert subscribe(sock, [topic_filter], packet_id) == b"\x00"
        quotas = daemon.broker.router.subscription_quotas
        usage = quotas.get("s:dev-0")
        assert usage is not None
        assert (usage.count, usage.size) == (1, subscription_cost(topic_filter))
        sock.sendall(raw.packet(0xA2, struct.pack("!H", 4) + raw.field(topic_filter)))
        assert raw.read_packet(sock) is not None  # UNSUBACK
        wait_until(lambda: quotas.get("s:dev-0") is None)  # nothing left behind


def test_the_sessions_of_one_key_share_its_subscription_bytes(daemon: RunningBroker) -> None:
    """Persistent sessions keep their subscriptions offline: they still count."""
    key, secret = daemon.ks("create_key")
    granted = []
    for device in ("dev-0", "dev-1", "dev-2"):
        sock, _ = raw.session(daemon.port(), device, key.key, secret, clean=False)
        with sock:
            granted.append(subscribe(sock, deep_filters(device, 20)).count(0))
    assert granted == [20, 20, 10]  # 50 for the key
    other, other_secret = daemon.ks("create_key", device_ids=["dev-3"])
    sock, _ = raw.session(daemon.port(), "dev-3", other.key, other_secret, clean=False)
    with sock:  # another key of the same application still has room (80 - 50)
        assert subscribe(sock, deep_filters("dev-3", 20)).count(0) == 20
    third, third_secret = daemon.ks("create_key", device_ids=["dev-4"])
    sock, _ = raw.session(daemon.port(), "dev-4", third.key, third_secret)
    with sock:  # ... until the application's 80 are spent
        assert subscribe(sock, deep_filters("dev-4", 20)).count(0) == 10


def test_a_session_gone_gives_its_bytes_back(daemon: RunningBroker) -> None:
    key, secret = daemon.ks("create_key")
    for round_no in range(3):  # 3 x 20 would pass the key's 50 if nothing came back
        sock, _ = raw.session(daemon.port(), "dev-0", key.key, secret)
        with sock:
            assert subscribe(sock, deep_filters("dev-0", 20, 20 * round_no)) == bytes(20)
            sock.sendall(b"\xe0\x00")
        wait_until(lambda: "dev-0" not in daemon.broker.sessions)


def test_a_session_resumed_under_another_key_is_counted_against_that_key(
        daemon: RunningBroker) -> None:
    first, first_secret = daemon.ks("create_key", device_ids=["dev-0"])
    second, second_secret = daemon.ks("create_key", device_ids=["dev-0", "dev-1", "dev-2"])
    sock, _ = raw.session(daemon.port(), "dev-0", first.key, first_secret, clean=False)
    with sock:
        assert subscribe(sock, deep_filters("dev-0", 20)) == bytes(20)
    sock, connack = raw.session(daemon.port(), "dev-0", second.key, second_secret,
                                clean=False)
    sock.close()
    assert connack.body == bytes([1, 0])  # resumed, with its 20 subscriptions
    quotas = daemon.broker.router.subscription_quotas
    assert quotas.get(f"k:{first.key}") is None
    assert quotas.get(f"k:{second.key}").count == 20
    granted = []
    for device in ("dev-1", "dev-2"):  # the second key has 50 - 20 left
        sock, _ = raw.session(daemon.port(), device, second.key, second_secret, clean=False)
        with sock:
            granted.append(subscribe(sock, deep_filters(device, 20)).count(0))
    assert granted == [20, 10]


def test_the_devices_reserves_of_an_application_are_bounded_together(
        daemon_with: StartDaemon) -> None:
    """Each device may keep its own state retained outside the key's quota, but the
    reserves of one application together stay within their bound; past it a device's
    message counts against the key's quota like any other."""
    message = b"s" * 1000
    daemon = daemon_with(max_retained_per_key=1, max_retained_reserve_bytes_per_app=3 * 1030)
    daemon.ks("upsert_devices", [(f"dev-{i}", None, []) for i in range(5)])
    key, secret = daemon.ks("create_key")
    for i in range(5):
        with Client(daemon.port(), f"dev-{i}", key.key, secret) as device:
            assert device.connect() == 0
            device.publish(f"losant/dev-{i}/state", message, qos=1, retain=True)
    kept = sorted(m.topic for _, m in daemon.broker.router.retained.store.matching(
        "+/losant/+/state"))
    # Three in the application's reserve, one in the key's quota of 1, one refused.
    assert kept == [f"losant/dev-{i}/state" for i in range(4)]
    refused = [e for e in daemon.audit_events() if e["event"] == "retain_refused"]
    assert [e["client_id"] for e in refused] == ["dev-4"]
    assert "key quota" in refused[0]["reason"]
