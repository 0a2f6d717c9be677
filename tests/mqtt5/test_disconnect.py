"""The broker ends an MQTT 5 connection with a DISCONNECT that says why
(docs/mqtt5.md#refusals-say-why): 0x98 for each revocation, 0x8E take-over, 0x8D keep
alive, 0x97 slow consumer, 0x95 packet too large, 0x96 rate, 0x93 Receive Maximum,
0x87 a denied PUBLISH with denied_publish = "disconnect", 0x90 topic name, 0x94 topic
alias, 0x81 malformed, 0x82 protocol error; each reason string names the rule class, and
there is none with ``[mqtt] reason_strings = false``."""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.mqtt5.conftest import Says, StartDaemon
from tests.support import mqtt_raw as raw
from tests.support.harness import RunningBroker
from tests.support.mqtt5 import Client5, Device, device_key
from tests.support.waiting import wait_until

ADMINISTRATIVE_ACTION, TAKEN_OVER, KEEP_ALIVE_TIMEOUT, QUOTA_EXCEEDED = 0x98, 0x8E, 0x8D, 0x97
PACKET_TOO_LARGE, RATE_TOO_HIGH, RECEIVE_MAXIMUM_EXCEEDED = 0x95, 0x96, 0x93
NOT_AUTHORIZED, TOPIC_NAME_INVALID, TOPIC_ALIAS_INVALID = 0x87, 0x90, 0x94
MALFORMED_PACKET, PROTOCOL_ERROR = 0x81, 0x82
PUBREC, SUBACK = 5, 9


def told(client: Client5, within: float = 5.0) -> tuple[int, str | None]:
    """The code and reason string of the DISCONNECT the broker ended ``client`` with."""
    assert client.disconnected.wait(within), "the broker did not end the connection"
    answer = client.server_disconnect
    assert answer is not None, "the connection ended without a DISCONNECT from the broker"
    return answer.code, answer.reason


def raw_session(daemon: RunningBroker, device: str, **key_options: Any) -> socket.socket:
    key, secret = device_key(daemon, device, **key_options)
    sock, connack = raw.session5(daemon.port(), device, key, secret)
    assert connack.code == 0
    return sock


def ended_with(sock: socket.socket, packet: bytes) -> raw.Reply5:
    """Send ``packet``; the DISCONNECT the broker then ends the connection with."""
    with sock:
        sock.sendall(packet)
        reply = raw.server_disconnect(sock)
        assert reply is not None, "closed without a DISCONNECT"
        assert raw.closed_by_peer(sock, 5.0)
    return reply


# --- 0x98 Administrative action: every revocation of a live session ----------------------

Revoke = Callable[[RunningBroker, str], None]


def _deactivate(daemon: RunningBroker, key: str) -> None:
    daemon.ks("set_status", [key], "inactive")


def _delete_key(daemon: RunningBroker, key: str) -> None:
    daemon.ks("delete_keys", [key])


def _expire(daemon: RunningBroker, key: str) -> None:
    daemon.ks("update_key", key, expires_at=datetime.now(UTC) + timedelta(seconds=0.5))


def _delete_device(daemon: RunningBroker, _key: str) -> None:
    daemon.ks("remove_devices", ["dev-a"])


def _deny_address(daemon: RunningBroker, key: str) -> None:
    daemon.ks("update_key", key, address_mode="except", addresses=["127.0.0.0/8"])


def _kick(daemon: RunningBroker, _key: str) -> None:
    daemon.ks("request_kick", "dev-a")


