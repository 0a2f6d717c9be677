"""Topic aliases from clients (docs/mqtt5.md#what-is-supported): an alias stands for the
topic it was set with, per connection, and what is published through it is checked like a
PUBLISH naming that topic: no alias reaches a topic its key may not name. (Aliases out of
range or unknown end the connection: tests/mqtt5/test_disconnect.py.)"""

from __future__ import annotations

from tests.mqtt5.conftest import StartDaemon
from tests.support import mqtt_raw as raw
from tests.support.harness import RunningBroker
from tests.support.mqtt5 import Client5, Device, received_before
from tests.support.waiting import wait_until

NOT_AUTHORIZED, PROTOCOL_ERROR, QUOTA_EXCEEDED = 0x87, 0x82, 0x97
STATE = "losant/dev-a/state"


def received_until(client: Client5, sentinel: bytes) -> list[tuple[str, bytes]]:
    return [(m.topic, m.payload) for m in received_before(client, sentinel)]


def test_an_alias_stands_for_the_topic_it_was_set_with(broker: RunningBroker,
                                                       feeder: Client5) -> None:
    assert feeder.subscribe("losant/#") == 0
    with Device(broker, "dev-a").connect() as client:
        assert client.connack is not None
        assert client.connack.properties.TopicAliasMaximum == 16
        answers = [client.publish(STATE, b"1", qos=1, TopicAlias=3),
                   client.publish("", b"2", qos=1, TopicAlias=3),
                   client.publish("losant/dev-a/other", b"3", qos=1, TopicAlias=3),  # re-set
                   client.publish("", b"4", qos=1, TopicAlias=3),
                   client.publish(STATE, b"5", qos=1, TopicAlias=16),
                   client.publish("", b"6", qos=1, TopicAlias=16)]
        assert [a.code for a in answers if a is not None] == [0] * 6
        client.publish(STATE, b"end", qos=1)
    assert received_until(feeder, b"end") == [
        (STATE, b"1"), (STATE, b"2"), ("losant/dev-a/other", b"3"),
        ("losant/dev-a/other", b"4"), (STATE, b"5"), (STATE, b"6")]


def test_an_alias_never_reaches_a_topic_its_key_may_not_name(broker: RunningBroker,
                                                             feeder: Client5) -> None:
    broker.ks("add_device", "dev-b")
    assert feeder.subscribe("losant/#") == 0
    with Device(broker, "dev-a").connect() as client:
        for payload, topic in ((b"named", "losant/dev-b/state"), (b"aliased", "")):
            answer = client.publish(topic, payload, qos=1, TopicAlias=1)
            assert answer is not None and answer.code == NOT_AUTHORIZED
        client.publish(STATE, b"end", qos=1)
    assert received_until(feeder, b"end") == []


def test_an_alias_follows_the_key_as_it_changes(broker: RunningBroker,
                                                feeder: Client5) -> None:
    """An alias set while the key allowed its topic is refused once the key no longer
    does (the live change reaches the session; the alias is no way around it)."""
    assert feeder.subscribe("custom/#") == 0
    device = Device(broker, "dev-a", topic_mode="all")
    with device.connect() as client:
        answer = client.publish("custom/alerts", b"before", qos=1, TopicAlias=1)
        assert answer is not None and answer.code == 0
        broker.ks("update_key", device.key, topic_mode="none")

        def narrowed() -> bool:
            answer = client.publish("custom/probe", b"probe", qos=1)
            return answer is not None and answer.code == NOT_AUTHORIZED

        wait_until(narrowed, 5.0, "the key change reached the session")
        answer = client.publish("", b"after", qos=1, TopicAlias=1)
        assert answer is not None and answer.code == NOT_AUTHORIZED
    feeder.publish("custom/alerts", b"end", qos=1)
    assert [p for t, p in received_until(feeder, b"end") if p != b"probe"] == [b"before"]


def test_aliases_belong_to_one_connection(broker: RunningBroker) -> None:
    device = Device(broker, "dev-a")
    with device.connect(clean_session=False, session_expiry=60) as client:
        answer = client.publish(STATE, b"x", qos=1, TopicAlias=2)
        assert answer is not None and answer.code == 0
        client.disconnect()
    sock, connack = raw.session5(broker.port(), "dev-a", device.key, device.secret,
                                 clean_start=False, properties=raw.props(
                                     1, SessionExpiryInterval=60))
    with sock:
        assert connack.code == 0
        sock.sendall(raw.publish5("", b"x", properties=raw.props(3, TopicAlias=2)))
        reply = raw.server_disconnect(sock)
    assert reply is not None and reply.code == PROTOCOL_ERROR


def test_the_alias_table_counts_in_the_sessions_bytes(daemon_with: StartDaemon) -> None:
    """Aliases hold their topics for the connection's life: their bytes count in
    max_session_bytes and may take a quarter of it (here 2 KiB of 8 KiB); past that the
    connection ends with 0x97 Quota exceeded."""
    daemon = daemon_with(max_session_bytes=8 * 1024)
    device = Device(daemon, "dev-a", topic_mode="all")
    sock, connack = raw.session5(daemon.port(), "dev-a", device.key, device.secret)
    with sock:
        assert connack.code == 0
        long_topic = "custom/" + "a" * 1000
        sock.sendall(raw.publish5(long_topic, b"1", properties=raw.props(3, TopicAlias=1)))
        sock.sendall(raw.publish5(long_topic, b"2", properties=raw.props(3, TopicAlias=1)))
        assert raw.read_packet(sock, 0.5) is None  # one alias, set twice: ~1 KiB, kept
        sock.sendall(raw.publish5("custom/" + "b" * 1000, b"3",
                                  properties=raw.props(3, TopicAlias=2)))
        reply = raw.server_disconnect(sock)
    assert reply is not None and reply.code == QUOTA_EXCEEDED
    assert "topic aliases" in str(reply.reason)
