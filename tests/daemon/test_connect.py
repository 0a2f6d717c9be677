"""CONNECT against a real daemon (docs/access.md#connect): the CONNACK matrix, scope fixed at
CONNECT, client IP rules, the take-over attack, refused CONNECTs leave nothing behind, keep-
alive."""

from __future__ import annotations

import socket
import struct
from datetime import UTC, datetime, timedelta

import pytest

from tests.support.harness import Client, RunningBroker
from tests.support.waiting import wait_until


@pytest.fixture
def broker(broker_on_each_backend: RunningBroker) -> RunningBroker:
    """The daemon on an SQLite file, then on a PostgreSQL database."""
    return broker_on_each_backend

ACCEPTED, BAD_CREDENTIALS, NOT_AUTHORIZED = 0, 4, 5
# The CONNECT matrix holds for MQTT 5 clients too (0x86 where 3.1.1 says 4, 0x87 for 5).
ALSO_MQTT5 = pytest.mark.usefixtures("each_protocol")


def make_key(broker: RunningBroker, **options: object) -> tuple[str, str]:
    key, secret = broker.ks("create_key", **options)
    return key.key, secret


@pytest.fixture
def fleet(broker: RunningBroker) -> RunningBroker:
    broker.ks("add_device", "dev-a", tags=[("site", "north")])
    broker.ks("add_device", "dev-b", tags=[("site", "south")])
    return broker


def connect(broker: RunningBroker, client_id: str, key: str | None, secret: str | None,
            **kwargs: object) -> int:
    with Client(broker.port(), client_id, key, secret) as client:
        return client.connect(**kwargs)  # type: ignore[arg-type]


@ALSO_MQTT5
def test_valid_key_for_registered_device_is_accepted(fleet: RunningBroker) -> None:
    key, secret = make_key(fleet, device_ids=["dev-a"])
    assert connect(fleet, "dev-a", key, secret) == ACCEPTED


@ALSO_MQTT5
def test_missing_credentials_are_refused_with_4(fleet: RunningBroker) -> None:
    assert connect(fleet, "dev-a", None, None) == BAD_CREDENTIALS


@ALSO_MQTT5
def test_unknown_key_is_refused_with_4(fleet: RunningBroker) -> None:
    _, secret = make_key(fleet)
    assert connect(fleet, "dev-a", "0" * 32, secret) == BAD_CREDENTIALS


@ALSO_MQTT5
def test_wrong_secret_is_refused_with_4(fleet: RunningBroker) -> None:
    key, secret = make_key(fleet)
    assert connect(fleet, "dev-a", key, secret[:-1] + ("A" if secret[-1] != "A" else "B")) == 4


@ALSO_MQTT5
def test_inactive_key_is_refused_with_5_and_reactivation_restores_it(fleet: RunningBroker) -> None:
    key, secret = make_key(fleet)
    fleet.ks("set_status", [key], "inactive")
    assert connect(fleet, "dev-a", key, secret) == NOT_AUTHORIZED
    fleet.ks("set_status", [key], "active")
    assert connect(fleet, "dev-a", key, secret) == ACCEPTED