@pytest.mark.parametrize(("revoke", "reason"), [
    pytest.param(_deactivate, "key inactive", id="key-deactivated"),
    pytest.param(_delete_key, "key deleted", id="key-deleted"),
    pytest.param(_expire, "key expired", id="key-expired"),
    pytest.param(_delete_device, "device deleted", id="device-deleted"),
    pytest.param(_deny_address, "address no longer allowed", id="address-denied"),
    pytest.param(_kick, "disconnected by an operator", id="operator-kick"),
])
def test_each_revocation_ends_a_session_with_0x98(refusing: RunningBroker, says: Says,
                                                  revoke: Revoke, reason: str) -> None:
    key, secret = device_key(refusing, "dev-a")
    with Client5(refusing.port(), "dev-a", key, secret) as client:
        assert client.connect() == 0
        revoke(refusing, key)
        code, text = told(client)
    assert code == ADMINISTRATIVE_ACTION
    says(text, reason)


def test_deleting_the_application_ends_its_sessions_with_0x98(refusing: RunningBroker,
                                                              reason_strings: bool) -> None:
    app = refusing.ks("create_app", "plant")
    with Device(refusing, "dev-p", app=app.id).connect() as client:
        refusing.ks("delete_apps", [app.id])
        code, text = told(client)
    assert code == ADMINISTRATIVE_ACTION
    # Its keys and devices go with it: whichever deletion the daemon applies first says so.
    assert text in ({"application deleted", "key deleted", "device deleted"}
                    if reason_strings else {None})


# --- the session's own connection -------------------------------------------------------

def test_a_new_connection_with_the_same_client_id_takes_over_with_0x8e(
        refusing: RunningBroker, says: Says) -> None:
    key, secret = device_key(refusing, "dev-a")
    with Client5(refusing.port(), "dev-a", key, secret) as first, \
            Client5(refusing.port(), "dev-a", key, secret) as second:
        assert first.connect() == 0
        assert second.connect() == 0
        code, text = told(first)
        assert code == TAKEN_OVER
        says(text, "session taken over")
        assert not second.disconnected.is_set()


def test_a_client_silent_past_its_keep_alive_gets_0x8d(daemon_with: StartDaemon,
                                                       reason_strings: bool,
                                                       says: Says) -> None:
    daemon = daemon_with(reason_strings=reason_strings, keepalive_factor=1.0)
    key, secret = device_key(daemon, "dev-a")
    sock, connack = raw.session5(daemon.port(), "dev-a", key, secret, keepalive=1)
    with sock:
        assert connack.code == 0
        # 1 s of silence, noticed by the once-a-second sweep
        reply = raw.server_disconnect(sock, within=5.0)
    assert reply is not None and reply.code == KEEP_ALIVE_TIMEOUT
    says(reply.reason, "keep alive timeout")


def test_a_slow_consumer_gets_0x97(daemon_with: StartDaemon, reason_strings: bool,
                                   says: Says) -> None:
    daemon = daemon_with(reason_strings=reason_strings, max_session_bytes=16 * 1024,
                         slow_consumer_timeout=0.5)
    key, secret = device_key(daemon, "dev-a", topic_mode="all")
    consumer = socket.socket()
    consumer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    consumer.settimeout(5)
    consumer.connect(("127.0.0.1", daemon.port()))
    with consumer, Device(daemon, "dev-p", topic_mode="all").connect() as publisher:
        consumer.sendall(raw.connect5("dev-a", key, secret, keepalive=0))
        assert raw.reply5(raw.expect(consumer, 2)).code == 0
        consumer.sendall(raw.subscribe5([("custom/firehose", 0)]))
        assert raw.reply5(raw.expect(consumer, SUBACK)).codes == (0,)
        # The consumer reads nothing more while the publisher floods what it reads.
        kicks = daemon.broker.registry.kicks

        def kicked() -> bool:
            for _ in range(50):  # enough to fill the socket buffers between two looks
                publisher.publish("custom/firehose", b"z" * 2000)
            return kicks.get("slow_consumer", 0) > 0

        wait_until(kicked, 10.0, "the consumer disconnected as slow")
        reply = raw.server_disconnect(consumer)  # behind what was buffered for it
        assert not publisher.disconnected.is_set()
    assert reply is not None and reply.code == QUOTA_EXCEEDED
    says(reply.reason, "slow consumer")


