"""Refused CONNECTs in the daemon's log (docs/observability.md#log): one INFO line each
naming the client id, the key tried, the source address, the CONNACK code and the reason,
never the secret; a source that keeps failing gets at most 20 lines a second, the rest
counted in one line."""

from __future__ import annotations

import logging
import math
import re

import pytest

from broker.policy.guard import GuardSettings
from tests.support import mqtt_raw
from tests.support.harness import Client, RunningBroker, StartDaemon
from tests.support.waiting import wait_until

ADMISSION = "broker.mqtt.admission"
REFUSED = re.compile(r"^connect_refused: client (?P<client>\S+) key (?P<key>\S+) from "
                     r"(?P<ip>\S+) on (?P<listener>\S+): CONNACK (?P<code>\d) (?P<reason>.+)$")


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=ADMISSION)
    return caplog


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    return [match.groupdict() for record in caplog.records if record.name == ADMISSION
            and (match := REFUSED.match(record.getMessage())) is not None]


def test_each_refused_connect_is_one_info_line_without_the_secret(
    broker: RunningBroker, logged: pytest.LogCaptureFixture
) -> None:
    broker.ks("add_device", "dev-a")
    key, secret = broker.ks("create_key", device_ids=["dev-a"])
    idle, idle_secret = broker.ks("create_key", device_ids=["dev-a"])
    broker.ks("set_status", [idle.key], "inactive")
    attempts = [("dev-a", key.key, "wrong-" + secret, 4),  # a wrong secret
                ("dev-b", "no-such-key-0123", secret, 4),  # an unknown key
                ("dev-a", idle.key, idle_secret, 5)]  # an inactive key
    for client_id, username, password, code in attempts:
        with Client(broker.port(), client_id, username, password) as client:
            assert client.connect() == code
    lines = wait_until(lambda: len(refusal_lines(logged)) >= 3 and refusal_lines(logged))
    assert [(x["client"], x["key"], x["ip"], x["listener"], x["code"], x["reason"])
            for x in lines] == [
        ("'dev-a'", repr(key.key), "127.0.0.1", "tcp", "4", "bad_credentials"),
        ("'dev-b'", "'no-such-key-0123'", "127.0.0.1", "tcp", "4", "bad_credentials"),
        ("'dev-a'", repr(idle.key), "127.0.0.1", "tcp", "5", "inactive"),
    ]
    records = [r for r in logged.records if r.name == ADMISSION]
    assert all(r.levelno == logging.INFO for r in records) and len(records) == 3
    for password in (secret, idle_secret):
        assert password not in logged.text
        assert password not in broker.settings.audit_path.read_text()  # type: ignore[union-attr]


def test_connacks_of_the_protocol_checks_are_logged_too(
    broker: RunningBroker, logged: pytest.LogCaptureFixture
) -> None:
    with mqtt_raw.open_socket(broker.port()) as sock:  # a persistent session, no client id
        sock.sendall(mqtt_raw.connect_packet("", "some-key", "some-secret", clean=False))
        answer = mqtt_raw.read_packet(sock)
    assert answer is not None and answer.body[-1] == 2  # CONNACK 2: identifier rejected
    line = wait_until(lambda: refusal_lines(logged))[0]
    assert (line["client"], line["key"], line["code"], line["reason"]) == (
        "''", "'some-key'", "2", "persistent session without client id")
    assert "some-secret" not in logged.text


@pytest.fixture
def no_guard(daemon_with: StartDaemon) -> RunningBroker:
    """A daemon that never bans, and lets any number of connections wait for CONNECT."""
    return daemon_with(guard=GuardSettings(max_failures=0), max_unauthenticated_per_source=0)


def test_one_source_cannot_flood_the_log(no_guard: RunningBroker,
                                         logged: pytest.LogCaptureFixture) -> None:
    sent = 100
    sockets = [mqtt_raw.open_socket(no_guard.port()) for _ in range(sent)]
    try:
        for sock in sockets:
            sock.sendall(mqtt_raw.connect_packet("dev-a", "no-such-key", "guess"))
        for sock in sockets:
            answer = mqtt_raw.read_packet(sock)
            assert answer is not None and answer.body[-1] == 4
    finally:
        for sock in sockets:
            sock.close()

    def held_back() -> int:
        return sum(int(r.getMessage().split()[0]) for r in logged.records
                   if r.name == ADMISSION and "not logged in 1 s" in r.getMessage())

    wait_until(lambda: len(refusal_lines(logged)) + held_back() == sent,
               what="every refusal logged or counted")
    records = [r for r in logged.records if r.name == ADMISSION and REFUSED.match(r.getMessage())]
    # A window is 1 s from its first line, at most 20 lines each: lines spread over T
    # seconds fill at most floor(T) + 1 windows (one more for clock rounding).
    windows = math.floor(records[-1].created - records[0].created) + 2
    assert len(records) <= 20 * windows
    assert held_back() > 0
    assert all("127.0.0.1" in r.getMessage() for r in logged.records if r.name == ADMISSION)