@ALSO_MQTT5
def test_expired_key_is_refused_and_moving_expiry_forward_restores_it(fleet: RunningBroker) -> None:
    key, secret = make_key(fleet, expires_at=datetime.now(UTC) + timedelta(days=1))
    assert connect(fleet, "dev-a", key, secret) == ACCEPTED
    fleet.ks("update_key", key, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    assert connect(fleet, "dev-a", key, secret) == NOT_AUTHORIZED
    fleet.ks("update_key", key, expires_at=datetime.now(UTC) + timedelta(days=1))
    assert connect(fleet, "dev-a", key, secret) == ACCEPTED


@ALSO_MQTT5
def test_unregistered_client_id_is_refused_with_5(fleet: RunningBroker) -> None:
    key, secret = make_key(fleet)
    assert connect(fleet, "not-a-device", key, secret) == NOT_AUTHORIZED


@ALSO_MQTT5
def test_device_outside_the_key_restriction_is_refused_with_5(fleet: RunningBroker) -> None:
    by_id, by_id_secret = make_key(fleet, device_ids=["dev-a"])
    by_tag, by_tag_secret = make_key(fleet, device_tags=[("site", "north")])
    assert connect(fleet, "dev-b", by_id, by_id_secret) == NOT_AUTHORIZED
    assert connect(fleet, "dev-b", by_tag, by_tag_secret) == NOT_AUTHORIZED
    assert connect(fleet, "dev-a", by_tag, by_tag_secret) == ACCEPTED


@ALSO_MQTT5
def test_tag_change_applies_at_next_connect_not_to_live_session(fleet: RunningBroker) -> None:
    key, secret = make_key(fleet, device_tags=[("site", "north")])
    with Client(fleet.port(), "dev-a", key, secret) as live:
        assert live.connect() == ACCEPTED
        assert live.subscribe("losant/dev-a/command") == 0
        fleet.ks("untag_device", "dev-a", ["site"])
        # The live session keeps the scope it had at CONNECT ...
        live.publish("losant/dev-a/command", b"still-here")
        msg = live.get()
        assert msg is not None and msg.payload == b"still-here"
        assert not live.disconnected.is_set()
    # ... and the next CONNECT sees the new tags.
    assert connect(fleet, "dev-a", key, secret) == NOT_AUTHORIZED


@ALSO_MQTT5
@pytest.mark.parametrize(
    ("mode", "addresses", "expected"),
    [
        ("only", ["127.0.0.1"], ACCEPTED),
        ("only", ["10.0.0.0/8", "::1"], NOT_AUTHORIZED),
        ("except", ["127.0.0.0/8"], NOT_AUTHORIZED),
        ("except", ["10.0.0.0/8"], ACCEPTED),
        ("only", ["::ffff:127.0.0.1"], ACCEPTED),  # IPv4-mapped rules match IPv4 clients
    ],
)
def test_connection_restriction(fleet: RunningBroker, mode: str, addresses: list[str],
                                expected: int) -> None:
    key, secret = make_key(fleet, address_mode=mode, addresses=addresses)
    assert connect(fleet, "dev-a", key, secret) == expected


@ALSO_MQTT5
def test_will_topic_outside_policy_is_refused_and_own_topic_accepted(fleet: RunningBroker) -> None:
    key, secret = make_key(fleet, device_ids=["dev-a"])
    with Client(fleet.port(), "dev-a", key, secret).will("losant/dev-b/state", b"x") as client:
        assert client.connect() == NOT_AUTHORIZED
    with Client(fleet.port(), "dev-a", key, secret).will("$SYS/fake", b"x") as client:
        assert client.connect() == NOT_AUTHORIZED
    with Client(fleet.port(), "dev-a", key, secret).will("losant/dev-a/state", b"x") as client:
        assert client.connect() == ACCEPTED


@ALSO_MQTT5
def test_refusals_are_audited_with_reason_and_never_the_secret(fleet: RunningBroker) -> None:
    key, secret = make_key(fleet, device_ids=["dev-a"])
    wrong = secret[::-1]
    assert connect(fleet, "dev-a", key, wrong) == BAD_CREDENTIALS
    assert connect(fleet, "dev-b", key, secret) == NOT_AUTHORIZED
    assert connect(fleet, "dev-a", key, secret) == ACCEPTED
    events = wait_until(lambda: fleet.audited("connect_ok")
                        and len(fleet.audited("connect_refused")) == 2 and fleet.audit_events())
    reasons = [(e["event"], e["reason"], e["client_id"]) for e in events]
    assert ("connect_refused", "bad_credentials", "dev-a") in reasons
    assert ("connect_refused", "device_not_in_scope", "dev-b") in reasons
    assert ("connect_ok", None, "dev-a") in reasons
    # The key that was tried is named (it is public), for an unknown key too.
    assert connect(fleet, "dev-a", "no-such-key", secret) == BAD_CREDENTIALS
    refused = wait_until(lambda: len(fleet.audited("connect_refused", "bad_credentials")) == 2
                         and fleet.audited("connect_refused", "bad_credentials"))
    assert [e["key"] for e in refused] == [key, "no-such-key"]
    events = fleet.audit_events()
    ok = next(e for e in events if e["event"] == "connect_ok")
    assert ok["key"] == key and ok["client_ip"] == "127.0.0.1" and ok["listener"] == "tcp"
    text = fleet.settings.audit_path.read_text()  # type: ignore[union-attr]
    assert secret not in text and wrong not in text


@ALSO_MQTT5
def test_refused_connect_leaves_no_session_behind(fleet: RunningBroker) -> None:
    key, secret = make_key(fleet, device_ids=["dev-a"])
    for _ in range(5):
        assert connect(fleet, "dev-b", key, secret) == NOT_AUTHORIZED
        assert connect(fleet, "dev-a", key, "wrong") == BAD_CREDENTIALS
    wait_until(lambda: not fleet.broker.admission.connections)  # each refusal is over
    assert "dev-b" not in fleet.broker.sessions
    assert "dev-a" not in fleet.broker.sessions


@ALSO_MQTT5
@pytest.mark.parametrize("clean_session", [True, False])
def test_takeover_with_wrong_secret_leaves_the_victim_untouched(
    fleet: RunningBroker, clean_session: bool
) -> None:
    key, secret = make_key(fleet, device_ids=["dev-a"])
    with Client(fleet.port(), "dev-a", key, secret, clean_session=clean_session) as victim:
        assert victim.connect() == ACCEPTED
        assert victim.subscribe("losant/dev-a/command", 1) == 1
        # The attacker knows the victim's client id but not the secret.
        assert connect(fleet, "dev-a", key, "guess") == BAD_CREDENTIALS
        other_key, other_secret = make_key(fleet, device_ids=["dev-b"])
        assert connect(fleet, "dev-a", other_key, other_secret) == NOT_AUTHORIZED
        # The attempts are over (the victim's is the one connection left) ...
        wait_until(lambda: len(fleet.broker.admission.connections) == 1)
        assert not victim.disconnected.is_set()
        victim.publish("losant/dev-a/command", b"after-attack", qos=1)
        msg = victim.get()
        assert msg is not None and msg.payload == b"after-attack"


@ALSO_MQTT5
def test_authenticated_takeover_replaces_the_old_connection(fleet: RunningBroker) -> None:
    key, secret = make_key(fleet, device_ids=["dev-a"])
    with Client(fleet.port(), "dev-a", key, secret) as first:
        assert first.connect() == ACCEPTED
        with Client(fleet.port(), "dev-a", key, secret) as second:
            assert second.connect() == ACCEPTED
            assert first.disconnected.wait(3)
            assert second.subscribe("losant/dev-a/command") == 0
            second.publish("losant/dev-a/command", b"new")
            msg = second.get()
            assert msg is not None and msg.payload == b"new"


def _raw_connect(port: int, client_id: str, key: str, secret: str, keepalive: int) -> socket.socket:
    def field(text: str) -> bytes:
        data = text.encode()
        return struct.pack("!H", len(data)) + data

    variable = field("MQTT") + bytes([4, 0b11000010]) + struct.pack("!H", keepalive)
    payload = field(client_id) + field(key) + field(secret)
    body = variable + payload
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(bytes([0x10, len(body)]) + body)
    assert sock.recv(4) == bytes([0x20, 2, 0, 0])
    return sock


def test_client_silent_past_keepalive_is_dropped(fleet: RunningBroker) -> None:
    key, secret = make_key(fleet, device_ids=["dev-a"])
    keepalive = 1
    sock = _raw_connect(fleet.port(), "dev-a", key, secret, keepalive=keepalive)
    # Generous: twice 1.5 x the keep-alive plus the once-a-second sweep that notices it.
    sock.settimeout(2 * (keepalive * fleet.settings.keepalive_factor + 1.0))
    with sock:
        assert sock.recv(1) == b""  # closed by the broker, not by us
    wait_until(lambda: "dev-a" not in fleet.broker.sessions)


def test_client_sending_pings_is_kept(fleet: RunningBroker) -> None:
    key, secret = make_key(fleet, device_ids=["dev-a"])
    with Client(fleet.port(), "dev-a", key, secret) as client:
        assert client.connect(keepalive=1) == ACCEPTED
        # Time under test: twice past the 1.5 s a silent client would get, still there.
        assert not client.disconnected.wait(3)
