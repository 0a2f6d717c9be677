"""Flow control and sizes both ways (docs/mqtt5.md#what-is-supported): the client's Receive
Maximum bounds what is in flight to it and the broker's is announced; a message larger
than the client's Maximum Packet Size is not sent to it and the broker's is announced;
Server Keep Alive."""

from __future__ import annotations

import socket

import pytest

from tests.mqtt5.conftest import StartDaemon
from tests.support import mqtt_raw as raw
from tests.support.harness import RunningBroker
from tests.support.mqtt5 import Client5, Device

COMMAND = "losant/dev-a/command"
PUBLISH, PUBACK, SUBACK = 3, 4, 9


def raw_subscriber(broker: RunningBroker, **connect_properties: object) -> socket.socket:
    """dev-a on a raw socket, subscribed to its command topic at QoS 1, acknowledging
    nothing unless the test does."""
    device = Device(broker, "dev-a")
    sock, connack = raw.session5(broker.port(), "dev-a", device.key, device.secret,
                                 properties=raw.props(1, **connect_properties))
    assert connack.code == 0
    sock.sendall(raw.subscribe5([(COMMAND, 1)]))
    assert raw.reply5(raw.expect(sock, SUBACK)).codes == (1,)
    return sock


def test_the_clients_receive_maximum_bounds_what_is_in_flight_to_it(
        broker: RunningBroker, feeder: Client5) -> None:
    with raw_subscriber(broker, ReceiveMaximum=2) as sock:
        for n in range(5):
            feeder.publish(COMMAND, b"%d" % n, qos=1)
        first = [raw.publish_of(raw.expect(sock, PUBLISH)) for _ in range(2)]
        assert [m.payload for m in first] == [b"0", b"1"]
        assert raw.read_packet(sock, 0.3) is None  # two unacknowledged: nothing more
        sock.sendall(raw.ack5(PUBACK, first[0].packet_id))
        third = raw.publish_of(raw.expect(sock, PUBLISH))
        assert third.payload == b"2"
        assert raw.read_packet(sock, 0.3) is None
        for message in (first[1], third):
            sock.sendall(raw.ack5(PUBACK, message.packet_id))
        assert [raw.publish_of(raw.expect(sock, PUBLISH)).payload for _ in range(2)] == [
            b"3", b"4"]


@pytest.mark.parametrize("receive_maximum", [100, 7])
def test_the_brokers_receive_maximum_is_announced(daemon_with: StartDaemon,
                                                  receive_maximum: int) -> None:
    daemon = daemon_with(receive_maximum=receive_maximum)
    with Device(daemon, "dev-a").connect() as client:
        assert client.connack is not None
        assert client.connack.properties.ReceiveMaximum == receive_maximum


def test_a_message_larger_than_the_clients_maximum_is_not_sent_to_it(
        broker: RunningBroker, feeder: Client5) -> None:
    with raw_subscriber(broker, MaximumPacketSize=300) as sock:
        for qos in (0, 1):
            feeder.publish(COMMAND, b"L" * 400, qos=qos)
            feeder.publish(COMMAND, b"s" * 100, qos=qos)
        received = [raw.publish_of(raw.expect(sock, PUBLISH)) for _ in range(2)]
        assert [(m.payload, m.qos) for m in received] == [(b"s" * 100, 0), (b"s" * 100, 1)]
        sock.sendall(raw.ack5(PUBACK, received[1].packet_id))
        assert raw.read_packet(sock, 0.3) is None
    assert broker.broker.traffic.dropped["too_large_for_client"] == 2


def test_the_brokers_maximum_packet_size_is_announced(daemon_with: StartDaemon) -> None:
    daemon = daemon_with(max_packet_size=5000)
    with Device(daemon, "dev-a").connect() as client:
        assert client.connack is not None
        assert client.connack.properties.MaximumPacketSize == 5000


@pytest.mark.parametrize(("asked", "given"), [(60, 5), (0, 5), (3, None), (5, None)])
def test_a_keep_alive_past_the_maximum_is_replaced_by_the_servers(
        daemon_with: StartDaemon, asked: int, given: int | None) -> None:
    daemon = daemon_with(max_keepalive=5)
    with Device(daemon, "dev-a").connect(keepalive=asked) as client:
        assert client.connack is not None
        assert getattr(client.connack.properties, "ServerKeepAlive", None) == given


def test_the_server_keep_alive_is_enforced(daemon_with: StartDaemon) -> None:
    daemon = daemon_with(max_keepalive=1, keepalive_factor=1.0)
    device = Device(daemon, "dev-a")
    sock, connack = raw.session5(daemon.port(), "dev-a", device.key, device.secret,
                                 keepalive=600)
    with sock:
        assert connack.properties.ServerKeepAlive == 1
        reply = raw.server_disconnect(sock, within=5.0)  # silent past 1 s, not 600
    assert reply is not None and reply.code == 0x8D
