"""Subscription Identifiers and the subscription options No Local, Retain As Published and
Retain Handling 0/1/2 (docs/mqtt5.md#what-is-supported)."""

from __future__ import annotations

from paho.mqtt.subscribeoptions import SubscribeOptions

from tests.support.harness import RunningBroker
from tests.support.mqtt5 import Client5, Device, received_before

STATE = "losant/dev-a/state"
SENTINEL = "losant/dev-a/sentinel"


def test_a_message_carries_the_identifier_of_every_subscription_it_matched(
        broker: RunningBroker, feeder: Client5) -> None:
    with Device(broker, "dev-a").connect() as client:
        assert client.subscribe("losant/dev-a/#", 1, sub_id=7) == 1
        assert client.subscribe("losant/+/state", 0, sub_id=9) == 0
        assert client.subscribe("losant/dev-a/state", 0) == 0  # without an identifier
        feeder.publish(STATE, b"both", qos=1)
        feeder.publish("losant/dev-a/command", b"one", qos=1)
        both, one = client.get(), client.get()
        assert both is not None and both.payload == b"both" and both.qos == 1  # once
        assert sorted(both.properties.SubscriptionIdentifier) == [7, 9]
        assert one is not None and one.payload == b"one"
        assert one.properties.SubscriptionIdentifier == [7]
        assert client.get(0.3) is None


def test_no_local_keeps_a_clients_own_messages_from_it(broker: RunningBroker,
                                                       feeder: Client5) -> None:
    with Device(broker, "dev-a").connect() as client:
        assert client.subscribe(STATE, 1, noLocal=True) == 1
        client.publish(STATE, b"own", qos=1)
        feeder.publish(STATE, b"others", qos=1)
        message = client.get()
        assert message is not None and message.payload == b"others"
        # Without it, its own come back.
        assert client.subscribe("losant/dev-a/command", 1) == 1
        client.publish("losant/dev-a/command", b"own", qos=1)
        message = client.get()
        assert message is not None and message.payload == b"own"


def test_retain_as_published_keeps_the_flag_on_live_delivery(broker: RunningBroker,
                                                             feeder: Client5) -> None:
    with Device(broker, "dev-a").connect() as keeps, \
            Device(broker, "dev-b", device_ids=["dev-b", "dev-a"]).connect() as clears:
        assert keeps.subscribe(STATE, 1, retainAsPublished=True) == 1
        assert clears.subscribe(STATE, 1) == 1
        feeder.publish(STATE, b"retained", qos=1, retain=True)
        feeder.publish(STATE, b"plain", qos=1)
        kept = [(m.payload, m.retain) for m in (keeps.get(), keeps.get()) if m is not None]
        cleared = [(m.payload, m.retain) for m in (clears.get(), clears.get()) if m is not None]
    assert kept == [(b"retained", True), (b"plain", False)]
    assert cleared == [(b"retained", False), (b"plain", False)]


def test_retain_handling_0_sends_retained_messages_at_every_subscribe(
        broker: RunningBroker, feeder: Client5) -> None:
    feeder.publish(STATE, b"retained", qos=1, retain=True)
    with Device(broker, "dev-a").connect() as client:
        for _ in range(2):
            option = SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE
            assert client.subscribe(STATE, 1, retainHandling=option) == 1
            message = client.get()
            assert message is not None and message.payload == b"retained" and message.retain


def retained_until_sentinel(client: Client5) -> list[bytes]:
    """Subscribe to the retained sentinel: what comes before it is what the earlier
    SUBSCRIBEs sent of retained messages (each SUBSCRIBE's are sent in turn)."""
    assert client.subscribe(SENTINEL) == 0
    return [m.payload for m in received_before(client, b"sentinel")]


def test_retain_handling_1_sends_them_only_for_a_new_subscription(
        broker: RunningBroker, feeder: Client5) -> None:
    feeder.publish(STATE, b"retained", qos=1, retain=True)
    feeder.publish(SENTINEL, b"sentinel", qos=1, retain=True)
    with Device(broker, "dev-a").connect() as client:
        option = SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
        assert client.subscribe(STATE, 1, retainHandling=option) == 1
        message = client.get()
        assert message is not None and message.payload == b"retained"
        assert client.subscribe(STATE, 1, retainHandling=option) == 1  # held already
        assert retained_until_sentinel(client) == []


def test_retain_handling_2_never_sends_them(broker: RunningBroker, feeder: Client5) -> None:
    feeder.publish(STATE, b"retained", qos=1, retain=True)
    feeder.publish(SENTINEL, b"sentinel", qos=1, retain=True)
    with Device(broker, "dev-a").connect() as client:
        option = SubscribeOptions.RETAIN_DO_NOT_SEND
        assert client.subscribe(STATE, 1, retainHandling=option) == 1
        assert retained_until_sentinel(client) == []