def test_a_packet_past_the_maximum_packet_size_gets_0x95(daemon_with: StartDaemon,
                                                          reason_strings: bool,
                                                          says: Says) -> None:
    daemon = daemon_with(reason_strings=reason_strings, max_packet_size=2048)
    key, secret = device_key(daemon, "dev-a")
    sock, connack = raw.session5(daemon.port(), "dev-a", key, secret)
    assert connack.properties.MaximumPacketSize == 2048
    reply = ended_with(sock, raw.publish5("losant/dev-a/state", b"x" * 2048))
    assert reply.code == PACKET_TOO_LARGE
    says(reply.reason, "packet too large")


def test_publishing_past_the_rate_limit_gets_0x96(daemon_with: StartDaemon,
                                                  reason_strings: bool, says: Says) -> None:
    daemon = daemon_with(reason_strings=reason_strings, max_publish_rate=5.0)
    sock = raw_session(daemon, "dev-a")
    reply = ended_with(sock, raw.publish5("losant/dev-a/state") * 20)
    assert reply.code == RATE_TOO_HIGH
    says(reply.reason, "publish rate limit")


def test_more_unacknowledged_qos2_than_the_receive_maximum_gets_0x93(
        daemon_with: StartDaemon, reason_strings: bool, says: Says) -> None:
    daemon = daemon_with(reason_strings=reason_strings, receive_maximum=3)
    key, secret = device_key(daemon, "dev-a")
    sock, connack = raw.session5(daemon.port(), "dev-a", key, secret)
    assert connack.properties.ReceiveMaximum == 3
    for packet_id in (1, 2, 3):  # each stays unacknowledged: no PUBREL follows
        sock.sendall(raw.publish5("losant/dev-a/state", b"x", 2, packet_id))
        assert raw.reply5(raw.expect(sock, PUBREC)).code == 0
    reply = ended_with(sock, raw.publish5("losant/dev-a/state", b"x", 2, 4))
    assert reply.code == RECEIVE_MAXIMUM_EXCEEDED
    says(reply.reason, "receive maximum")


def test_a_denied_publish_with_denied_publish_disconnect_gets_0x87(
        daemon_with: StartDaemon, reason_strings: bool, says: Says) -> None:
    daemon = daemon_with(reason_strings=reason_strings, denied_publish="disconnect")
    daemon.ks("add_device", "dev-b")
    sock = raw_session(daemon, "dev-a")
    # No PUBACK first: the DISCONNECT is the next packet.
    with sock:
        sock.sendall(raw.publish5("losant/dev-b/state", b"x", 1, 1))
        reply = raw.reply5(raw.expect(sock, 14))
    assert reply.code == NOT_AUTHORIZED
    says(reply.reason, "device not in the key's scope")


@pytest.mark.parametrize("topic", ["custom/+/x", "custom/#", "custom/" + "x" * 40,
                                   "custom/a/b/c/d"])
def test_an_invalid_topic_name_gets_0x90(daemon_with: StartDaemon, reason_strings: bool,
                                         says: Says, topic: str) -> None:
    daemon = daemon_with(reason_strings=reason_strings, max_topic_length=40,
                         max_topic_levels=4)
    sock = raw_session(daemon, "dev-a", topic_mode="all")
    reply = ended_with(sock, raw.publish5(topic, b"x", 1, 1))
    assert reply.code == TOPIC_NAME_INVALID
    says(reply.reason, "invalid topic name")


