"""Bounds on the HTTP listener's connections, like MQTT's (docs/limits.md): at most
``max_connections`` open, at most ``max_per_source`` from one TCP peer (an IPv4 address
or IPv6 /64), and none may sit without a request in progress for longer than
``request_timeout`` (before its first request, or after its last response). aiohttp
itself bounds none of these: without them one client could hold every file descriptor
the daemon has, and MQTT with it.

A peer at ``max_per_source`` does not lock itself out with idle keep-alive connections (a
browser, a client library's pool, or anyone else behind the same address): its connection
idle longest, without a request in progress, is closed to admit the new one, which is
refused only when every connection of the peer is busy with a request.

``ConnectionGuard.factory`` wraps aiohttp's protocol factory; a middleware tells the guard
when a request starts and ends (``busy``); ``sweep`` aborts what has been idle too long.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from broker.core.periodic import Periodic
from broker.policy.addresses import normalize_ip, source_of


class _Connection:
    __slots__ = ("source", "since", "heard", "busy")

    def __init__(self, source: str) -> None:
        self.source = source
        self.since = time.monotonic()  # opened, or its last request ended
        # ... or bytes arrived since (a request on its way): who is idle longest
        self.heard = self.since
        self.busy = 0  # requests being handled


class ConnectionGuard(Periodic):
    name = "keybroker-api-connections"

    def __init__(self, max_connections: int, max_per_source: int, request_timeout: float
                 ) -> None:
        super().__init__(min(1.0, request_timeout / 2))
        self.max_connections = max_connections
        self.max_per_source = max_per_source
        self.request_timeout = request_timeout
        self.open: dict[Any, _Connection] = {}  # transport -> its state
        self._by_source: dict[str, dict[Any, _Connection]] = {}  # the same, per source
        self.refused = 0  # connections closed at once by a cap (metrics)
        self.evicted = 0  # idle connections closed to admit another of their source
        self.timed_out = 0  # connections closed for sitting idle

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Guarded(self, inner())

    def admit(self, transport: Any) -> _Connection | None:
        """The new connection's state, or None when it is to be closed at once. A source
        at max_per_source has its connection idle longest closed to make room."""
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if peer else ""
        source = source_of(normalize_ip(address) or address)
        mine = self._by_source.get(source, {})
        if self.max_connections and len(self.open) >= self.max_connections:
            self.refused += 1
            return None
        if self.max_per_source and len(mine) >= self.max_per_source:
            idle = [other for other, state in mine.items() if not state.busy]
            if not idle:
                self.refused += 1
                return None
            idlest = min(idle, key=lambda other: mine[other].heard)
            self.release(idlest)
            idlest.abort()
            self.evicted += 1
        state = _Connection(source)
        self.open[transport] = state
        self._by_source.setdefault(source, mine)[transport] = state
        return state

    def release(self, transport: Any) -> None:
        state = self.open.pop(transport, None)
        if state is None:
            return
        mine = self._by_source[state.source]
        del mine[transport]
        if not mine:
            del self._by_source[state.source]

    def started(self, transport: Any) -> None:
        state = self.open.get(transport)
        if state is not None:
            state.busy += 1

    def ended(self, transport: Any) -> None:
        state = self.open.get(transport)
        if state is not None:
            state.busy -= 1
            state.since = state.heard = time.monotonic()

    async def tick(self) -> None:
        self.sweep(time.monotonic())

    def sweep(self, now: float) -> int:
        """Abort connections without a request in progress for request_timeout."""
        doomed = [t for t, state in self.open.items()
                  if not state.busy and now - state.since > self.request_timeout]
        for transport in doomed:
            transport.abort()
        self.timed_out += len(doomed)
        return len(doomed)

    def abort_all(self) -> None:
        for transport in list(self.open):
            transport.abort()


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol behind the guard: refused connections never reach it."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: Any = None
        self.state: _Connection | None = None  # set when admitted

    def connection_made(self, transport: Any) -> None:
        self.state = self.guard.admit(transport)
        if self.state is None:
            transport.abort()
            return
        self.transport = transport
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.guard.release(self.transport)
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        assert self.state is not None
        self.state.heard = time.monotonic()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()
