"""Nothing lost under load (docs/limits.md#backpressure): publishers paced only by their
own PUBACKs, with any window, never make a prompt subscriber lose a message or be
disconnected; the broker pauses the publishers instead. A subscriber that stalls holds
them only up to slow_consumer_timeout."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time

import pytest
import requests

from broker.mqtt.connection import HELD_OVERHEAD
from tests.support import mqtt_raw as raw
from tests.support.harness import Client as HarnessClient
from tests.support.harness import RunningBroker, StartDaemon
from tests.support.load import BurstResult, BurstSpec, Client, Cred, Device, run_burst
from tests.support.metrics import scrape
from tests.support.waiting import wait_until

BACKEND = "backend"


@pytest.fixture
def daemon(daemon_with: StartDaemon) -> RunningBroker:
    # Long enough that a prompt subscriber of a loaded test machine is never taken for a
    # slow one, short enough to keep the stalled cases quick.
    return daemon_with(slow_consumer_timeout=3.0)


def fleet(daemon: RunningBroker, devices: int, subscribers: int = 1) -> tuple[str, str]:
    """``devices`` devices dev-N, ``subscribers`` sub-N, and one key for them all."""
    ids = [f"dev-{i}" for i in range(devices)] + [f"sub-{i}" for i in range(subscribers)]
    daemon.ks("upsert_devices", [(d, None, []) for d in ids])
    key, secret = daemon.ks("create_key")
    return key.key, secret


def burst(daemon: RunningBroker, key: str, secret: str, *, devices: int, messages: int,
          inflight: int, subscribers: int = 1, stalled: int = 0, own_address: bool = False,
          topic: str = "losant/dev-{i}/state", sub_filter: str = "losant/+/state",
          timeout: float = 90.0) -> BurstResult:
    spec = BurstSpec(
        host="127.0.0.1", port=daemon.port(),
        publishers=tuple(Device(Cred(f"dev-{i}", key, secret), topic.format(i=i),
                                f"127.0.{i // 250}.{i % 250 + 2}" if own_address else None)
                         for i in range(devices)),
        subscribers=tuple(Cred(f"sub-{i}", key, secret) for i in range(subscribers)),
        stalled=tuple(Cred(f"sub-{subscribers + i}", key, secret) for i in range(stalled)),
        sub_filter=sub_filter, messages=messages, inflight=inflight, timeout=timeout)
    return asyncio.run(run_burst(spec))


@pytest.mark.parametrize("inflight", [100, 1500])
def test_a_prompt_subscriber_gets_every_message_of_a_publisher_with_a_wide_window(
        daemon: RunningBroker, inflight: int) -> None:
    key, secret = fleet(daemon, devices=1)
    result = burst(daemon, key, secret, devices=1, messages=20_000, inflight=inflight,
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
    result = burst(daemon, key, secret, devices=50, messages=600, inflight=20,
                      own_address=True)
    assert result.sent == 30_000, result.as_dict()
    assert result.delivered == [30_000], result.as_dict()
    assert not result.disconnected
    assert daemon.broker.registry.kicks.get("slow_consumer", 0) == 0


async def feed(port: int, me: str, key: str, secret: str, own: str, other: str,
               count: int, size: int, window: int = 1000,
               subscribed: asyncio.Barrier | None = None) -> tuple[int, int]:
    """A client subscribed to ``own`` (QoS 1, acknowledging at once) that publishes
    ``count`` messages to ``other`` with ``window`` in flight, once every client of
    ``subscribed`` has its subscription; (acknowledged, received)."""
    client = Client("127.0.0.1", port)
    await client.connect(me, key, secret)
    await client.subscribe([own], 1)
    if subscribed is not None:
        await subscribed.wait()  # else the first messages may precede the subscription
    ids = iter(range(1 << 30))

    def publish() -> bytes:
        return raw.publish_qos(other, bytes(size), 1, next(ids) % 65535 + 1)

    sent = min(window, count)
    client.write(b"".join(publish() for _ in range(sent)))
    acked = received = 0
    while acked < count or received < count:
        replies = []
        for ptype, _, body in await client.read_frames(timeout=10):
            if ptype == 4:  # PUBACK for one of ours
                acked += 1
                if sent < count:
                    replies.append(publish())
                    sent += 1
            elif ptype == 3:  # theirs (or its own): acknowledge at once
                received += 1
                tlen = int.from_bytes(body[:2], "big")
                replies.append(b"\x40\x02" + body[2 + tlen:4 + tlen])
        if replies:
            client.write(b"".join(replies))
    await client.disconnect()
    return acked, received


@pytest.mark.parametrize("size", [64, 1024])
def test_two_clients_feeding_each_other_do_not_deadlock(daemon: RunningBroker,
                                                        size: int) -> None:
    """Each publishes to the other with 1,000 in flight and acknowledges at once: a paused
    connection still reads the PUBACKs that drain its own session, also when its window
    holds more than max_session_bytes."""
    fleet(daemon, devices=2, subscribers=0)
    key, secret = daemon.ks("create_key", device_ids=["dev-0", "dev-1"])

    async def both() -> list[tuple[int, int]]:
        subscribed = asyncio.Barrier(2)
        peers = (feed(daemon.port(), f"dev-{me}", key.key, secret, f"losant/dev-{me}/cmd",
                      f"losant/dev-{1 - me}/cmd", 5_000, size, subscribed=subscribed)
                 for me in (0, 1))
        return list(await asyncio.wait_for(asyncio.gather(*peers), 60))

    assert asyncio.run(both()) == [(5_000, 5_000), (5_000, 5_000)]
    assert daemon.broker.registry.kicks.get("slow_consumer", 0) == 0
    assert sum(daemon.broker.traffic.dropped.values()) == 0


def test_a_client_publishing_to_itself_with_a_wide_window_loses_nothing(
        daemon: RunningBroker) -> None:
    fleet(daemon, devices=1, subscribers=0)
    key, secret = daemon.ks("create_key", device_ids=["dev-0"])
    topic = "losant/dev-0/echo"
    got = asyncio.run(asyncio.wait_for(
        feed(daemon.port(), "dev-0", key.key, secret, topic, topic, 5_000, 1024), 60))
    assert got == (5_000, 5_000)
    assert daemon.broker.registry.kicks.get("slow_consumer", 0) == 0
    assert sum(daemon.broker.traffic.dropped.values()) == 0


def test_a_stalled_subscriber_holds_the_publisher_only_until_the_timeout(
        daemon: RunningBroker) -> None:
    """One publisher, 1,000 in flight, 100 prompt subscribers and one that never
    acknowledges: the 100 lose nothing, the stalled one is disconnected as a slow
    consumer after slow_consumer_timeout, and the publisher gets every PUBACK (a stalled
    subscriber that held it for good would leave it waiting). The rate after the timeout
    compared with the rate without the stalled subscriber is a figure of scripts/bench
    (the burst workload's "stalled" row)."""
    key, secret = fleet(daemon, devices=1, subscribers=101)
    result = burst(daemon, key, secret, devices=1, messages=2_500, inflight=1000,
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
            message = raw.publish("losant/dev-0/state", b"q" * 2000)
            kicks, counters = daemon.broker.registry.kicks, daemon.broker.flow_counters
            paused_before_the_kick = []

            def flood_until_kicked() -> bool:
                if kicks.get("slow_consumer"):
                    return True
                paused_before_the_kick.append(counters.pauses)
                try:
                    pub.sendall(message * 8)
                except TimeoutError:
                    pass  # paused: the broker reads no more from us for now
                return False

            wait_until(flood_until_kicked, 5 * daemon.settings.slow_consumer_timeout)
        assert daemon.broker.registry.kicks.get("slow_consumer") == 1
        # Not at once: it was past its bounds (its publisher paused) and still connected
        # before it was disconnected. When the timeout fires is pinned in tests/unit/test_flow.
        assert max(paused_before_the_kick) >= 1
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
    caplog.set_level(logging.INFO, logger="broker.mqtt.routing")
    result = burst(daemon, key, secret, devices=1, messages=limit + 250, inflight=50,
                      subscribers=0, topic="losant/dev-0/state")
    assert result.sent == limit + 250
    assert daemon.broker.traffic.dropped["offline_queue_full"] == 250
    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.name == "broker.mqtt.routing" and "sub-0" in r.getMessage()]

    assert len(lines()) == 1 and "offline with its queue full" in lines()[0]
    sock, connack = raw.session(daemon.port(), "sub-0", key, secret, clean=False)
    sock.close()
    wait_until(lambda: len(lines()) == 2)
    assert "250 QoS 1/2 messages were dropped" in lines()[1]


def connect_with_will(client_id: str, key: str, secret: str, topic: str,
                      payload: str) -> bytes:
    flags = 0x02 | 0x04 | 0x80 | 0x40  # clean session, Will at QoS 0, user name, password
    body = (raw.field("MQTT") + bytes([4, flags]) + struct.pack("!H", 0) + raw.field(client_id)
            + raw.field(topic) + raw.field(payload) + raw.field(key) + raw.field(secret))
    return raw.packet(0x10, body)


def stalled_subscriber(daemon: RunningBroker, key: str, secret: str, client_id: str,
                       topic_filter: str) -> socket.socket:
    """Subscribed at QoS 1; it never reads nor acknowledges."""
    sock, _ = raw.session(daemon.port(), client_id, key, secret)
    sock.sendall(raw.subscribe(topic_filter, 1, 1))
    assert raw.read_packet(sock) is not None  # SUBACK
    return sock


def test_a_disconnect_held_by_a_paused_connection_still_discards_the_will(
        daemon: RunningBroker) -> None:
    key, secret = fleet(daemon, devices=1, subscribers=2)
    with HarnessClient(daemon.port(), "sub-0", key, secret) as watcher:
        assert watcher.connect() == 0
        assert watcher.subscribe("losant/dev-0/will") == 0
        stall = stalled_subscriber(daemon, key, secret, "sub-1", "losant/dev-0/state")
        with stall:
            pub = raw.open_socket(daemon.port())
            pub.sendall(connect_with_will("dev-0", key, secret, "losant/dev-0/will", "gone"))
            assert raw.read_packet(pub) is not None  # CONNACK
            # Past max_queued_messages of the stalled one: the rest is held.
            pub.sendall(b"".join(raw.publish_qos("losant/dev-0/state", b"x", 1, n + 1)
                                 for n in range(1200)))
            counters, traffic = daemon.broker.flow_counters, daemon.broker.traffic
            one = len(raw.publish_qos("losant/dev-0/state", b"x", 1, 1)) - 2 + HELD_OVERHEAD
            wait_until(lambda: counters.paused == 1 and counters.held // one >= 150)
            # Every PUBLISH sent is read: handled, or held while the connection waits.
            before = wait_until(lambda: traffic.msgs_in[1] + counters.held // one == 1200
                                and counters.held)
            pub.sendall(b"\xe0\x00")  # DISCONNECT, held behind the PUBLISHes
            wait_until(lambda: counters.held == before + HELD_OVERHEAD)
            # Closed with its PUBACKs unread: a reset, before the connection resumes.
            pub.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            pub.close()
            wait_until(lambda: "dev-0" not in daemon.broker.sessions)
        assert watcher.get(timeout=1) is None  # MQTT-3.14.4-3: no Will after DISCONNECT


def test_what_cannot_wait_is_bounded_by_the_sessions_ceiling(daemon: RunningBroker) -> None:
    """State over the HTTP API has no connection to pause: past four times its bounds, a
    live session is not given more of it (dropped and counted)."""
    key, secret = fleet(daemon, devices=1, subscribers=1)
    stall = stalled_subscriber(daemon, key, secret, "sub-0", "losant/dev-0/state")
    with stall:
        url = daemon.api_url()
        token = requests.post(url + "/auth/device", timeout=5, json={
            "deviceId": "dev-0", "key": key, "secret": secret}).json()["token"]
        app = daemon.ks("app").id
        for _ in range(5):
            reply = requests.post(f"{url}/applications/{app}/devices/dev-0/state", timeout=10,
                                  json=[{"data": {"n": 1}}] * 1000,
                                  headers={"Authorization": f"Bearer {token}"})
            assert reply.status_code == 200
        session = daemon.broker.sessions["sub-0"]
        assert len(session.outbox) == 4 * daemon.settings.max_queued_messages
        assert daemon.broker.traffic.dropped["live_queue_full"] == 1000


def test_a_slow_consumer_gone_offline_keeps_its_queue_within_its_bounds(
        daemon: RunningBroker) -> None:
    """Live, a session may pass its bounds (its publishers wait); offline it queues
    within them like any offline session: what it held past them is dropped, counted."""
    key, secret = fleet(daemon, devices=30, subscribers=1)
    sock, _ = raw.session(daemon.port(), "sub-0", key, secret, clean=False)
    sock.sendall(raw.subscribe("losant/+/state", 1, 1))
    publishers = []
    with sock:
        for i in range(30):  # each QoS 1, until paused; the subscriber never acknowledges
            pub, _ = raw.session(daemon.port(), f"dev-{i}", key, secret)
            pub.sendall(b"".join(raw.publish_qos(f"losant/dev-{i}/state", bytes(4000), 1,
                                                 n + 1) for n in range(200)))
            publishers.append(pub)
        wait_until(lambda: daemon.broker.registry.kicks.get("slow_consumer") == 1, 20)
        session = daemon.broker.sessions["sub-0"]
        wait_until(lambda: not session.online)
        assert session.outbox.held_bytes <= daemon.settings.max_session_bytes
        assert len(session.outbox) <= daemon.settings.max_queued_messages
        assert daemon.broker.traffic.dropped["offline_queue_full"] > 0
    for pub in publishers:
        pub.close()


def test_held_publishes_count_against_the_rate_when_they_are_sent(
        daemon_with: StartDaemon) -> None:
    """A publisher within max_publish_rate whose PUBLISHes were held while it was paused
    is not taken for a fast one when they are handled all at once."""
    daemon = daemon_with(max_publish_rate=50.0, max_queued_messages=20,
                         max_inflight_messages=10)
    key, secret = fleet(daemon, devices=1, subscribers=1)
    sub = stalled_subscriber(daemon, key, secret, "sub-0", "losant/dev-0/state")
    pub, _ = raw.session(daemon.port(), "dev-0", key, secret)
    with sub, pub:
        for n in range(60):  # 20 a second for 3 s: paused after 20
            pub.sendall(raw.publish_qos("losant/dev-0/state", b"x", 1, n + 1))
            time.sleep(0.05)  # time under test: the pace, within the rate
        assert daemon.broker.flow_counters.paused == 1
        while (packet := raw.read_packet(sub, 1.0)) is not None:  # catches up
            if packet.kind == 3:
                sub.sendall(raw.ack(4, packet.packet_id))
    assert not [e for e in daemon.audit_events() if e["event"] == "publish_denied"]
    assert daemon.broker.traffic.msgs_in[1] == 60


def test_a_paused_connection_counts_what_it_holds_with_its_overhead(
        daemon: RunningBroker) -> None:
    """Tiny PUBLISHes cost more than their bytes: a paused connection stops reading once
    what it holds, overhead included, reaches max_session_bytes."""
    key, secret = fleet(daemon, devices=1, subscribers=1)
    stall = stalled_subscriber(daemon, key, secret, "sub-0", "losant/dev-0/state")
    pub, _ = raw.session(daemon.port(), "dev-0", key, secret)
    with stall, pub:
        pub.setblocking(False)
        one = raw.publish_qos("losant/dev-0/state", b"", 1, 1)
        for _ in range(400):  # QoS 1, 22 bytes each, as fast as the socket takes them
            with contextlib.suppress(BlockingIOError):
                pub.send(one * 100)
        limit = daemon.settings.max_session_bytes
        wait_until(lambda: daemon.broker.flow_counters.held >= limit)
        assert daemon.broker.flow_counters.held < limit + 200
