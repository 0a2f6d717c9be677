"""Message Expiry Interval (docs/mqtt5.md#what-is-supported): a message whose interval
has passed is never sent (queued for an offline session, waiting for room in flight, or
retained), and what is sent carries the interval that remains."""

from __future__ import annotations

import time

from tests.support import mqtt_raw as raw
from tests.support.harness import RunningBroker
from tests.support.mqtt5 import Client5, Device, received_before, until_past

COMMAND = "losant/dev-a/command"


def test_an_expired_queued_message_is_never_sent(broker: RunningBroker,
                                                 feeder: Client5) -> None:
    device = Device(broker, "dev-a")
    device.away(COMMAND)
    sent = time.time()
    feeder.publish(COMMAND, b"short-lived", qos=1, MessageExpiryInterval=1)
    feeder.publish(COMMAND, b"lasting", qos=1)
    until_past(sent + 1.0)
    with device.connect(clean_session=False, session_expiry=60) as client:
        message = client.get()  # queued messages come oldest first
        assert message is not None and message.payload == b"lasting"
        assert not hasattr(message.properties, "MessageExpiryInterval")
    assert broker.broker.traffic.dropped["expired"] == 1


def test_a_queued_message_carries_the_interval_that_remains(broker: RunningBroker,
                                                            feeder: Client5) -> None:
    device = Device(broker, "dev-a")
    device.away(COMMAND)
    sent = time.time()
    feeder.publish(COMMAND, b"ten-seconds", qos=1, MessageExpiryInterval=10)
    until_past(sent + 1.0)
    with device.connect(clean_session=False, session_expiry=60) as client:
        message = client.get()
        assert message is not None and message.payload == b"ten-seconds"
        assert 1 <= message.properties.MessageExpiryInterval <= 9


def test_a_live_message_carries_its_interval(broker: RunningBroker, feeder: Client5) -> None:
    with Device(broker, "dev-a").connect() as client:
        assert client.subscribe(COMMAND, 1) == 1
        feeder.publish(COMMAND, b"live", qos=1, MessageExpiryInterval=3600)
        message = client.get()
        assert message is not None and message.properties.MessageExpiryInterval == 3600


def test_a_message_waiting_for_room_in_flight_expires_there(broker: RunningBroker,
                                                             feeder: Client5) -> None:
    """A client taking one message at a time (Receive Maximum 1) leaves the second waiting
    unacknowledged past its expiry: it is not sent; the third is."""
    device = Device(broker, "dev-a")
    sock, _ = raw.session5(broker.port(), "dev-a", device.key, device.secret,
                                 properties=raw.props(1, ReceiveMaximum=1))
    with sock:
        sock.sendall(raw.subscribe5([(COMMAND, 1)]))
        raw.expect(sock, 9)
        feeder.publish(COMMAND, b"first", qos=1)
        sent = time.time()
        feeder.publish(COMMAND, b"expiring", qos=1, MessageExpiryInterval=1)
        feeder.publish(COMMAND, b"third", qos=1)
        first = raw.publish_of(raw.expect(sock, 3))
        assert first.payload == b"first"
        until_past(sent + 1.0)
        sock.sendall(raw.ack5(4, first.packet_id))
        assert raw.publish_of(raw.expect(sock, 3)).payload == b"third"


def test_an_expired_retained_message_is_not_sent_and_a_live_one_is_with_what_remains(
        broker: RunningBroker, feeder: Client5) -> None:
    sent = time.time()
    feeder.publish("losant/dev-a/short", b"short", qos=1, retain=True, MessageExpiryInterval=1)
    feeder.publish("losant/dev-a/long", b"long", qos=1, retain=True, MessageExpiryInterval=60)
    feeder.publish("losant/dev-s/sentinel", b"sentinel", qos=1, retain=True)
    until_past(sent + 1.0)
    broker.ks("add_device", "dev-s")
    with Device(broker, "dev-a", device_ids=["dev-a", "dev-s"]).connect() as client:
        # One filter's retained messages are all sent before the next filter's.
        assert client.subscribe("losant/dev-a/#") == 0
        assert client.subscribe("losant/dev-s/#") == 0
        received = received_before(client, b"sentinel")
        assert [m.payload for m in received] == [b"long"]
        assert received[0].retain and 1 <= received[0].properties.MessageExpiryInterval <= 59
    assert len(broker.broker.router.retained) == 2  # the expired one is no longer kept
