"""GET /metrics, /healthz and /readyz of a real daemon: known traffic moves the counters by
exactly that much (scraped with prometheus-client's own parser), labels never carry ids,
and readiness follows the keystore."""

from __future__ import annotations

import socket
from pathlib import Path

import requests

from broker.policy.guard import GuardSettings
from tests.support import mqtt_raw as raw
from tests.support.harness import Client, RunningBroker, StartDaemon, broker_settings
from tests.support.metrics import Samples
from tests.support.metrics import scrape as scrape_url
from tests.support.waiting import wait_until


def scrape(daemon: RunningBroker) -> Samples:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    return scrape_url(daemon.api_url())


def value(samples: Samples, name: str,
          **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: dict, after: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return value(after, name, **labels) - value(before, name, **labels)


def test_counters_move_by_exactly_the_traffic_driven(broker: RunningBroker) -> None:
    for device in ("pub", "sub", "extra"):
        broker.ks("add_device", device)
    key, secret = broker.ks("create_key", device_ids=["pub", "sub", "extra"])
    before = scrape(broker)
    for _ in range(3):  # wrong secret: CONNACK 4
        with Client(broker.port(), "pub", key.key, "wrong") as bad:
            assert bad.connect() == 4
    with Client(broker.port(), "ghost", key.key, secret) as stranger:
        assert stranger.connect() == 5  # not a device
    with Client(broker.port(), "sub", key.key, secret) as sub, \
            Client(broker.port(), "pub", key.key, secret) as pub:
        assert sub.connect() == 0 and pub.connect() == 0
        assert sub.subscribe("losant/pub/#", qos=1) == 1
        assert sub.subscribe("not/allowed") == 0x80  # topic mode none
        for i in range(5):
            pub.publish("losant/pub/state", f"m{i}", qos=0)
        for i in range(4):
            pub.publish("losant/pub/state", f"q{i}", qos=1)
        pub.publish("custom/topic", "x", qos=1)  # denied (dropped, acknowledged)
        got = [sub.get() for _ in range(9)]
        assert all(m is not None for m in got)
        during = scrape(broker)
    after = scrape(broker)
    assert moved(before, after, "keybroker_connects_accepted_total") == 2
    assert moved(before, after, "keybroker_connects_refused_total",
                 code="4", reason="bad_credentials") == 3
    assert moved(before, after, "keybroker_connects_refused_total",
                 code="5", reason="unknown_device") == 1
    assert moved(before, after, "keybroker_connect_seconds_count") == 6
    assert moved(before, after, "keybroker_keystore_lookup_seconds_count") == 6
    assert moved(before, after, "keybroker_messages_received_total", qos="0") == 5
    assert moved(before, after, "keybroker_messages_received_total", qos="1") == 4
    assert moved(before, after, "keybroker_received_bytes_total", qos="0") == 10
    assert moved(before, after, "keybroker_messages_sent_total", qos="0") == 5
    assert moved(before, after, "keybroker_messages_sent_total", qos="1") == 4
    assert moved(before, after, "keybroker_denials_total", kind="publish") == 1
    assert moved(before, after, "keybroker_denials_total", kind="subscribe") == 1
    assert value(during, "keybroker_connections", listener="tcp") == 2
    assert value(during, "keybroker_sessions_online") == 2
    assert value(during, "keybroker_subscriptions") == 1
    assert value(after, "keybroker_connections", listener="tcp") == 0


def test_gauges_kicks_and_retained(broker: RunningBroker) -> None:
    broker.ks("add_device", "d1")
    key, secret = broker.ks("create_key", device_ids=["d1"])
    before = scrape(broker)
    with Client(broker.port(), "d1", key.key, secret, clean_session=False) as device:
        assert device.connect() == 0
        assert device.subscribe("losant/d1/command", qos=1) == 1
        device.publish("losant/d1/state", b"x" * 10, qos=1, retain=True)
        broker.ks("set_status", [key.key], "inactive")
        assert device.disconnected.wait(5)
    wait_until(lambda: broker.offline("d1"))  # the end of its connection is counted
    after = scrape(broker)
    assert moved(before, after, "keybroker_kicks_total", cause="key_inactive") == 1
    assert value(after, "keybroker_sessions_persistent") == 1
    assert value(after, "keybroker_retained_messages") == 1
    assert value(after, "keybroker_retained_bytes") == len("losant/d1/state") + 10


def test_labels_never_carry_ids_keys_or_topics(broker: RunningBroker) -> None:
    broker.ks("add_device", "secret-device-id")
    key, secret = broker.ks("create_key", device_ids=["secret-device-id"])
    with Client(broker.port(), "secret-device-id", key.key, secret) as device:
        assert device.connect() == 0
        device.publish("losant/secret-device-id/state", "x", qos=1)
        text = requests.get(broker.api_url() + "/metrics", timeout=5).text
    for needle in ("secret-device-id", key.key, "losant/"):
        assert needle not in text


def test_connections_closed_by_a_cap_are_counted(daemon_with: StartDaemon) -> None:
    daemon = daemon_with(max_connections_per_source=1)
    daemon.ks("add_device", "d1")
    key, secret = daemon.ks("create_key", device_ids=["d1"])
    before = scrape(daemon)
    with socket.create_connection(("127.0.0.1", daemon.port())) as first:
        with socket.create_connection(("127.0.0.1", daemon.port())) as second:
            first.settimeout(3)
            assert first.recv(1) == b""  # the source's pending one makes room
            second.settimeout(3)
            second.sendall(raw.connect("d1", key.key, secret))
            assert second.recv(4) == bytes([0x20, 2, 0, 0])
            with socket.create_connection(("127.0.0.1", daemon.port())) as third:
                third.settimeout(3)
                assert third.recv(1) == b""  # none pending: refused at once
    after = scrape(daemon)
    assert moved(before, after, "keybroker_connects_refused_total", code="none",
                 reason="evicted_per_source") == 1
    assert moved(before, after, "keybroker_connects_refused_total", code="none",
                 reason="max_connections_per_source") == 1


def test_guard_bans_and_suppressed_audit_lines_are_counted(tmp_path: Path,
                                                          daemon_with: StartDaemon) -> None:
    daemon = daemon_with(guard=GuardSettings(max_failures=0))
    before = scrape(daemon)
    for _ in range(30):  # garbage before CONNECT: 20 audited a second, 10 suppressed
        with socket.create_connection(("127.0.0.1", daemon.port())) as raw:
            raw.sendall(b"\x30\x00")
            raw.recv(16)
    # The daemon writes the count once a second.
    after = wait_until(lambda: (s := scrape(daemon)) and moved(
        before, s, "keybroker_audit_suppressed_total") and s, poll=0.2)
    assert moved(before, after, "keybroker_connects_refused_total", code="none",
                 reason="bad_packet") == 30
    assert moved(before, after, "keybroker_audit_suppressed_total") == 10
    daemon.stop()
    (tmp_path / "b").mkdir()
    daemon = daemon_with(broker_settings(tmp_path / "b"), guard=GuardSettings(max_failures=3))
    daemon.ks("add_device", "d")
    key, _ = daemon.ks("create_key", device_ids=["d"])
    for _ in range(3):
        with Client(daemon.port(), "d", key.key, "wrong") as bad:
            assert bad.connect() == 4
    after = scrape(daemon)
    assert value(after, "keybroker_guard_bans_total") == 1
    assert value(after, "keybroker_guard_banned_sources") == 1


def test_health_and_readiness_follow_the_keystore(broker: RunningBroker) -> None:
    health = requests.get(broker.api_url() + "/healthz", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    ready = requests.get(broker.api_url() + "/readyz", timeout=5)
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"listeners": True, "keystore": True}}
    keystore = broker.server.keystore
    assert keystore is not None
    broker.call(keystore.backend.close)  # the keystore goes away
    gone = requests.get(broker.api_url() + "/readyz", timeout=5)
    assert gone.status_code == 503
    assert gone.json()["checks"] == {"listeners": True, "keystore": False}
    assert requests.get(broker.api_url() + "/healthz", timeout=5).status_code == 200


def test_metrics_can_require_a_token(daemon_with: StartDaemon) -> None:
    daemon = daemon_with(api_metrics_auth=True)
    url = daemon.api_url() + "/metrics"
    assert requests.get(url, timeout=5).status_code == 401
    _row, reader = daemon.ks("create_token", "prometheus", scopes=["metrics.get"])
    _row, keys_only = daemon.ks("create_token", "keys", scopes=["applicationKeys.*"])
    ok = requests.get(url, timeout=5, headers={"Authorization": f"Bearer {reader}"})
    assert ok.status_code == 200 and "keybroker_connections" in ok.text
    refused = requests.get(url, timeout=5, headers={"Authorization": f"Bearer {keys_only}"})
    assert refused.status_code == 403
    daemon.ks("create_app", "tenant")
    _row, bound = daemon.ks("create_token", "tenant-ops", app="tenant",
                            scopes=["metrics.get"])
    one_app = requests.get(url, timeout=5, headers={"Authorization": f"Bearer {bound}"})
    assert one_app.status_code == 403  # metrics cover every application
    assert "every application" in one_app.json()["message"]
