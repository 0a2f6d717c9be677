"""Topic rules against a real daemon (docs/topics.md): device topics of the scope, the rest of the
prefix denied, `$` topics, custom topic modes, and no leak at delivery — live or retained."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.harness import Client, RunningBroker, StartDaemon

GRANTED_QOS0, FAILURE = 0, 0x80
# Every topic rule holds for MQTT 5 clients too (SUBACK 0x87 where 3.1.1 says 0x80).
pytestmark = pytest.mark.usefixtures("each_protocol")


@pytest.fixture
def fleet(broker: RunningBroker) -> RunningBroker:
    for device, site in (("dev-a", "north"), ("dev-b", "north"), ("dev-c", "south")):
        broker.ks("add_device", device, tags=[("site", site)])
    return broker


def client_for(broker: RunningBroker, device: str, **key_options: object) -> Client:
    key, secret = broker.ks("create_key", **key_options)
    client = Client(broker.port(), device, key.key, secret)
    assert client.connect() == 0
    return client


@pytest.fixture
def north(fleet: RunningBroker) -> Iterator[Client]:
    """dev-a with a key scoped to site=north (dev-a, dev-b)."""
    with client_for(fleet, "dev-a", device_tags=[("site", "north")]) as client:
        yield client


@pytest.fixture
def south(fleet: RunningBroker) -> Iterator[Client]:
    """dev-c with a key scoped to itself only."""
    with client_for(fleet, "dev-c", device_ids=["dev-c"]) as client:
        yield client


def test_device_topics_of_the_scope_flow_both_ways(north: Client) -> None:
    assert north.subscribe("losant/dev-b/state") == GRANTED_QOS0
    assert north.subscribe("losant/dev-a/command") == GRANTED_QOS0
    north.publish("losant/dev-b/state", b'{"data":{}}')  # acting for a peer of its scope
    north.publish("losant/dev-a/command", b"{}")
    assert sorted(north.topics_received()) == ["losant/dev-a/command", "losant/dev-b/state"]


def test_other_scopes_topics_cannot_be_subscribed(north: Client) -> None:
    assert north.subscribe("losant/dev-c/state") == FAILURE
    assert north.subscribe("losant/dev-c/#") == FAILURE
    assert north.subscribe("losant") == FAILURE
    assert north.subscribe("losant/") == FAILURE


def test_publish_to_another_scope_is_dropped_and_audited(
    fleet: RunningBroker, north: Client, south: Client
) -> None:
    assert south.subscribe("losant/dev-c/#") == GRANTED_QOS0
    north.publish("losant/dev-c/command", b"intrusion", qos=1)
    assert south.get(0.7) is None
    assert not north.disconnected.is_set()  # default: drop, not disconnect
    denied = [e for e in fleet.audit_events() if e["event"] == "publish_denied"]
    assert denied and denied[0]["topic"] == "losant/dev-c/command"
    assert denied[0]["client_id"] == "dev-a"


def test_wildcard_subscribers_never_receive_another_scopes_data(
    fleet: RunningBroker, north: Client, south: Client
) -> None:
    assert north.subscribe("#") == GRANTED_QOS0
    assert north.subscribe("losant/+/state") == GRANTED_QOS0
    assert north.subscribe("+/+/state") == GRANTED_QOS0
    south.publish("losant/dev-c/state", b"south-secret", qos=1)
    with client_for(fleet, "dev-b", device_ids=["dev-b"]) as peer:
        peer.publish("losant/dev-b/state", b"north-data", qos=1)
    topics = north.topics_received()
    assert "losant/dev-c/state" not in topics
    assert "losant/dev-b/state" in topics


def test_retained_messages_of_another_scope_are_not_delivered(
    fleet: RunningBroker, south: Client
) -> None:
    south.publish("losant/dev-c/state", b"retained-south", qos=1, retain=True)
    with client_for(fleet, "dev-b", device_ids=["dev-b"]) as peer:
        peer.publish("losant/dev-b/state", b"retained-north", qos=1, retain=True)
    # Both are retained: each PUBACK came after its message was kept.
    with client_for(fleet, "dev-a", device_tags=[("site", "north")]) as north:
        assert north.subscribe("#") == GRANTED_QOS0
        received = {}
        while (msg := north.get(0.7)) is not None:
            received[msg.topic] = (msg.payload, msg.retain)
    assert received == {"losant/dev-b/state": (b"retained-north", True)}


def test_dollar_topics_are_not_subscribable_nor_matched_nor_publishable(
    fleet: RunningBroker,
) -> None:
    with client_for(fleet, "dev-a", topic_mode="all") as client:
        assert client.subscribe("$SYS/#") == FAILURE
        assert client.subscribe("$SYS/broker/uptime") == FAILURE
        assert client.subscribe("#") == GRANTED_QOS0
        client.publish("$SYS/broker/fake", b"spoof", qos=1)
        assert "$SYS/broker/fake" not in client.topics_received()
    assert any(e["event"] == "publish_denied" and e["topic"] == "$SYS/broker/fake"
               for e in fleet.audit_events())


@pytest.mark.parametrize(
    ("options", "pub_ok", "sub_ok"),
    [
        ({"topic_mode": "none"}, False, False),
        ({"topic_mode": "all"}, True, True),
        ({"topic_mode": "only", "pub_topics": ["alerts/#"], "sub_topics": ["alerts/in"]},
         True, False),
        ({"topic_mode": "only", "pub_topics": ["other/x"], "sub_topics": ["alerts/+"]},
         False, True),
        ({"topic_mode": "except", "pub_topics": ["alerts/out"], "sub_topics": ["x/#"]},
         False, True),
        ({"topic_mode": "except", "pub_topics": ["x/#"], "sub_topics": ["alerts/#"]},
         True, False),
    ],
)
def test_custom_topic_modes(
    fleet: RunningBroker, options: dict[str, object], pub_ok: bool, sub_ok: bool
) -> None:
    """Publisher uses `options` on alerts/out; the subscriber uses `options` on alerts/out."""
    with client_for(fleet, "dev-a", topic_mode="all") as observer, \
            client_for(fleet, "dev-b", **options) as subject:
        assert observer.subscribe("alerts/out") == GRANTED_QOS0
        subject.publish("alerts/out", b"from-subject", qos=1)
        got = observer.get(0.7)
        assert (got is not None) == pub_ok
        assert (subject.subscribe("alerts/out") == GRANTED_QOS0) == sub_ok
        if sub_ok:
            observer.publish("alerts/out", b"to-subject", qos=1)
            got = subject.get()
            assert got is not None and got.payload == b"to-subject"


def test_custom_topic_mode_never_opens_the_device_prefix(fleet: RunningBroker) -> None:
    with client_for(fleet, "dev-a", device_ids=["dev-a"], topic_mode="all") as client:
        assert client.subscribe("losant/dev-c/state") == FAILURE
        assert client.subscribe("losant/unknown") == FAILURE


def test_delivery_check_uses_the_subscribe_list(fleet: RunningBroker) -> None:
    """`#` is granted for custom topics, but a message outside the subscribe list is not
    delivered even though the filter matches it."""
    options = {"topic_mode": "only", "pub_topics": ["#"], "sub_topics": ["public/#"]}
    with client_for(fleet, "dev-a", **options) as reader, \
            client_for(fleet, "dev-b", topic_mode="all") as writer:
        assert reader.subscribe("#") == GRANTED_QOS0
        writer.publish("private/x", b"no", qos=1)
        writer.publish("public/x", b"yes", qos=1)
        assert reader.topics_received() == ["public/x"]


def test_denied_publish_disconnects_when_configured(daemon_with: StartDaemon) -> None:
    daemon = daemon_with(denied_publish="disconnect")
    daemon.ks("add_device", "dev-a")
    daemon.ks("add_device", "dev-c")
    with client_for(daemon, "dev-a", device_ids=["dev-a"]) as client:
        client.publish("losant/dev-c/state", b"x")
        assert client.disconnected.wait(3)


def test_qos_delivered_is_the_minimum_of_published_and_granted(fleet: RunningBroker) -> None:
    with client_for(fleet, "dev-a", device_ids=["dev-a"]) as client:
        assert client.subscribe("losant/dev-a/command", qos=1) == 1
        client.publish("losant/dev-a/command", b"q0", qos=0)
        client.publish("losant/dev-a/command", b"q2", qos=2)
        first, second = client.get(), client.get()
        assert first is not None and second is not None
        assert {(m.payload, m.qos) for m in (first, second)} == {(b"q0", 0), (b"q2", 1)}


def test_overlapping_subscriptions_deliver_once_at_the_highest_qos(fleet: RunningBroker) -> None:
    """MQTT-3.3.5-1: one message per matching session, at the maximum granted QoS."""
    with client_for(fleet, "dev-a", device_ids=["dev-a"]) as client:
        assert client.subscribe("losant/dev-a/#", 0) == 0
        assert client.subscribe("losant/+/command", 1) == 1
        assert client.subscribe("losant/dev-a/command", 0) == 0
        client.publish("losant/dev-a/command", b"once", qos=1)
        first = client.get()
        assert first is not None and (first.payload, first.qos) == (b"once", 1)
        assert client.get(0.7) is None
