"""QoS 1/2 delivery is never lost: unacknowledged messages stay in flight until
acknowledged and are re-sent when a persistent session resumes (MQTT-4.4.0-1, same packet
ids, DUP on PUBLISH, PUBREL for released QoS 2), queued messages reach a resumed session
before newer live ones, a kicked persistent session still collects its messages, and an
incoming QoS 2 message is delivered exactly once across a reconnect. Raw sockets, so no
client library hides what is (not) re-sent."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.support import mqtt_raw as raw
from tests.support.harness import Client, RunningBroker
from tests.support.waiting import wait_until

PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK = 3, 4, 5, 6, 7, 9


@pytest.fixture
def devices(broker: RunningBroker) -> tuple[str, str]:
    """Devices a, b and c, and one key covering all three."""
    for device in ("a", "b", "c"):
        broker.ks("add_device", device)
    key, secret = broker.ks("create_key", device_ids=["a", "b", "c"])
    return key.key, secret


def subscribe(sock: socket.socket, topic_filter: str, qos: int, packet_id: int = 1) -> int:
    sock.sendall(raw.subscribe(topic_filter, packet_id, qos))
    suback = raw.read_packet(sock)
    assert suback is not None and suback.kind == SUBACK
    return suback.body[-1]


def publish(broker: RunningBroker, devices: tuple[str, str], *messages: tuple[str, bytes, int],
            client_id: str = "b") -> None:
    with Client(broker.port(), client_id, *devices) as sender:
        assert sender.connect() == 0
        for topic, payload, qos in messages:
            sender.publish(topic, payload, qos=qos)


def publishes(sock: socket.socket, count: int, timeout: float = 3.0) -> list[raw.Packet]:
    out = []
    while len(out) < count:
        packet = raw.read_packet(sock, timeout)
        if packet is None:
            break
        if packet.kind == PUBLISH:
            out.append(packet)
    return out


def nothing_more(sock: socket.socket, within: float = 0.5) -> bool:
    return raw.read_packet(sock, within) is None


def test_unacknowledged_qos1_and_qos2_are_resent_on_resume(
    broker: RunningBroker, devices: tuple[str, str]
) -> None:
    sock, connack = raw.session(broker.port(), "a", *devices, clean=False)
    assert subscribe(sock, "losant/a/rd/#", 2) == 2
    publish(broker, devices, ("losant/a/rd/one", b"one", 1), ("losant/a/rd/two", b"two", 2))
    first = publishes(sock, 2)
    assert [(p.topic, p.qos, p.dup) for p in first] == [
        ("losant/a/rd/one", 1, False), ("losant/a/rd/two", 2, False)]
    sock.close()  # no PUBACK, no PUBREC
    wait_until(lambda: broker.offline("a"))
    sock, connack = raw.session(broker.port(), "a", *devices, clean=False)
    with sock:
        assert connack.body == bytes([1, 0])  # session present
        again = publishes(sock, 2)
        assert [(p.topic, p.payload, p.qos, p.dup, p.packet_id) for p in again] == [
            (p.topic, p.payload, p.qos, True, p.packet_id) for p in first]
        # Acknowledged now: the flows complete and nothing is sent a third time.
        sock.sendall(raw.ack(PUBACK, again[0].packet_id) + raw.ack(PUBREC, again[1].packet_id))
        pubrel = raw.read_packet(sock)
        assert pubrel is not None and (pubrel.kind, pubrel.packet_id) == (
            PUBREL, again[1].packet_id)
        sock.sendall(raw.ack(PUBCOMP, again[1].packet_id))
        assert nothing_more(sock)
    wait_until(lambda: broker.offline("a"))  # every acknowledgement was handled before
    assert len(broker.broker.sessions["a"].outbox) == 0


def test_pubrel_is_resent_when_pubcomp_is_missing(
    broker: RunningBroker, devices: tuple[str, str]
) -> None:
    sock, _ = raw.session(broker.port(), "a", *devices, clean=False)
    assert subscribe(sock, "losant/a/q2", 2) == 2
    publish(broker, devices, ("losant/a/q2", b"exactly-once", 2))
    (message,) = publishes(sock, 1)
    sock.sendall(raw.ack(PUBREC, message.packet_id))
    pubrel = raw.read_packet(sock)
    assert pubrel is not None and pubrel.kind == PUBREL
    sock.close()  # no PUBCOMP
    wait_until(lambda: broker.offline("a"))
    sock, connack = raw.session(broker.port(), "a", *devices, clean=False)
    with sock:
        assert connack.body == bytes([1, 0])
        resent = raw.read_packet(sock)
        assert resent is not None
        assert (resent.kind, resent.first & 0x0F, resent.packet_id) == (
            PUBREL, 2, message.packet_id)
        assert nothing_more(sock)  # the PUBLISH itself is not sent again
        sock.sendall(raw.ack(PUBCOMP, message.packet_id))
        assert nothing_more(sock, 0.3)


def test_incoming_qos2_is_delivered_once_across_a_reconnect(
    broker: RunningBroker, devices: tuple[str, str]
) -> None:
    with Client(broker.port(), "c", *devices) as watcher:
        assert watcher.connect() == 0
        assert watcher.subscribe("losant/b/state", 2) == 2
        sock, _ = raw.session(broker.port(), "b", *devices, clean=False)
        sock.sendall(raw.publish_qos("losant/b/state", b"once", 2, 7))
        pubrec = raw.read_packet(sock)
        assert pubrec is not None and (pubrec.kind, pubrec.packet_id) == (PUBREC, 7)
        sock.close()  # the PUBREL never left
        wait_until(lambda: broker.offline("b"))
        sock, connack = raw.session(broker.port(), "b", *devices, clean=False)
        with sock:
            assert connack.body == bytes([1, 0])
            # The client re-sends the PUBLISH (DUP) since it may have missed the PUBREC.
            sock.sendall(raw.publish_qos("losant/b/state", b"once", 2, 7, dup=True))
            pubrec = raw.read_packet(sock)
            assert pubrec is not None and (pubrec.kind, pubrec.packet_id) == (PUBREC, 7)
            sock.sendall(raw.ack(PUBREL, 7))
            pubcomp = raw.read_packet(sock)
            assert pubcomp is not None and (pubcomp.kind, pubcomp.packet_id) == (PUBCOMP, 7)
        assert [m.payload for m in iter(lambda: watcher.get(1.0), None)] == [b"once"]


def test_resumed_inflight_messages_are_checked_against_the_new_grant(
    broker: RunningBroker, devices: tuple[str, str]
) -> None:
    narrow, narrow_secret = broker.ks("create_key", device_ids=["a"])
    sock, _ = raw.session(broker.port(), "a", *devices, clean=False)
    assert subscribe(sock, "losant/b/state", 1) == 1
    assert subscribe(sock, "losant/a/command", 1, packet_id=2) == 1
    publish(broker, devices, ("losant/b/state", b"for-the-wide-key", 1),
            ("losant/a/command", b"still-readable", 1))
    assert len(publishes(sock, 2)) == 2
    sock.close()  # both unacknowledged
    wait_until(lambda: broker.offline("a"))
    sock, connack = raw.session(broker.port(), "a", narrow.key, narrow_secret, clean=False)
    with sock:
        assert connack.body == bytes([1, 0])
        assert [p.payload for p in publishes(sock, 2, timeout=1.0)] == [b"still-readable"]


def test_a_withheld_puback_does_not_lose_the_message(
    broker: RunningBroker, devices: tuple[str, str]
) -> None:
    """amqtt dropped a delivery from its in-flight state after 5 s without PUBACK."""
    sock, _ = raw.session(broker.port(), "a", *devices, clean=False)
    assert subscribe(sock, "losant/a/command", 1) == 1
    publish(broker, devices, ("losant/a/command", b"slow-ack", 1))
    (message,) = publishes(sock, 1)
    time.sleep(6)  # time under test: longer than amqtt's 5 s give-up timer
    sock.close()
    wait_until(lambda: broker.offline("a"))
    sock, _ = raw.session(broker.port(), "a", *devices, clean=False)
    with sock:
        (again,) = publishes(sock, 1)
        assert (again.payload, again.packet_id, again.dup) == (b"slow-ack", message.packet_id,
                                                              True)


def test_a_kicked_persistent_session_still_collects_its_messages(
    broker: RunningBroker, devices: tuple[str, str]
) -> None:
    sock, _ = raw.session(broker.port(), "a", *devices, clean=False)
    assert subscribe(sock, "losant/a/command", 1) == 1
    broker.ks("request_kick", "a")
    assert raw.closed_by_peer(sock, within=3)
    sock.close()
    publish(broker, devices, ("losant/a/command", b"while-kicked-off", 1))
    sock, connack = raw.session(broker.port(), "a", *devices, clean=False)
    with sock:
        assert connack.body == bytes([1, 0])
        assert [p.payload for p in publishes(sock, 1)] == [b"while-kicked-off"]


def test_queued_messages_arrive_before_newer_live_ones(
    broker: RunningBroker, devices: tuple[str, str]
) -> None:
    """A device reconnects while another keeps publishing to it: whatever was queued while
    it was offline comes first, then the live messages, each in publication order."""
    sock, _ = raw.session(broker.port(), "a", *devices, clean=False)
    assert subscribe(sock, "losant/a/seq", 1) == 1
    sock.close()
    wait_until(lambda: broker.offline("a"))
    with Client(broker.port(), "b", *devices) as sender:
        assert sender.connect() == 0
        for i in range(200):
            sender.publish("losant/a/seq", f"queued-{i:03}", qos=1)
        resumed_event = threading.Event()
        live: list[str] = []

        def flood() -> None:
            """Publish, each after the last one's PUBACK, from before the device comes
            back until 100 after its CONNACK (at most 600 in all, so that with the 200
            queued they fit its offline queue however long its CONNECT takes)."""
            after = 0
            while after < 100 and len(live) < 600:
                live.append(f"live-{len(live):03}")
                sender.publish("losant/a/seq", live[-1], qos=1)
                after += resumed_event.is_set()

        flooding = threading.Thread(target=flood)
        flooding.start()
        wait_until(lambda: len(live) >= 10)  # the flood is under way when the device comes back
        resumed = raw.open_socket(broker.port())
        resumed.sendall(raw.connect_packet("a", *devices, clean=False))
        received = []
        with resumed:
            try:
                connack = raw.read_packet(resumed)
                assert connack is not None and connack.body == bytes([1, 0])
            finally:
                resumed_event.set()

            def all_arrived() -> bool:
                while (packet := raw.read_packet(resumed, 0.05)) is not None:
                    if packet.kind == PUBLISH:
                        received.append(packet.payload.decode())
                        resumed.sendall(raw.ack(PUBACK, packet.packet_id))
                return not flooding.is_alive() and len(received) >= 200 + len(live)

            wait_until(all_arrived, 30, "every message, queued and live")
        flooding.join()
    assert received == [f"queued-{i:03}" for i in range(200)] + live
