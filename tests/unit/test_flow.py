"""Flow control (broker.mqtt.flow) with links whose buffers the test controls: who is paused,
when they go on, what is dropped, and when a session is a slow consumer."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import pytest

from broker.core.audit import AuditLog
from broker.core.counters import FlowCounters
from broker.core.settings import Settings
from broker.mqtt.flow import FlowControl
from broker.mqtt.outbox import OutMessage
from broker.mqtt.routing import Router
from broker.mqtt.session import ClientLimits, ConnectionInfo, KeySession
from tests.support.links import FakeLink
from tests.support.waiting import async_wait_until

SETTINGS = replace(Settings(), max_queued_messages=10, max_inflight_messages=4,
                   max_session_bytes=10_000, slow_consumer_timeout=5.0)
INFO = ConnectionInfo("tcp", "127.0.0.1", "127.0.0.1")


class Source:
    """A publishing connection as flow control sees it."""

    def __init__(self) -> None:
        self.waits = 0
        self.pausable = True

    def pause(self) -> None:
        self.waits += 1

    def resume(self) -> None:
        self.waits -= 1


class Setup:
    def __init__(self, settings: Settings = SETTINGS) -> None:
        self.slow: list[str] = []
        self.counters = FlowCounters()
        self.flow = FlowControl(settings, self.counters, self.slow.append)
        self.router = Router(settings, {}, AuditLog(None), self.flow)

    def session(self, client_id: str, held: int = 0) -> tuple[KeySession, FakeLink]:
        session = KeySession(client_id, True, INFO)
        link = FakeLink(held)
        session.link = link
        self.router.sessions[client_id] = session
        return session, link

    def send(self, session: KeySession, source: Source | None, n: int = 1,
             size: int = 10) -> None:
        for _ in range(n):
            self.router.enqueue(session, OutMessage("t", b"x" * size, 1), source)

    def ack_all(self, session: KeySession, link: FakeLink) -> None:
        """The client acknowledges what it has been sent so far (it reads it too)."""
        for packet_id in list(session.outbox.inflight):
            self.router.puback(session, packet_id)
        link.held = 0


async def test_a_publisher_waits_for_a_session_past_its_count_and_goes_on_at_half() -> None:
    setup = Setup()
    session, link = setup.session("sub")
    source = Source()
    setup.send(session, source, 9)
    assert source.waits == 0 and session.congestion is None
    setup.send(session, source)  # the 10th: at the bound
    assert source.waits == 1 and session.congestion is not None
    setup.send(session, source, 3)  # what it read before noticing: kept, not dropped
    assert len(session.outbox) == 13 and source.waits == 1  # one wait per session
    while len(session.outbox) > 5:
        assert source.waits == 1
        setup.ack_all(session, link)
    assert source.waits == 0 and session.congestion is None
    assert not setup.slow and sum(setup.router.traffic.dropped.values()) == 0


async def test_a_publisher_feeding_two_congested_sessions_waits_for_both() -> None:
    setup = Setup()
    (one, link_one), (two, link_two) = setup.session("one"), setup.session("two")
    source = Source()
    setup.send(one, source, 10)
    setup.send(two, source, 10)
    assert source.waits == 2
    while one.congestion is not None:
        setup.ack_all(one, link_one)
    assert source.waits == 1
    while two.congestion is not None:
        setup.ack_all(two, link_two)
    assert source.waits == 0


async def test_bytes_waiting_in_the_socket_pause_publishers_until_the_client_reads() -> None:
    setup = Setup()
    session, link = setup.session("sub", held=12_000)  # a burst of QoS 0 it has not read
    source = Source()
    setup.router.send_qos0(session, link, b"q" * 100, source)
    assert source.waits == 1 and len(link.written) == 1  # written, and the publisher waits
    checks = link.checks
    link.held = 6_000  # the client takes some: still above half the bound
    await async_wait_until(lambda: link.checks > checks)  # the watcher saw it
    assert source.waits == 1
    link.held = 4_000
    await async_wait_until(lambda: source.waits == 0)
    assert session.congestion is None


async def test_qos0_past_twice_the_byte_bound_is_dropped_counted_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="broker.mqtt.flow")
    setup = Setup()
    session, link = setup.session("sub", held=19_950)
    for _ in range(5):
        setup.router.send_qos0(session, link, b"q" * 100, None)
    assert len(link.written) == 0
    assert setup.router.traffic.dropped["qos0_past_bounds"] == 5
    setup.flow.release(session)
    lines = [r.getMessage() for r in caplog.records if r.name == "broker.mqtt.flow"]
    assert lines == ["client sub: 5 QoS 0 messages dropped while it was past its bounds"]


async def test_a_session_draining_nothing_is_a_slow_consumer_after_the_timeout() -> None:
    setup = Setup()
    session, _ = setup.session("stalled")
    source = Source()
    setup.send(session, source, 12)
    congestion = session.congestion
    assert congestion is not None
    start = congestion.since
    assert setup.flow.sweep(start + 4.9) == [] and source.waits == 1
    assert setup.flow.sweep(start + 5.01) == [session]
    assert setup.slow == ["stalled"] and setup.counters.slow_consumers == 1
    assert source.waits == 0  # its publisher goes on
    assert session.congestion is None


async def test_acknowledgements_or_bytes_taken_from_its_socket_are_progress() -> None:
    setup = Setup()
    session, link = setup.session("steady", held=30_000)
    source = Source()
    setup.send(session, source, 12)
    congestion = session.congestion
    assert congestion is not None
    start = congestion.since
    link.held = 29_000  # the client reads, slowly
    assert setup.flow.sweep(start + 4.0) == []
    assert setup.flow.sweep(start + 8.0) == []  # progress at +4: not slow at +8
    packet_id = next(iter(session.outbox.inflight))
    setup.router.puback(session, packet_id)  # progress now
    assert setup.flow.sweep(asyncio.get_running_loop().time() + 4.0) == []
    assert setup.flow.sweep(asyncio.get_running_loop().time() + 5.5) == [session]


async def test_an_offline_session_never_pauses_anyone_and_drops_past_its_bounds() -> None:
    setup = Setup()
    session, _ = setup.session("away")
    session.link = None
    source = Source()
    setup.send(session, source, 15)
    assert source.waits == 0 and session.congestion is None
    assert len(session.outbox) == 10
    assert setup.router.traffic.dropped["offline_queue_full"] == 5


async def test_a_session_that_goes_offline_or_is_forgotten_releases_its_publishers() -> None:
    setup = Setup()
    session, _ = setup.session("leaving")
    source = Source()
    setup.send(session, source, 10)
    assert source.waits == 1
    setup.router.forget(session)
    assert source.waits == 0
    assert not setup.flow.congested


async def test_a_repeated_pubrec_drains_nothing_and_is_not_progress() -> None:
    setup = Setup()
    session, link = setup.session("stalled")
    source = Source()
    for _ in range(10):
        setup.router.enqueue(session, OutMessage("t", b"x" * 10, 2), source)
    congestion = session.congestion
    assert congestion is not None and source.waits == 1
    first = next(iter(session.outbox.inflight))
    setup.router.pubrec(session, first)  # the first PUBREC lets the payload go: progress
    progressed = congestion.last_progress
    assert progressed > congestion.since
    for _ in range(5):
        setup.router.pubrec(session, first)  # the same again: nothing drains
    assert congestion.last_progress == progressed
    assert setup.flow.sweep(progressed + 5.01) == [session]


async def test_an_mqtt5_clients_topic_aliases_count_in_its_session_bytes() -> None:
    setup = Setup()
    session, _ = setup.session("sub")
    session.limits = ClientLimits(100, 0, True)
    source = Source()
    setup.send(session, source, 2, size=1_000)
    held = setup.flow.held_bytes(session)
    assert source.waits == 0 and held < 10_000
    session.limits.alias_bytes = 10_000 - held  # its aliases fill the rest of its bytes
    assert setup.flow.held_bytes(session) == 10_000
    setup.send(session, source, 1)  # one small message more: past the bound
    assert source.waits == 1 and session.congestion is not None


async def test_topic_aliases_count_for_qos0_deliveries_too() -> None:
    setup = Setup()
    session, link = setup.session("sub")
    session.limits = ClientLimits(100, 0, True)
    source = Source()
    setup.router.send_qos0(session, link, b"x" * 100, source)
    assert source.waits == 0
    session.limits.alias_bytes = 10_000 - setup.flow.held_bytes(session)  # full with them
    setup.router.send_qos0(session, link, b"x" * 100, source)
    assert source.waits == 1 and session.congestion is not None
