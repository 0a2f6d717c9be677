"""The daemon's limits, live changes and audit cover what MQTT 5 adds
(docs/mqtt5.md#limits-that-cover-the-new-features): a revoked key ends a v5 session with
DISCONNECT 0x98 and its session cannot resume; a Message Expiry Interval does not let a
queue outgrow its bounds, and a message's properties count against them; v5 denials are
audited like v3 ones."""

from __future__ import annotations

import time
from typing import Any

from tests.mqtt5.conftest import StartDaemon
from tests.support.harness import Client, RunningBroker
from tests.support.mqtt5 import Device, until_past
from tests.support.waiting import wait_until

COMMAND = "losant/dev-a/command"


def test_a_deactivated_key_ends_a_persistent_v5_session_which_cannot_resume(
        broker: RunningBroker) -> None:
    device = Device(broker, "dev-a")
    with device.connect(clean_session=False, session_expiry=3600) as client:
        assert client.subscribe(COMMAND, 1) == 1
        broker.ks("set_status", [device.key], "inactive")
        assert client.disconnected.wait(5.0)
        assert client.server_disconnect is not None
        assert (client.server_disconnect.code, client.server_disconnect.reason) == (
            0x98, "key inactive")
    with device.client(clean_session=False, session_expiry=3600) as again:
        assert again.connect() == 0x87
        assert again.connack is not None and again.connack.reason == "key inactive"


def test_expiring_messages_do_not_let_an_offline_queue_outgrow_its_bound(
        daemon_with: StartDaemon) -> None:
    """An expiring message counts in the queue like any other (it leaves only when it would
    have been sent): what does not fit is dropped as for any full queue."""
    daemon = daemon_with(max_queued_messages=4)
    device = Device(daemon, "dev-a")
    device.away(COMMAND)
    with Device(daemon, "feeder", device_ids=[], all_devices=True).connect() as feeder:
        sent = time.time()
        for n in range(3):
            feeder.publish(COMMAND, b"expiring-%d" % n, qos=1, MessageExpiryInterval=1)
            feeder.publish(COMMAND, b"lasting-%d" % n, qos=1)
    dropped = daemon.broker.traffic.dropped
    assert len(daemon.broker.sessions["dev-a"].outbox) == 4
    assert dropped["offline_queue_full"] == 2  # expiring-2 and lasting-2
    until_past(sent + 1.0)
    with device.connect(clean_session=False, session_expiry=3600) as client:
        received = [client.get(), client.get()]
        assert [m.payload for m in received if m is not None] == [b"lasting-0", b"lasting-1"]
        assert client.get(0.3) is None
    assert dropped["expired"] == 2


def test_a_messages_properties_count_against_the_session_bytes(
        daemon_with: StartDaemon) -> None:
    """Ten 1-byte messages, each with 1.5 KB of User Property: an 8 KiB session holds five
    of them (without their properties all ten would fit)."""
    daemon = daemon_with(max_session_bytes=8 * 1024)
    device = Device(daemon, "dev-a")
    device.away(COMMAND)
    bulky: dict[str, Any] = {"UserProperty": [("padding", "p" * 1500)]}
    with Device(daemon, "feeder", device_ids=[], all_devices=True).connect() as feeder:
        for n in range(10):
            feeder.publish(COMMAND, b"%d" % n, qos=1, **bulky)
    assert daemon.broker.traffic.dropped["offline_queue_full"] == 5
    with device.connect(clean_session=False, session_expiry=3600) as client:
        received = [client.get() for _ in range(5)]
        assert [m.payload for m in received if m is not None] == [b"0", b"1", b"2", b"3", b"4"]
        assert client.get(0.3) is None


def denials_of(daemon: RunningBroker, client_id: str) -> list[tuple[Any, ...]]:
    """What the audit says of ``client_id``, with the client id and its key taken out."""
    lines = [e for e in daemon.audit_events() if e.get("client_id") == client_id]
    return [(e["event"], e["reason"], (e.get("topic") or "").replace(client_id, "ID"),
             sorted(e)) for e in lines]


def denied_steps(daemon: RunningBroker, client_id: str, protocol: int) -> None:
    """The same denials made by an MQTT 3.1.1 or an MQTT 5 client."""
    daemon.ks("add_device", client_id)
    key, secret = daemon.ks("create_key", device_ids=[client_id])
    key = key.key
    with Client(daemon.port(), client_id, key, "wrong", protocol=protocol) as client:
        assert client.connect() == 4
    with Client(daemon.port(), client_id, key, secret, protocol=protocol).will(
            "losant/other/will", b"x") as client:
        assert client.connect() == 5
    with Client(daemon.port(), client_id, key, secret, protocol=protocol) as client:
        assert client.connect() == 0
        assert client.subscribe("losant/other/#") == 0x80
        client.publish("losant/other/state", b"x", qos=1)
        client.publish("custom/topic", b"x", qos=1)
        daemon.ks("set_status", [key], "inactive")
        assert client.disconnected.wait(5.0)


def test_v5_denials_are_audited_like_v3_ones(broker: RunningBroker) -> None:
    denied_steps(broker, "dev-3", 4)
    denied_steps(broker, "dev-5", 5)
    wait_until(lambda: len(denials_of(broker, "dev-5")) == len(denials_of(broker, "dev-3")))
    v3, v5 = denials_of(broker, "dev-3"), denials_of(broker, "dev-5")
    assert [line[0] for line in v3] == ["connect_refused", "connect_refused", "connect_ok",
                                        "subscribe_denied", "publish_denied",
                                        "publish_denied", "kick"]
    assert v5 == v3
