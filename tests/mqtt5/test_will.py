"""The Will of MQTT 5 (docs/mqtt5.md#what-is-supported): its properties are carried; it
waits its Will Delay Interval, is not sent when the session is resumed first, goes when
the delay passes, and goes early when the session ends before; a DISCONNECT discards it
unless its reason code is 0x04."""

from __future__ import annotations

import socket
import time

import pytest

from tests.support import mqtt_raw as raw
from tests.support.harness import RunningBroker
from tests.support.mqtt5 import Client5, Device, offline, until_past, user_properties
from tests.support.waiting import wait_until

WILL_TOPIC = "losant/dev-a/will"
WILL_MESSAGE = 99  # paho's packet type for Will properties


@pytest.fixture
def watcher(feeder: Client5) -> Client5:
    """The feeder, subscribed to dev-a's Will topic."""
    assert feeder.subscribe(WILL_TOPIC, 1) == 1
    return feeder


def abrupt(broker: RunningBroker, device: Device, delay: int, expiry: int = 60,
           **will_properties: object) -> None:
    """``device`` connects with a Will (delayed by ``delay`` s) and its connection breaks
    off without DISCONNECT; returns once the broker has noticed."""
    sock = connect_with_will(broker, device, delay, expiry, **will_properties)
    sock.close()
    wait_until(lambda: offline(broker, device.id) or device.id not in broker.broker.sessions)


def connect_with_will(broker: RunningBroker, device: Device, delay: int, expiry: int = 60,
                      **will_properties: object) -> socket.socket:
    """``device`` on a raw socket with a Session Expiry Interval of ``expiry`` and a QoS 1
    Will on WILL_TOPIC."""
    will = (WILL_TOPIC, b"gone", 1, False,
            raw.props(WILL_MESSAGE, WillDelayInterval=delay, **will_properties))
    sock, connack = raw.session5(broker.port(), device.id, device.key, device.secret,
                                 will=will,
                                 properties=raw.props(1, SessionExpiryInterval=expiry))
    assert connack.code == 0
    return sock


def next_on_will_topic(watcher: Client5, timeout: float = 5.0) -> bytes:
    message = watcher.get(timeout)
    assert message is not None, "nothing arrived on the Will topic"
    return message.payload


def test_a_will_waits_its_delay_then_goes(broker: RunningBroker, watcher: Client5) -> None:
    device = Device(broker, "dev-a")
    abrupt(broker, device, delay=2)
    # Not yet: what is published now on the topic arrives first.
    watcher.publish(WILL_TOPIC, b"sentinel", qos=1)
    assert next_on_will_topic(watcher) == b"sentinel"
    assert next_on_will_topic(watcher) == b"gone"


def test_a_will_is_not_sent_when_the_session_is_resumed_within_its_delay(
        broker: RunningBroker, watcher: Client5) -> None:
    device = Device(broker, "dev-a")
    gone_at = time.time()
    abrupt(broker, device, delay=2)
    with device.connect(clean_session=False, session_expiry=60) as client:
        assert client.session_present
        until_past(gone_at + 2.5)  # past the delay: still nothing
        watcher.publish(WILL_TOPIC, b"sentinel", qos=1)
        assert next_on_will_topic(watcher) == b"sentinel"


def test_a_will_goes_early_when_the_session_ends_before_its_delay(
        broker: RunningBroker, watcher: Client5) -> None:
    device = Device(broker, "dev-a")
    abrupt(broker, device, delay=3600, expiry=1)
    assert next_on_will_topic(watcher, 5.0) == b"gone"  # not in an hour


def test_a_will_goes_at_once_when_the_session_ends_with_its_connection(
        broker: RunningBroker, watcher: Client5) -> None:
    device = Device(broker, "dev-a")
    abrupt(broker, device, delay=3600, expiry=0)
    assert next_on_will_topic(watcher, 2.0) == b"gone"


def test_the_will_carries_its_properties(broker: RunningBroker, watcher: Client5) -> None:
    device = Device(broker, "dev-a")
    abrupt(broker, device, delay=0, ContentType="text/plain",
           UserProperty=[("reason", "power"), ("site", "north")],
           CorrelationData=b"\x07", MessageExpiryInterval=600)
    message = watcher.get()
    assert message is not None and message.payload == b"gone"
    assert message.properties.ContentType == "text/plain"
    assert user_properties(message) == [("reason", "power"), ("site", "north")]
    assert message.properties.CorrelationData == b"\x07"
    assert 590 <= message.properties.MessageExpiryInterval <= 600
    assert not hasattr(message.properties, "WillDelayInterval")


@pytest.mark.parametrize(("reason", "sent"), [(0x00, False), (0x04, True)])
def test_a_disconnect_discards_the_will_unless_it_asks_for_it(
        broker: RunningBroker, watcher: Client5, reason: int, sent: bool) -> None:
    device = Device(broker, "dev-a")
    sock = connect_with_will(broker, device, delay=0, expiry=0)
    with sock:
        sock.sendall(raw.disconnect5(reason))
        assert raw.closed_by_peer(sock, 5.0)
    watcher.publish(WILL_TOPIC, b"sentinel", qos=1)
    first = next_on_will_topic(watcher)
    assert first == (b"gone" if sent else b"sentinel")
