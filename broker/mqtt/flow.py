"""Flow control: publishers wait for the sessions they feed instead of those sessions being
disconnected (RabbitMQ's credit flow, docs/limits.md#backpressure).

A live session is *congested* once it holds more than its bounds: ``max_queued_messages``
QoS 1/2 messages (in flight and waiting), or ``max_session_bytes`` (those messages' bytes
plus what waits in its connection's send buffer). A connection whose PUBLISH was just
delivered to a congested session is *paused*: it stops handling the PUBLISHes it reads
(acknowledgements and PINGREQ still go through, so two clients feeding each other cannot
deadlock) until every session it waits for has drained to half its bounds; its own
PUBACKs wait with it and TCP slows the client down. A session past its bounds therefore
holds at most one message more per connection that feeds it.

Slow means not draining: a session that stays congested and drains nothing (no
acknowledgement, no byte taken from its socket) for ``slow_consumer_timeout`` seconds is
a slow consumer and is disconnected (``on_slow``, given its client id); a persistent one
keeps its queue within its bounds, as any offline session. Only live sessions push back:
messages for an offline session are queued within its bounds and dropped (counted) past
them.

Everything here is synchronous and costs nothing for a session that is not congested: a
congested session carries a ``Congestion``; a watcher task exists only while bytes in
its send buffer (not acknowledgements) are what it waits for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from broker.core.counters import FlowCounters
from broker.core.periodic import Periodic, spawn
from broker.core.settings import Settings
from broker.mqtt.link import Link
from broker.mqtt.outbox import Outbox

logger = logging.getLogger(__name__)

# Times its bounds a live session may hold before messages that cannot wait are dropped.
CEILING = 4


class Publisher(Protocol):
    """The side that is paused: a connection whose PUBLISHes feed congested sessions."""

    @property
    def pausable(self) -> bool:
        """False while it may not be paused (what it delivers is bounded by the
        sessions' ceiling instead)."""

    def pause(self) -> None:
        """One more congested session to wait for."""

    def resume(self) -> None:
        """One fewer; the connection carries on once it waits for none."""


class AliasTable(Protocol):
    """An MQTT 5 client's topic aliases (broker.mqtt.session.ClientLimits)."""

    @property
    def alias_bytes(self) -> int: ...


class KeySession(Protocol):
    """A session as flow control sees it (broker.mqtt.session.KeySession)."""

    client_id: str
    outbox: Outbox
    link: Link | None
    congestion: Congestion | None

    @property
    def limits(self) -> AliasTable | None: ...


class Congestion:
    """A session past its bounds: since when, its last progress, who waits for it."""

    __slots__ = ("since", "last_progress", "buffered", "waiters", "watching", "qos0_dropped",
                 "live_dropped")

    def __init__(self, now: float, buffered: int) -> None:
        self.since = now
        self.last_progress = now  # an acknowledgement, or bytes taken from its socket
        self.buffered = buffered  # its send buffer at the last look
        self.waiters: set[Publisher] = set()
        self.watching = False  # a task waits for its send buffer to drain
        self.qos0_dropped = 0  # QoS 0 messages dropped in this episode (logged at its end)
        self.live_dropped = 0  # QoS 1/2 dropped past the ceiling in this episode


class FlowControl:
    def __init__(self, settings: Settings, counters: FlowCounters,
                 on_slow: Callable[[str], None]) -> None:
        self.max_messages = settings.max_queued_messages
        self.max_bytes = settings.max_session_bytes
        self.timeout = settings.slow_consumer_timeout
        self.counters = counters
        self.on_slow = on_slow
        self.congested: set[KeySession] = set()

    def held_bytes(self, session: KeySession) -> int:
        """Its queued and in-flight messages, what waits in its connection, and its MQTT 5
        topic aliases (at most a quarter of max_session_bytes: connection.py)."""
        link = session.link
        limits = session.limits
        return (session.outbox.held_bytes + (link.buffered() if link is not None else 0)
                + (limits.alias_bytes if limits is not None else 0))

    def past_bounds(self, session: KeySession, held: int | None = None) -> bool:
        """``held``: what ``held_bytes`` says, when the caller has it already."""
        return (len(session.outbox) >= self.max_messages
                or (self.held_bytes(session) if held is None else held) >= self.max_bytes)

    def delivered(self, session: KeySession, source: Publisher | None,
                  held: int | None = None) -> None:
        """A message was just handed to a live session by ``source`` (None: the HTTP API,
        a Will, retained sending): past its bounds, the session is congested and
        ``source`` waits for it. ``held``: as for ``past_bounds``."""
        congestion = session.congestion
        if congestion is None:
            if not self.past_bounds(session, held):
                return
            loop_time = asyncio.get_running_loop().time()
            link = session.link
            buffered = link.buffered() if link is not None else 0
            congestion = session.congestion = Congestion(loop_time, buffered)
            self.congested.add(session)
            self._watch_buffer(session, congestion)
        if source is not None and source.pausable and source not in congestion.waiters:
            congestion.waiters.add(source)
            source.pause()

    def past_ceiling(self, session: KeySession) -> bool:
        """Holding CEILING times its bounds: what cannot be paused for it (state over the
        HTTP API, a Will, a connection breaking a cycle of waits) is dropped past this."""
        return (len(session.outbox) >= CEILING * self.max_messages
                or self.held_bytes(session) >= CEILING * self.max_bytes)

    def live_dropped(self, session: KeySession) -> None:
        congestion = session.congestion
        if congestion is not None:
            congestion.live_dropped += 1

    def acknowledged(self, session: KeySession) -> None:
        """An acknowledgement from a congested session: progress, and its publishers go
        on once it has drained to half its bounds."""
        congestion = session.congestion
        if congestion is None:
            return
        congestion.last_progress = asyncio.get_running_loop().time()
        self._drained(session, congestion)

    def _drained(self, session: KeySession, congestion: Congestion) -> None:
        if len(session.outbox) > self.max_messages // 2:
            return  # acknowledgements will come (or the session is slow)
        if self.held_bytes(session) > self.max_bytes // 2:
            self._watch_buffer(session, congestion)
            return
        self.release(session)

    def _watch_buffer(self, session: KeySession, congestion: Congestion) -> None:
        if not congestion.watching and session.link is not None:
            congestion.watching = True
            spawn(self._buffer_watcher(session, congestion))

    async def _buffer_watcher(self, session: KeySession, congestion: Congestion) -> None:
        """While the session's send buffer is what keeps it past half its bytes, wait
        for the client to take bytes from it (QoS 0 publishers go on promptly)."""
        loop = asyncio.get_running_loop()
        try:
            while session.congestion is congestion:
                link = session.link
                if link is None or link.is_closing():
                    return
                # all it holds but its send buffer (queued messages, topic aliases)
                target = self.max_bytes // 2 - (self.held_bytes(session) - link.buffered())
                if target < 0 or link.buffered() <= target:
                    return  # acknowledgements, not the socket, are what it waits for
                await link.writable(target)
                if session.congestion is not congestion or session.link is not link:
                    return
                congestion.last_progress = loop.time()
                congestion.buffered = link.buffered()
                if len(session.outbox) <= self.max_messages // 2 and \
                        self.held_bytes(session) <= self.max_bytes // 2:
                    self.release(session)
        finally:
            congestion.watching = False

    def release(self, session: KeySession) -> None:
        """The session is no longer congested (drained, offline, kicked or forgotten):
        every publisher waiting for it is one wait lighter."""
        congestion = session.congestion
        if congestion is None:
            return
        session.congestion = None
        self.congested.discard(session)
        if congestion.qos0_dropped:
            logger.info("client %s: %d QoS 0 messages dropped while it was past its bounds",
                        session.client_id, congestion.qos0_dropped)
        if congestion.live_dropped:
            logger.warning("client %s: %d QoS 1/2 messages that could not wait (HTTP API, "
                           "Will, a cycle of publishers) dropped past %d times its bounds",
                           session.client_id, congestion.live_dropped, CEILING)
        for publisher in congestion.waiters:
            publisher.resume()

    def qos0_dropped(self, session: KeySession) -> None:
        congestion = session.congestion
        if congestion is not None:
            congestion.qos0_dropped += 1

    def sweep(self, now: float) -> list[KeySession]:
        """Sessions congested with no progress for ``slow_consumer_timeout`` seconds:
        released and reported to ``on_slow``. Bytes taken from the send buffer since the
        last sweep count as progress."""
        slow = []
        for session in list(self.congested):
            congestion = session.congestion
            if congestion is None or session.link is None:
                self.release(session)
                continue
            buffered = session.link.buffered()
            if buffered < congestion.buffered:
                congestion.last_progress = now
            congestion.buffered = buffered
            if now - congestion.last_progress >= self.timeout:
                slow.append(session)
        for session in slow:
            congestion = session.congestion
            assert congestion is not None
            logger.warning(
                "client %s: slow consumer disconnected: %d messages, %d bytes held, nothing "
                "drained for %.1fs (%d publishers were waiting)", session.client_id,
                len(session.outbox), self.held_bytes(session), now - congestion.last_progress,
                len(congestion.waiters))
            self.release(session)
            self.counters.slow_consumers += 1
            self.on_slow(session.client_id)
        return slow


class SlowConsumerSweep(Periodic):
    """Looks for slow consumers a few times per ``slow_consumer_timeout``."""

    name = "keybroker-slow-consumers"

    def __init__(self, flow: FlowControl) -> None:
        super().__init__(min(1.0, max(0.05, flow.timeout / 4)))
        self.flow = flow

    async def tick(self) -> None:
        if self.flow.congested:
            self.flow.sweep(asyncio.get_running_loop().time())
