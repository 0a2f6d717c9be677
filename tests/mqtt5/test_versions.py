"""MQTT 3.1.1 and MQTT 5 clients talk to each other on one broker: a 3.1.1 subscriber gets
an MQTT 5 message as 3.1.1 packets (its properties dropped, its expiry still applied), and
an MQTT 5 subscriber gets a 3.1.1 message with no properties."""

from __future__ import annotations

import struct
import time

from tests.support import mqtt_raw as raw
from tests.support.harness import Client, RunningBroker
from tests.support.mqtt5 import Client5, Device, device_key, offline, until_past
from tests.support.waiting import wait_until

STATE = "losant/dev-a/state"
PROPERTIES = {"UserProperty": [("k", "v")], "ContentType": "text/plain",
              "ResponseTopic": "losant/feeder/r", "CorrelationData": b"c",
              "PayloadFormatIndicator": 1, "MessageExpiryInterval": 3600}


def test_a_311_subscriber_gets_an_mqtt5_message_without_its_properties(
        broker: RunningBroker, feeder: Client5) -> None:
    key, secret = device_key(broker, "dev-a")
    sock, connack = raw.session(broker.port(), "dev-a", key, secret)
    with sock:
        assert connack.body == b"\x00\x00"  # an MQTT 3.1.1 CONNACK
        sock.sendall(raw.subscribe(STATE, qos=1))
        assert raw.expect(sock, 9).body == b"\x00\x01\x01"
        feeder.publish(STATE, b"zero", qos=0, **PROPERTIES)
        feeder.publish(STATE, b"one", qos=1, retain=True, **PROPERTIES)
        zero, one = raw.expect(sock, 3), raw.expect(sock, 3)
        # Exactly topic (+ packet id) + payload: no property list in between.
        assert zero.body == raw.field(STATE) + b"zero"
        assert one.body == raw.field(STATE) + struct.pack("!H", one.packet_id) + b"one"
        assert (one.qos, one.retain) == (1, False)
        sock.sendall(raw.ack(4, one.packet_id))
        sock.sendall(raw.subscribe(STATE, packet_id=2, qos=1))  # again: the retained one
        raw.expect(sock, 9)
        again = raw.expect(sock, 3)
        assert again.body == raw.field(STATE) + struct.pack("!H", again.packet_id) + b"one"
        assert again.retain


def test_an_mqtt5_subscriber_gets_a_311_message_with_no_properties(
        broker: RunningBroker) -> None:
    key, secret = device_key(broker, "dev-a")
    subscriber = Device(broker, "dev-b", device_ids=["dev-b", "dev-a"])
    with subscriber.connect() as client, \
            Client(broker.port(), "dev-a", key, secret, protocol=4) as publisher:
        assert client.subscribe(STATE, 1) == 1
        assert publisher.connect() == 0
        publisher.publish(STATE, b"from-311", qos=1)
        message = client.get()
        assert message is not None and message.payload == b"from-311"
        assert message.properties.json() == {}  # paho: no property at all


def test_an_expired_message_is_not_sent_to_a_311_session_either(
        broker: RunningBroker, feeder: Client5) -> None:
    key, secret = device_key(broker, "dev-a")
    with Client(broker.port(), "dev-a", key, secret, clean_session=False,
                protocol=4) as client:
        assert client.connect() == 0
        assert client.subscribe(STATE, 1) == 1
    wait_until(lambda: offline(broker, "dev-a"))
    sent = time.time()
    feeder.publish(STATE, b"short-lived", qos=1, MessageExpiryInterval=1)
    feeder.publish(STATE, b"lasting", qos=1)
    until_past(sent + 1.0)
    with Client(broker.port(), "dev-a", key, secret, clean_session=False,
                protocol=4) as client:
        assert client.connect() == 0
        message = client.get()
        assert message is not None and message.payload == b"lasting"