@pytest.mark.parametrize(("maximum", "alias"), [
    pytest.param(16, b"\x00\x00", id="alias-0"),
    pytest.param(16, b"\x00\x11", id="past-the-maximum"),
    pytest.param(0, b"\x00\x01", id="aliases-off"),
])
def test_a_topic_alias_out_of_range_gets_0x94(daemon_with: StartDaemon, reason_strings: bool,
                                              says: Says, maximum: int, alias: bytes) -> None:
    daemon = daemon_with(reason_strings=reason_strings, topic_alias_maximum=maximum)
    key, secret = device_key(daemon, "dev-a")
    sock, connack = raw.session5(daemon.port(), "dev-a", key, secret)
    assert getattr(connack.properties, "TopicAliasMaximum", 0) == maximum
    reply = ended_with(sock, raw.publish5("losant/dev-a/state", b"x", properties=(
        raw.unchecked_props((0x23, alias)))))
    assert reply.code == TOPIC_ALIAS_INVALID
    says(reply.reason, "topic alias out of range")


@pytest.mark.parametrize("packet", [
    pytest.param(raw.publish5("losant/dev-a/state", properties=raw.unchecked_props(
        (0x11, b"\x00\x00\x00\x05"))), id="session-expiry-in-publish"),
    pytest.param(raw.publish5("losant/dev-a/state", properties=raw.unchecked_props(
        (0x01, b"\x01"), (0x01, b"\x01"))), id="property-twice"),
    pytest.param(raw.subscribe5([("losant/dev-a/x", 0)], properties=raw.unchecked_props(
        (0x0B, b"\x00"))), id="subscription-identifier-0"),
    pytest.param(raw.subscribe5([("losant/dev-a/x", 0xC0)]), id="reserved-option-bits"),
    pytest.param(raw.subscribe5([("losant/dev-a/x", 0x30)]), id="retain-handling-3"),
    pytest.param(raw.packet(0x30, b"\x00\x10losant/dev-a/x"), id="publish-cut-short"),
])
def test_a_malformed_packet_gets_0x81(refusing: RunningBroker, says: Says,
                                      packet: bytes) -> None:
    reply = ended_with(raw_session(refusing, "dev-a"), packet)
    assert reply.code == MALFORMED_PACKET
    says(reply.reason, "malformed packet")


@pytest.mark.parametrize(("packet", "reason"), [
    pytest.param(b"\xf0\x00", "protocol error", id="auth"),
    pytest.param(raw.connect5("dev-a"), "protocol error", id="second-connect"),
    pytest.param(raw.subscribe5([("$share/g/losant/dev-a/x", raw.options(no_local=True))]),
                 "protocol error", id="no-local-on-a-shared-subscription"),
    pytest.param(raw.publish5("", properties=raw.props(3, TopicAlias=5)),
                 "unknown topic alias", id="unknown-alias"),
    pytest.param(raw.publish5(""), "no topic and no topic alias", id="no-topic"),
    pytest.param(raw.disconnect5(0, raw.props(14, SessionExpiryInterval=60)),
                 "session expiry set after 0", id="session-expiry-after-0"),
])
def test_a_protocol_error_gets_0x82(refusing: RunningBroker, says: Says, packet: bytes,
                                    reason: str) -> None:
    reply = ended_with(raw_session(refusing, "dev-a"), packet)
    assert reply.code == PROTOCOL_ERROR
    says(reply.reason, reason)


def test_the_will_is_published_when_a_disconnect_is_a_protocol_error(
        refusing: RunningBroker) -> None:
    """Such a DISCONNECT is not a valid one (MQTT-3.14.2-2): the Will is not discarded."""
    with Device(refusing, "watcher", device_ids=[], all_devices=True).connect() as watcher:
        assert watcher.subscribe("losant/dev-a/will") == 0
        key, secret = device_key(refusing, "dev-a")
        sock, _ = raw.session5(refusing.port(), "dev-a", key, secret,
                               will=("losant/dev-a/will", b"gone", 0, False, raw.NO_PROPS))
        reply = ended_with(sock, raw.disconnect5(0, raw.props(14, SessionExpiryInterval=60)))
        assert reply.code == PROTOCOL_ERROR
        will = watcher.get()
        assert will is not None and will.payload == b"gone"
