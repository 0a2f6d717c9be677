"""Session Expiry Interval and Clean Start (docs/mqtt5.md#what-is-supported): a session
outlives its connection for as long as the client asked, within the broker's maximum; a
DISCONNECT may change that; Clean Start discards a stored session."""

from __future__ import annotations

import pytest

from tests.mqtt5.conftest import StartDaemon
from tests.support.harness import RunningBroker
from tests.support.mqtt5 import Client5, Device, gone, offline
from tests.support.waiting import wait_until

COMMAND = "losant/dev-a/command"


def first_received(client: Client5, feeder: Client5, topic: str) -> bytes:
    """Subscribe ``client`` to ``topic``, have ``feeder`` publish a sentinel there: the
    payload of the first message ``client`` gets (the sentinel when nothing waited)."""
    assert client.subscribe(topic, 1) == 1
    feeder.publish(topic, b"sentinel", qos=1)
    message = client.get()
    assert message is not None
    return message.payload


def test_a_session_with_an_expiry_interval_is_resumed_with_what_waited(
        broker: RunningBroker, feeder: Client5) -> None:
    device = Device(broker, "dev-a")
    device.away(COMMAND)
    feeder.publish(COMMAND, b"while-away", qos=1)
    with device.connect(clean_session=False, session_expiry=60) as client:
        assert client.session_present
        message = client.get()
        assert message is not None and message.payload == b"while-away"


@pytest.mark.parametrize("expiry", [0, 1])
def test_a_session_ends_when_its_expiry_interval_passes(broker: RunningBroker,
                                                        feeder: Client5, expiry: int) -> None:
    device = Device(broker, "dev-a")
    with device.connect(clean_session=False, session_expiry=expiry) as client:
        assert client.subscribe(COMMAND, 1) == 1
        client.disconnect()
    feeder.publish(COMMAND, b"lost", qos=1)
    wait_until(lambda: gone(broker, "dev-a"), 5.0, "the session expired")
    with device.connect(clean_session=False, session_expiry=60) as client:
        assert not client.session_present
        assert first_received(client, feeder, COMMAND) == b"sentinel"


@pytest.mark.parametrize(("maximum", "requested", "granted"), [
    (2, 60, 2),
    (2, 0xFFFFFFFF, 2),
    (2, 1, None),  # not shortened: not said
    (0, 0xFFFFFFFF, None),  # no maximum: never expires, as asked
])
def test_the_connack_says_when_the_broker_shortened_the_expiry(
        daemon_with: StartDaemon, maximum: int, requested: int, granted: int | None) -> None:
    daemon = daemon_with(session_expiry=maximum)
    with Device(daemon, "dev-a").connect(session_expiry=requested) as client:
        assert client.connack is not None
        assert getattr(client.connack.properties, "SessionExpiryInterval", None) == granted


def test_the_broker_maximum_bounds_a_session_that_asked_for_longer(
        daemon_with: StartDaemon) -> None:
    daemon = daemon_with(session_expiry=1)
    device = Device(daemon, "dev-a")
    with device.connect(clean_session=False, session_expiry=3600) as client:
        client.disconnect()
    wait_until(lambda: gone(daemon, "dev-a"), 5.0, "the session expired at the maximum")


def test_a_disconnect_can_end_the_session_at_once(broker: RunningBroker) -> None:
    device = Device(broker, "dev-a")
    with device.connect(clean_session=False, session_expiry=3600) as client:
        assert client.subscribe(COMMAND, 1) == 1
        client.disconnect(SessionExpiryInterval=0)
    wait_until(lambda: gone(broker, "dev-a"), 2.0, "the session ended with its connection")


def test_a_disconnect_can_shorten_the_expiry(broker: RunningBroker) -> None:
    device = Device(broker, "dev-a")
    with device.connect(clean_session=False, session_expiry=3600) as client:
        client.disconnect(SessionExpiryInterval=1)
    wait_until(lambda: offline(broker, "dev-a") or gone(broker, "dev-a"))
    wait_until(lambda: gone(broker, "dev-a"), 5.0, "the session expired after 1 s")


def test_a_disconnect_can_lengthen_the_expiry(broker: RunningBroker) -> None:
    """dev-a asked for 1 s and then for an hour; dev-b, disconnected after it, for 1 s:
    once dev-b's session has expired, dev-a's would have too, had the DISCONNECT not
    lengthened it."""
    first, second = Device(broker, "dev-a"), Device(broker, "dev-b")
    with first.connect(clean_session=False, session_expiry=1) as client:
        client.disconnect(SessionExpiryInterval=3600)
    wait_until(lambda: offline(broker, "dev-a"))
    with second.connect(clean_session=False, session_expiry=1) as client:
        client.disconnect()
    wait_until(lambda: gone(broker, "dev-b"), 5.0, "the control session expired")
    assert offline(broker, "dev-a")
    with first.connect(clean_session=False, session_expiry=60) as client:
        assert client.session_present


def test_clean_start_discards_the_stored_session(broker: RunningBroker,
                                                 feeder: Client5) -> None:
    device = Device(broker, "dev-a")
    device.away(COMMAND)
    feeder.publish(COMMAND, b"queued", qos=1)
    with device.connect(clean_session=True, session_expiry=60) as client:
        assert not client.session_present
        # Neither the queued message nor the old subscription is there.
        feeder.publish(COMMAND, b"after", qos=1)
        assert first_received(client, feeder, "losant/dev-a/other") == b"sentinel"
