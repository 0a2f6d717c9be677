"""What a message carries beside its topic and payload reaches its subscribers unchanged
(User Properties in order, Payload Format Indicator, Content Type, Response Topic,
Correlation Data), live, queued and retained; a responder publishing to a Response Topic
is checked like any PUBLISH (docs/mqtt5.md#what-is-supported)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.harness import RunningBroker
from tests.support.mqtt5 import Client5, Device, received_before, user_properties

NOT_AUTHORIZED = 0x87
COMMAND = "losant/dev-a/command"
CARRIED: dict[str, Any] = {
    "UserProperty": [("trace", "1"), ("origin", "plant-2"), ("trace", "2")],
    "PayloadFormatIndicator": 1,
    "ContentType": "application/json",
    "ResponseTopic": "losant/feeder/replies",
    "CorrelationData": b"\x00\x01request-17",
}


def assert_carried(message: Any) -> None:
    assert message is not None and message.payload == b'{"on": true}'
    got = message.properties
    assert user_properties(message) == CARRIED["UserProperty"]
    assert got.PayloadFormatIndicator == 1
    assert got.ContentType == "application/json"
    assert got.ResponseTopic == "losant/feeder/replies"
    assert got.CorrelationData == b"\x00\x01request-17"


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_properties_reach_a_live_subscriber_unchanged(broker: RunningBroker, feeder: Client5,
                                                      qos: int) -> None:
    with Device(broker, "dev-a").connect() as client:
        assert client.subscribe(COMMAND, qos) == qos
        feeder.publish(COMMAND, b'{"on": true}', qos=qos, **CARRIED)
        message = client.get()
        assert_carried(message)
        assert message is not None and message.qos == qos


def test_properties_of_a_queued_message_reach_the_session_when_it_returns(
        broker: RunningBroker, feeder: Client5) -> None:
    device = Device(broker, "dev-a")
    device.away(COMMAND)
    feeder.publish(COMMAND, b'{"on": true}', qos=1, **CARRIED)
    with device.connect(clean_session=False, session_expiry=60) as client:
        assert_carried(client.get())


def test_properties_of_a_retained_message_go_with_it(broker: RunningBroker,
                                                     feeder: Client5) -> None:
    feeder.publish(COMMAND, b'{"on": true}', qos=1, retain=True, **CARRIED)
    with Device(broker, "dev-a").connect() as client:
        assert client.subscribe(COMMAND, 1) == 1
        message = client.get()
        assert_carried(message)
        assert message is not None and message.retain


def test_a_reply_to_a_response_topic_is_checked_like_any_publish(broker: RunningBroker,
                                                                 feeder: Client5) -> None:
    """dev-a asks two responders to answer on its own topic: one whose key covers dev-a
    (its reply arrives, with the correlation data), one whose key does not (refused with
    0x87: a Response Topic opens nothing)."""
    broker.ks("add_device", "dev-a")
    requester = Device(broker, "requester", device_ids=["requester", "dev-a"])
    allowed = Device(broker, "helper", device_ids=["helper", "dev-a"])
    outsider = Device(broker, "outsider")
    with requester.connect() as asking, allowed.connect() as helper, \
            outsider.connect() as stranger:
        assert asking.subscribe("losant/dev-a/reply") == 0
        for responder, device in ((helper, "helper"), (stranger, "outsider")):
            assert responder.subscribe(f"losant/{device}/command") == 0
            feeder.publish(f"losant/{device}/command", b"status?",
                           ResponseTopic="losant/dev-a/reply", CorrelationData=device.encode())
            request = responder.get()
            assert request is not None
            reply_to = request.properties.ResponseTopic
            answer = responder.publish(reply_to, b"ok", qos=1,
                                       CorrelationData=request.properties.CorrelationData)
            assert answer is not None
            assert answer.code == (0 if device == "helper" else NOT_AUTHORIZED)
        feeder.publish("losant/dev-a/reply", b"sentinel")
        replies = [(m.payload, m.properties.CorrelationData)
                   for m in received_before(asking, b"sentinel")]
        assert replies == [(b"ok", b"helper")]
