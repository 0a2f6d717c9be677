"""A bounded fuzzer against the real daemon on loopback: random and mutated packets, before
and after an authenticated CONNECT. Afterwards the daemon still serves a valid client and
the keystore is unchanged. `scripts/fuzz` runs the same with many more examples
(KEYBROKER_FUZZ_EXAMPLES)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.policy.guard import GuardSettings
from tests.support import mqtt_raw as raw
from tests.support.harness import Client, RunningBroker, broker_settings, running_daemon

EXAMPLES = int(os.environ.get("KEYBROKER_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get(
    "KEYBROKER_FUZZ_EXAMPLES"), suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    # The brute-force guard is off: garbage before CONNECT counts as a failure, and the
    # fuzzer would otherwise be banned after 20 cases instead of reaching the parser.
    with running_daemon(broker_settings(
            tmp, connect_timeout=0.5, packet_timeout=0.5, max_packet_size=8192,
            guard=GuardSettings(max_failures=0))) as running:
        running.ks("add_device", "fuzz")
        running.ks("add_device", "good")
        yield running


@pytest.fixture(scope="module")
def fuzz_key(daemon: RunningBroker) -> tuple[str, str]:
    key, secret = daemon.ks("create_key", device_ids=["fuzz"], topic_mode="all")
    return key.key, secret


def snapshot(daemon: RunningBroker) -> tuple[object, ...]:
    keys = sorted((k.key, k.status, k.name, k.expires_at, k.pub_topics)
                  for k in daemon.ks("list_keys"))
    devices = sorted((d.id, d.name, d.tags) for d in daemon.ks("list_devices"))
    return tuple(keys), tuple(devices)


def exchange(port: int, data: bytes, *, prefix: bytes = b"") -> None:
    """Send bytes, read whatever comes back briefly, close. Never raises on I/O."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            if prefix:
                sock.sendall(prefix)
                sock.recv(4)
            sock.sendall(data)
            sock.settimeout(0.05)
            try:
                while sock.recv(65536):
                    pass
            except (TimeoutError, OSError):
                pass
    except OSError:
        pass


def valid_packets(key: str, secret: str) -> list[bytes]:
    return [
        raw.connect("fuzz", key, secret),
        raw.publish("custom/fuzz", b"payload"),
        raw.subscribe("custom/#"),
        raw.packet(0xA2, b"\x00\x02" + raw.field("custom/#")),  # UNSUBSCRIBE
        bytes([0xC0, 0]),  # PINGREQ
        raw.packet(0x40, b"\x00\x01"),  # PUBACK
        bytes([0xE0, 0]),  # DISCONNECT
    ]


@st.composite
def mutated(draw: st.DrawFn, packets: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(packets)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "length"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif op == "truncate" and data:
            del data[draw(st.integers(0, len(data) - 1)):]
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "length" and len(data) > 1:
            data[1] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF]))
    return bytes(data)


def test_fuzz_first_packet(daemon: RunningBroker, fuzz_key: tuple[str, str]) -> None:
    before = snapshot(daemon)
    packets = valid_packets(*fuzz_key)

    @FUZZ
    @given(data=st.one_of(st.binary(max_size=512), mutated(packets)))
    def run(data: bytes) -> None:
        exchange(daemon.port(), data)

    run()
    assert_healthy(daemon, before)


def test_fuzz_after_connect(daemon: RunningBroker, fuzz_key: tuple[str, str]) -> None:
    before = snapshot(daemon)
    packets = valid_packets(*fuzz_key)
    connect = packets[0]

    @FUZZ
    @given(data=st.one_of(st.binary(max_size=512), mutated(packets[1:]),
                          st.lists(mutated(packets[1:]), max_size=5).map(b"".join)))
    def run(data: bytes) -> None:
        exchange(daemon.port(), data, prefix=connect)

    run()
    assert_healthy(daemon, before)


def assert_healthy(daemon: RunningBroker, before: tuple[object, ...]) -> None:
    key, secret = daemon.ks("create_key", device_ids=["good"])
    with Client(daemon.port(), "good", key.key, secret) as client:
        assert client.connect() == 0
        assert client.subscribe("losant/good/command") == 0
        client.publish("losant/good/command", b"alive")
        msg = client.get()
        assert msg is not None and msg.payload == b"alive"
    daemon.ks("delete_keys", [key.key])
    assert snapshot(daemon) == before
