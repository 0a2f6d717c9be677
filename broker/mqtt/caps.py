"""Per-source caps on MQTT connections (docs/limits.md#per-source-caps).

Devices behind one NAT, a carrier's CGNAT or a site gateway share their source (an IPv4
address or an IPv6 /64) with whoever else is there. A cap that refuses a source's newest
connection lets a neighbour's silent sockets lock every device out, and refuses a site's
devices reconnecting all at once. So here a connection that sends its CONNECT promptly is
never closed because of the others' state; connections that sit without sending one are:

* ``max_unauthenticated_per_source`` bounds the connections whose CONNECT packet has not
  been read whole ("pending"). It is enforced lazily: the accept that takes a source over
  it starts one timer for that source, and when it fires, the source's pending
  connections idle longest are closed until the source is back at the cap. A pending
  connection idle for less than ``EVICTION_GRACE`` is not closed this way (a burst of
  devices is accepted before any of their CONNECTs is read): if the source is still over
  the cap because of such young ones, the timer starts again.
* ``max_connections_per_source`` is the hard bound that holds meanwhile: a new connection
  of a source at it closes that source's pending connection idle longest, and is itself
  refused only when none of the source's connections is pending.

Idle means: since the last byte the connection's reader saw, i.e. its accept, or the
first byte of a CONNECT still arriving. Closing the chosen connection is the caller's
(``evict``); this class keeps the counts, picks the connection and runs the timers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from broker.mqtt.connection import MqttConnection

# Seconds a pending connection is safe from the cap on pending connections: a CONNECT sent
# right behind the TCP (or TLS) handshake has been read long before.
EVICTION_GRACE = 0.1

EVICTED_PENDING = "evicted_unauthenticated"  # over max_unauthenticated_per_source
EVICTED_PER_SOURCE = "evicted_per_source"  # to admit a connection at max_connections_per_source


def idle_since(connection: MqttConnection) -> float:
    """Loop time of the last byte seen from a connection whose CONNECT is not read yet."""
    framer = connection.framer
    assert framer is not None
    return framer.packet_started if framer.packet_started is not None else framer.last_packet


class SourceCaps:
    def __init__(self, max_per_source: int, max_pending: int,
                 evict: Callable[[MqttConnection, str], None]) -> None:
        self.max_per_source = max_per_source  # 0 = no limit
        self.max_pending = max_pending  # 0 = no limit
        self._evict = evict  # closes the connection (it is no longer counted here)
        self._open: dict[str, int] = {}  # source -> open connections
        # source -> its pending connections, in the order they were opened
        self._pending: dict[str, dict[MqttConnection, None]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}  # sources over max_pending

    def make_room(self, source: str) -> bool:
        """Whether a new connection of ``source`` may open, after closing the source's
        pending connection idle longest if the source is at max_per_source."""
        if not self.max_per_source or self._open.get(source, 0) < self.max_per_source:
            return True
        pending = self._pending.get(source)
        if not pending:
            return False
        self._drop(source, min(pending, key=idle_since), EVICTED_PER_SOURCE)
        return True

    def opened(self, source: str, connection: MqttConnection) -> None:
        self._open[source] = self._open.get(source, 0) + 1
        pending = self._pending.setdefault(source, {})
        pending[connection] = None
        if self.max_pending and len(pending) > self.max_pending and source not in self._timers:
            self._schedule(source)

    def connect_read(self, source: str, connection: MqttConnection) -> None:
        """The connection's CONNECT is read whole: no longer pending (being authenticated,
        then a session)."""
        pending = self._pending.get(source)
        if pending is None or connection not in pending:
            return
        del pending[connection]
        if not pending:
            del self._pending[source]

    def closed(self, source: str, connection: MqttConnection) -> None:
        self.connect_read(source, connection)
        left = self._open.get(source, 0) - 1
        if left > 0:
            self._open[source] = left
        else:
            self._open.pop(source, None)

    def pending(self, source: str) -> int:
        return len(self._pending.get(source, ()))

    def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _schedule(self, source: str) -> None:
        loop = asyncio.get_running_loop()
        # The check runs one loop iteration after the timer: CONNECTs whose bytes arrived
        # in the iteration the timer fired in are read first.
        self._timers[source] = loop.call_later(EVICTION_GRACE, loop.call_soon,
                                               self._enforce, source)

    def _enforce(self, source: str) -> None:
        """Close the source's pending connections idle longest, down to max_pending."""
        self._timers.pop(source, None)
        pending = self._pending.get(source)
        excess = len(pending) - self.max_pending if pending else 0
        if excess <= 0:
            return
        assert pending is not None
        old_enough = asyncio.get_running_loop().time() - EVICTION_GRACE
        idle = sorted((since, order, connection)
                      for order, connection in enumerate(pending)
                      if (since := idle_since(connection)) <= old_enough)
        for _, _, connection in idle[:excess]:
            self._drop(source, connection, EVICTED_PENDING)
        if len(idle) < excess:  # the rest are young: looked at again later
            self._schedule(source)

    def _drop(self, source: str, connection: MqttConnection, reason: str) -> None:
        self.closed(source, connection)
        self._evict(connection, reason)
