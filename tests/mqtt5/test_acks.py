"""Refusals an MQTT 5 client is told in acknowledgements (docs/mqtt5.md#refusals-say-why):
PUBACK/PUBREC 0x87 for a denied PUBLISH, SUBACK 0x87/0x8F/0x97/0x9E/0xA2 per filter,
UNSUBACK 0x11; each reason string names the rule class, and there is none with
``[mqtt] reason_strings = false`` or when the client asked for no problem information."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.mqtt5.conftest import Says, StartDaemon
from tests.support import mqtt_raw as raw
from tests.support.harness import RunningBroker
from tests.support.mqtt5 import Client5, Device, device_key, received_before

NOT_AUTHORIZED, TOPIC_FILTER_INVALID, QUOTA_EXCEEDED = 0x87, 0x8F, 0x97
SHARED_NOT_SUPPORTED, WILDCARDS_NOT_SUPPORTED, NO_SUBSCRIPTION_EXISTED = 0x9E, 0xA2, 0x11
PUBACK, PUBREC, PUBREL, PUBCOMP = 4, 5, 6, 7


@pytest.fixture
def watcher(refusing: RunningBroker) -> Iterator[Client5]:
    """A client whose key reads everything it may: what a refused PUBLISH must not reach."""
    refusing.ks("add_device", "dev-b")
    with Device(refusing, "watcher", device_ids=[], all_devices=True,
                topic_mode="all").connect() as client:
        assert client.subscribe("#") == 0
        yield client


@pytest.mark.parametrize(("key_options", "topic", "reason"), [
    pytest.param({}, "losant/dev-b/state", "device not in the key's scope", id="scope"),
    pytest.param({}, "losant//state", "topic under the device prefix is not a device's",
                 id="device-prefix"),
    pytest.param({"topic_mode": "all"}, "$SYS/fake", "$ topics are not available",
                 id="dollar"),
    pytest.param({}, "custom/alpha", "key has no custom topics", id="mode-none"),
    pytest.param({"topic_mode": "only", "pub_topics": ["custom/beta"]}, "custom/alpha",
                 "topic not in the key's topic list", id="not-in-list"),
    pytest.param({"topic_mode": "except", "pub_topics": ["custom/alpha"]}, "custom/alpha",
                 "topic in the key's excluded topics", id="in-except-list"),
])
def test_a_denied_qos1_publish_gets_puback_0x87_naming_the_rule(
        refusing: RunningBroker, watcher: Client5, says: Says, key_options: dict[str, Any],
        topic: str, reason: str) -> None:
    with Device(refusing, "dev-a", **key_options).connect() as client:
        answer = client.publish(topic, b"denied", qos=1)
        assert answer is not None and answer.code == NOT_AUTHORIZED
        says(answer.reason, reason)
        allowed = client.publish("losant/dev-a/state", b"allowed", qos=1)
        assert allowed is not None and (allowed.code, allowed.reason) == (0, None)
        assert not client.disconnected.is_set()  # denied_publish = "drop"
        client.publish("losant/dev-a/state", b"end", qos=1)
    # In order, on one connection: what was refused before "allowed" never came.
    assert [m.payload for m in received_before(watcher, b"end")] == [b"allowed"]


def test_a_denied_qos2_publish_ends_with_pubrec_0x87(refusing: RunningBroker,
                                                      watcher: Client5, says: Says) -> None:
    key, secret = device_key(refusing, "dev-a")
    sock, _ = raw.session5(refusing.port(), "dev-a", key, secret)
    with sock:
        sock.sendall(raw.publish5("losant/dev-b/state", b"denied", 2, packet_id=7))
        pubrec = raw.reply5(raw.expect(sock, PUBREC))
        assert pubrec.code == NOT_AUTHORIZED
        says(pubrec.reason, "device not in the key's scope")
        # The flow ended with the PUBREC: a PUBREL for it finds no such packet id.
        sock.sendall(raw.ack5(PUBREL, 7))
        assert raw.reply5(raw.expect(sock, PUBCOMP)).code == 0x92
        # An allowed QoS 2 PUBLISH with the same id is a new message, delivered once.
        sock.sendall(raw.publish5("losant/dev-a/state", b"allowed", 2, packet_id=7))
        assert raw.reply5(raw.expect(sock, PUBREC)).code == 0
        sock.sendall(raw.ack5(PUBREL, 7))
        assert raw.reply5(raw.expect(sock, PUBCOMP)).code == 0
        sock.sendall(raw.publish5("losant/dev-a/state", b"end", 1, packet_id=8))
        raw.expect(sock, 4)
    assert [m.payload for m in received_before(watcher, b"end")] == [b"allowed"]


def test_no_problem_information_keeps_reason_strings_off_acknowledgements(
        refusing: RunningBroker) -> None:
    refusing.ks("add_device", "dev-b")
    key, secret = device_key(refusing, "dev-a")
    with Client5(refusing.port(), "dev-a", key, secret) as client:
        assert client.connect(RequestProblemInformation=0) == 0
        answer = client.publish("losant/dev-b/state", b"denied", qos=1)
        assert answer is not None and (answer.code, answer.reason) == (NOT_AUTHORIZED, None)
        assert client.subscribe("losant/dev-b/#") == NOT_AUTHORIZED
        assert client.suback is not None and client.suback.reason is None


def test_suback_says_0x87_for_each_refused_filter_and_grants_the_others(
        refusing: RunningBroker, says: Says) -> None:
    refusing.ks("add_device", "dev-b")
    with Device(refusing, "dev-a", topic_mode="only",
                sub_topics=["custom/in/#"]).connect() as client:
        codes = client.subscribe_many([("losant/dev-a/command", 1), ("losant/dev-b/state", 1),
                                       ("custom/in/x", 2), ("custom/out", 0), ("$SYS/#", 0)])
        assert codes == [1, NOT_AUTHORIZED, 2, NOT_AUTHORIZED, NOT_AUTHORIZED]
        assert client.suback is not None
        says(client.suback.reason, "device not in the key's scope")  # the first refusal's
        assert client.subscribe("custom/out") == NOT_AUTHORIZED
        says(client.suback.reason, "topic not in the key's topic list")


@pytest.mark.parametrize("topic_filter", ["custom/#/x", "custom/a#", "custom/+x", "$share/g",
                                          "$share//x", "$share/g+/x", "$share/g/"])
def test_a_malformed_filter_gets_suback_0x8f(refusing: RunningBroker, says: Says,
                                             topic_filter: str) -> None:
    # paho refuses to send these: a raw SUBSCRIBE.
    key, secret = device_key(refusing, "dev-a", topic_mode="all")
    sock, _ = raw.session5(refusing.port(), "dev-a", key, secret)
    with sock:
        sock.sendall(raw.subscribe5([(topic_filter, 0), ("custom/ok", 1)]))
        suback = raw.reply5(raw.expect(sock, 9))
        assert suback.codes == (TOPIC_FILTER_INVALID, 1)
        says(suback.reason, "invalid topic filter")


def test_filters_past_the_subscription_limits_get_suback_0x97(
        daemon_with: StartDaemon, reason_strings: bool, says: Says) -> None:
    daemon = daemon_with(reason_strings=reason_strings, max_subscriptions=2,
                         max_topic_levels=4, max_topic_length=40)
    with Device(daemon, "dev-a", topic_mode="all").connect() as client:
        assert client.subscribe("custom/a/b/c/d") == QUOTA_EXCEEDED
        assert client.suback is not None
        says(client.suback.reason, "5 levels, limit 4")
        assert client.subscribe("custom/" + "x" * 40) == QUOTA_EXCEEDED
        says(client.suback.reason, "47 bytes, limit 40")
        assert client.subscribe_many([("custom/1", 0), ("custom/2", 0), ("custom/3", 0)]) == [
            0, 0, QUOTA_EXCEEDED]
        says(client.suback.reason, "max subscriptions 2")


def test_shared_subscriptions_off_get_suback_0x9e(daemon_with: StartDaemon,
                                                  reason_strings: bool, says: Says) -> None:
    daemon = daemon_with(reason_strings=reason_strings, shared_subscriptions=False)
    with Device(daemon, "dev-a", topic_mode="all").connect() as client:
        assert client.connack is not None
        assert client.connack.properties.SharedSubscriptionAvailable == 0
        assert client.subscribe_many([("$share/g/custom/x", 1), ("custom/x", 1)]) == [
            SHARED_NOT_SUPPORTED, 1]
        assert client.suback is not None
        says(client.suback.reason, "shared subscriptions are off")


def test_wildcards_off_get_suback_0xa2(daemon_with: StartDaemon, reason_strings: bool,
                                       says: Says) -> None:
    daemon = daemon_with(reason_strings=reason_strings, wildcard_subscriptions=False)
    with Device(daemon, "dev-a", topic_mode="all").connect() as client:
        assert client.connack is not None
        assert client.connack.properties.WildcardSubscriptionAvailable == 0
        codes = client.subscribe_many([("custom/+/x", 0), ("custom/#", 0),
                                       ("$share/g/losant/+", 0), ("custom/x", 0)])
        assert codes == [WILDCARDS_NOT_SUPPORTED] * 3 + [0]
        assert client.suback is not None
        says(client.suback.reason, "wildcard subscriptions are off")


def test_unsubscribing_what_was_not_subscribed_gets_unsuback_0x11(
        refusing: RunningBroker) -> None:
    with Device(refusing, "dev-a").connect() as client:
        assert client.subscribe("losant/dev-a/#") == 0
        assert client.subscribe("$share/g/losant/dev-a/x") == 0
        assert client.unsubscribe("losant/dev-a/#", "losant/dev-a/+", "$share/g/losant/dev-a/x",
                                  "$share/h/losant/dev-a/x") == [
            0, NO_SUBSCRIPTION_EXISTED, 0, NO_SUBSCRIPTION_EXISTED]
        assert client.unsubscribe("losant/dev-a/#") == [NO_SUBSCRIPTION_EXISTED]
