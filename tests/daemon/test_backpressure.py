"""Nothing lost under load (docs/limits.md#backpressure): publishers paced only by their
own PUBACKs, with any window, never make a prompt subscriber lose a message or be
disconnected; the broker pauses the publishers instead. A subscriber that stalls holds
them only up to slow_consumer_timeout."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import mqtt_raw as raw
from tests.support.harness import RunningBroker, broker_settings
from tests.support.load import BurstSpec, Client, Cred, Device, run_burst
from tests.support.metrics import scrape
from tests.support.waiting import wait_until

BACKEND = "backend"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[RunningBroker]:
    # Long enough that a prompt subscriber of a loaded test machine is never taken for a
    # slow one, short enough to keep the stalled cases quick.
    running = RunningBroker(broker_settings(tmp_path, slow_consumer_timeout=3.0)).start()
    try:
        yield running
    finally:
        running.stop()


def fleet(daemon: RunningBroker, devices: int, subscribers: int = 1) -> tuple[str, str]:
    """``devices`` devices dev-N, ``subscribers`` sub-N, and one key for them all."""
    ids = [f"dev-{i}" for i in range(devices)] + [f"sub-{i}" for i in range(subscribers)]
    daemon.ks("upsert_devices", [(d, None, []) for d in ids])
    key, secret = daemon.ks("create_key")
    return key.key, secret


def burst(daemon: RunningBroker, key: str, secret: str, *, devices: int, messages: int,
          inflight: int, subscribers: int = 1, stalled: int = 0, own_address: bool = False,
          topic: str = "losant/dev-{i}/state", sub_filter: str = "losant/+/state",
          timeout: float = 90.0) -> tuple[float, object]:
    spec = BurstSpec(
        host="127.0.0.1", port=daemon.port(),
        publishers=tuple(Device(Cred(f"dev-{i}", key, secret), topic.format(i=i),
                                f"127.0.{i // 250}.{i % 250 + 2}" if own_address else None)
                         for i in range(devices)),
        subscribers=tuple(Cred(f"sub-{i}", key, secret) for i in range(subscribers)),
        stalled=tuple(Cred(f"sub-{subscribers + i}", key, secret) for i in range(stalled)),
        sub_filter=sub_filter, messages=messages, inflight=inflight, timeout=timeout)
    started = time.perf_counter()
    result = asyncio.run(run_burst(spec))
    return time.perf_counter() - started, result


@pytest.mark.parametrize("inflight", [100, 1500])
def test_a_prompt_subscriber_gets_every_message_of_a_publisher_with_a_wide_window(
        daemon: RunningBroker, inflight: int) -> None:
    key, secret = fleet(daemon, devices=1)
    _, result = burst(daemon, key, secret, devices=1, messages=20_000, inflight=inflight,
                      topic="losant/dev-0/state")
    assert result.sent == 20_000, result.as_dict()
    assert result.delivered == [20_000], result.as_dict()
    assert not result.disconnected and not result.errors
    assert daemon.broker.registry.kicks.get("slow_consumer", 0) == 0
    assert sum(daemon.broker.traffic.dropped.values()) == 0
    if inflight > daemon.settings.max_queued_messages:
        # It was not luck: the publisher was paused, and resumed, along the way.
        assert daemon.broker.flow_counters.pauses > 0
    assert daemon.broker.flow_counters.paused == 0


def test_fan_in_from_fifty_addresses_to_one_wildcard_subscriber_loses_nothing(
        daemon: RunningBroker) -> None:
    key, secret = fleet(daemon, devices=50)
    _, result = burst(daemon, key, secret, devices=50, messages=600, inflight=20,
                      own_address=True)
    assert result.sent == 30_000, result.as_dict()
    assert result.delivered == [30_000], result.as_dict()
    assert not result.disconnected
    assert daemon.broker.registry.kicks.get("slow_consumer", 0) == 0


def test_two_clients_feeding_each_other_do_not_deadlock(daemon: RunningBroker) -> None:
    """Each publishes to the other with 1,000 in flight and acknowledges at once: a paused
    connection still reads the PUBACKs that drain its own session."""
    fleet(daemon, devices=2, subscribers=0)
    key, secret = daemon.ks("create_key", device_ids=["dev-0", "dev-1"])

    async def peer(me: int, count: int) -> tuple[int, int]:
        client = Client("127.0.0.1", daemon.port())
        await client.connect(f"dev-{me}", key.key, secret)
        await client.subscribe([f"losant/dev-{me}/command"], 1)
        payload = bytes(64)
        other = f"losant/dev-{1 - me}/command"
        maker = raw_publisher(other, payload)
        sent = acked = received = 0
        window = 1000
        client.write(b"".join(maker() for _ in range(window)))
        sent = window
        while acked < count or received < count:
            replies = []
            for ptype, _, body in await client.read_frames(timeout=10):
                if ptype == 4:  # PUBACK for one of ours
                    acked += 1
                    if sent < count:
                        replies.append(maker())
                        sent += 1
                elif ptype == 3:  # theirs: acknowledge at once
                    received += 1
                    tlen = int.from_bytes(body[:2], "big")
                    replies.append(b"\x40\x02" + body[2 + tlen:4 + tlen])
            if replies:
                client.write(b"".join(replies))
        await client.disconnect()
        return acked, received

    async def both() -> list[tuple[int, int]]:
        return list(await asyncio.wait_for(asyncio.gather(peer(0, 15_000), peer(1, 15_000)),
                                           60))

    assert asyncio.run(both()) == [(15_000, 15_000), (15_000, 15_000)]
    assert daemon.broker.registry.kicks.get("slow_consumer", 0) == 0


def raw_publisher(topic: str, payload: bytes) -> object:
    ids = iter(range(1, 1 << 30))

    def make() -> bytes:
        return raw.publish_qos(topic, payload, 1, next(ids) % 65535 + 1)

    return make


def test_a_stalled_subscriber_holds_the_publisher_only_until_the_timeout(
        daemon: RunningBroker) -> None:
    """One publisher, 1,000 in flight, 100 prompt subscribers and one that never
    acknowledges: the 100 lose nothing, the stalled one is disconnected as a slow
    consumer after slow_consumer_timeout, and the publisher gets every PUBACK (a stalled
    subscriber that held it for good would leave it waiting). The rate after the timeout
    compared with the rate without the stalled subscriber is a figure of scripts/bench
    (the burst workload's "stalled" row)."""
    key, secret = fleet(daemon, devices=1, subscribers=101)
    _, result = burst(daemon, key, secret, devices=1, messages=2_500, inflight=1000,
                      subscribers=100, stalled=1, topic="losant/dev-0/state")
    assert result.sent == 2_500, result.as_dict()
    assert result.delivered == [2_500] * 100, result.as_dict()
    assert result.disconnected == ["sub-100"]
    assert daemon.broker.registry.kicks.get("slow_consumer", 0) == 1
    # It had its in-flight window's worth, never acknowledged, then was cut off.
    assert result.stalled_received == [daemon.settings.max_inflight_messages]
    kick = next(e for e in daemon.audit_events() if e["event"] == "kick")
    assert kick["client_id"] == "sub-100" and kick["reason"] == "slow_consumer"
    assert daemon.broker.flow_counters.paused == 0


def test_a_subscriber_that_never_reads_is_disconnected_after_the_timeout_not_at_once(
        daemon: RunningBroker) -> None:
    """QoS 0: past twice its byte bound, messages for it are dropped and counted; it is
    disconnected only once it has drained nothing for slow_consumer_timeout."""
    key, secret = fleet(daemon, devices=1, subscribers=1)
    sock = raw.open_socket(daemon.port())
    sock.setsockopt(raw.socket.SOL_SOCKET, raw.socket.SO_RCVBUF, 4096)
    with sock:
        sock.sendall(raw.connect("sub-0", key, secret, keepalive=0))
        assert sock.recv(4) == bytes([0x20, 2, 0, 0])
        sock.sendall(raw.subscribe("losant/dev-0/state"))
        assert sock.recv(5)[0] == 0x90
        pub = raw.open_socket(daemon.port())
        with pub:
            pub.sendall(raw.connect("dev-0", key, secret, keepalive=0))
            assert pub.recv(4) == bytes([0x20, 2, 0, 0])
            pub.settimeout(0.2)
            started = time.monotonic()
            message = raw.publish("losant/dev-0/state", b"q" * 2000)
            while time.monotonic() - started < 10 and not daemon.broker.registry.kicks.get(
                    "slow_consumer"):
                try:
                    pub.sendall(message * 8)
                except TimeoutError:
                    pass  # paused: the broker reads no more from us for now
            took = time.monotonic() - started
        assert daemon.broker.registry.kicks.get("slow_consumer") == 1
        assert took >= daemon.settings.slow_consumer_timeout
    metrics = scrape(daemon.api_url())
    assert metrics[("keybroker_slow_consumers_total", ())] == 1
    assert metrics[("keybroker_publisher_pauses_total", ())] >= 1


def test_drops_for_an_offline_session_are_logged_once_per_episode_with_a_count(
        daemon: RunningBroker, caplog: pytest.LogCaptureFixture) -> None:
    key, secret = fleet(daemon, devices=1, subscribers=1)
    sock, _ = raw.session(daemon.port(), "sub-0", key, secret, clean=False)
    sock.sendall(raw.subscribe("losant/dev-0/state", 1, 1))
    assert raw.read_packet(sock) is not None
    sock.close()
    wait_until(lambda: not daemon.broker.sessions["sub-0"].online)
    limit = daemon.settings.max_queued_messages
    caplog.set_level(logging.INFO, logger="broker.routing")
    _, result = burst(daemon, key, secret, devices=1, messages=limit + 250, inflight=50,
                      subscribers=0, topic="losant/dev-0/state")
    assert result.sent == limit + 250
    assert daemon.broker.traffic.dropped["offline_queue_full"] == 250
    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.name == "broker.routing" and "sub-0" in r.getMessage()]

    assert len(lines()) == 1 and "offline with its queue full" in lines()[0]
    sock, connack = raw.session(daemon.port(), "sub-0", key, secret, clean=False)
    sock.close()
    wait_until(lambda: len(lines()) == 2)
    assert "250 QoS 1/2 messages were dropped" in lines()[1]
