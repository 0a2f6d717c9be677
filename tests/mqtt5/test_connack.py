"""Refused MQTT 5 CONNECTs (docs/mqtt5.md#refusals-say-why): one per CONNACK reason code
and rule, each with the reason string that names the rule class, and none with
``[mqtt] reason_strings = false``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from broker.policy.guard import GuardSettings
from tests.mqtt5.conftest import Says, StartDaemon
from tests.support import mqtt_raw as raw
from tests.support.harness import RunningBroker
from tests.support.mqtt5 import Answer, Client5, device_key

BAD_CREDENTIALS, NOT_AUTHORIZED, BANNED = 0x86, 0x87, 0x8A
CLIENT_ID_NOT_VALID, BAD_AUTH_METHOD, PROTOCOL_ERROR = 0x85, 0x8C, 0x82


def connack(daemon: RunningBroker, client_id: str, key: str | None, secret: str | None,
            will: str | None = None) -> Answer:
    with Client5(daemon.port(), client_id, key, secret) as client:
        if will is not None:
            client.will(will, b"gone")
        client.connect()
    assert client.connack is not None
    return client.connack


def test_unknown_key_and_wrong_secret_are_refused_alike(refusing: RunningBroker,
                                                        says: Says) -> None:
    key, secret = device_key(refusing, "dev-a")
    unknown = connack(refusing, "dev-a", "0" * 32, secret)
    wrong = connack(refusing, "dev-a", key, secret[::-1])
    assert unknown.code == wrong.code == BAD_CREDENTIALS
    says(unknown.reason, "bad user name or password")
    assert wrong.reason == unknown.reason  # nothing tells whether the key exists
    assert connack(refusing, "dev-a", key, secret).code == 0


def test_no_credentials_are_refused(refusing: RunningBroker, says: Says) -> None:
    device_key(refusing, "dev-a")
    refused = connack(refusing, "dev-a", None, None)
    assert refused.code == BAD_CREDENTIALS
    says(refused.reason, "no credentials")


Setup = Callable[[RunningBroker], tuple[str, str, str, str | None]]


def _inactive(daemon: RunningBroker) -> tuple[str, str, str, str | None]:
    key, secret = device_key(daemon, "dev-a")
    daemon.ks("set_status", [key], "inactive")
    return "dev-a", key, secret, None


def _expired(daemon: RunningBroker) -> tuple[str, str, str, str | None]:
    key, secret = device_key(daemon, "dev-a",
                             expires_at=datetime.now(UTC) + timedelta(days=1))
    daemon.ks("update_key", key, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    return "dev-a", key, secret, None


def _not_a_device(daemon: RunningBroker) -> tuple[str, str, str, str | None]:
    key, secret = device_key(daemon, "dev-a", device_ids=[], all_devices=True)
    return "not-a-device", key, secret, None


def _outside_scope(daemon: RunningBroker) -> tuple[str, str, str, str | None]:
    daemon.ks("add_device", "dev-b")
    key, secret = device_key(daemon, "dev-a")
    return "dev-b", key, secret, None


def _address(daemon: RunningBroker) -> tuple[str, str, str, str | None]:
    key, secret = device_key(daemon, "dev-a", address_mode="only",
                             addresses=["10.11.12.0/24"])
    return "dev-a", key, secret, None


def _will(daemon: RunningBroker) -> tuple[str, str, str, str | None]:
    daemon.ks("add_device", "dev-b")
    key, secret = device_key(daemon, "dev-a")
    return "dev-a", key, secret, "losant/dev-b/state"


@pytest.mark.parametrize(("setup", "reason"), [
    pytest.param(_inactive, "key inactive", id="inactive"),
    pytest.param(_expired, "key expired", id="expired"),
    pytest.param(_not_a_device, "client id is not a device", id="not-a-device"),
    pytest.param(_outside_scope, "device not in the key's scope", id="outside-scope"),
    pytest.param(_address, "address not allowed by the key", id="address"),
    pytest.param(_will, "Will topic not allowed", id="will-topic"),
])
def test_each_rule_of_the_key_is_refused_with_0x87(refusing: RunningBroker, says: Says,
                                                   setup: Setup, reason: str) -> None:
    client_id, key, secret, will = setup(refusing)
    refused = connack(refusing, client_id, key, secret, will)
    assert refused.code == NOT_AUTHORIZED
    says(refused.reason, reason)
    assert client_id not in refusing.broker.sessions


def test_a_banned_source_is_refused_with_0x8a_even_with_the_right_secret(
        daemon_with: StartDaemon, reason_strings: bool, says: Says) -> None:
    daemon = daemon_with(reason_strings=reason_strings,
                         guard=GuardSettings(max_failures=2, window=60, ban=60, max_ban=60))
    key, secret = device_key(daemon, "dev-a")
    for _ in range(2):
        assert connack(daemon, "dev-a", key, "wrong").code == BAD_CREDENTIALS
    banned = connack(daemon, "dev-a", key, secret)
    assert banned.code == BANNED
    says(banned.reason, "address banned after failed attempts")


def raw_connack(daemon: RunningBroker, packet: bytes) -> raw.Reply5:
    with raw.open_socket(daemon.port()) as sock:
        sock.sendall(packet)
        reply = raw.reply5(raw.expect(sock, 2))
        assert raw.closed_by_peer(sock, 5.0)  # a refusing CONNACK ends the connection
    return reply


def test_an_empty_client_id_is_refused_with_0x85(refusing: RunningBroker, says: Says) -> None:
    key, secret = device_key(refusing, "dev-a")
    refused = raw_connack(refusing, raw.connect5("", key, secret))
    assert refused.code == CLIENT_ID_NOT_VALID
    says(refused.reason, "client id is empty")
    assert not hasattr(refused.properties, "AssignedClientIdentifier")


def test_enhanced_authentication_is_refused_with_0x8c(refusing: RunningBroker,
                                                      says: Says) -> None:
    key, secret = device_key(refusing, "dev-a")
    asks = raw.props(1, AuthenticationMethod="SCRAM-SHA-256", AuthenticationData=b"\x01")
    refused = raw_connack(refusing, raw.connect5("dev-a", key, secret, properties=asks))
    assert refused.code == BAD_AUTH_METHOD
    says(refused.reason, "enhanced authentication is not offered")
    assert "dev-a" not in refusing.broker.sessions


@pytest.mark.parametrize("zero", [
    pytest.param((0x21, b"\x00\x00"), id="receive-maximum"),
    pytest.param((0x27, b"\x00\x00\x00\x00"), id="maximum-packet-size"),
])
def test_a_receive_maximum_or_packet_size_of_0_is_a_protocol_error(
        refusing: RunningBroker, says: Says, zero: tuple[int, bytes]) -> None:
    key, secret = device_key(refusing, "dev-a")
    refused = raw_connack(refusing, raw.connect5("dev-a", key, secret,
                                                 properties=raw.unchecked_props(zero)))
    assert refused.code == PROTOCOL_ERROR
    says(refused.reason, "receive maximum or packet size 0")
