"""Bounds on the HTTP listener's connections, like MQTT's (docs/limits.md): at most
``max_connections`` open, at most ``max_per_source`` from one TCP peer (an IPv4 address
or IPv6 /64), and none may sit without a request in progress for longer than
``request_timeout`` (before its first request, or after its last response). aiohttp
itself bounds none of these: without them one client could hold every file descriptor
the daemon has, and MQTT with it.

``ConnectionGuard.factory`` wraps aiohttp's protocol factory; a middleware tells the guard
when a request starts and ends (``busy``); ``sweep`` aborts what has been idle too long.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from broker.periodic import Periodic
from broker.policy.addresses import normalize_ip, source_of


class _Connection:
    __slots__ = ("source", "since", "busy")

    def __init__(self, source: str) -> None:
        self.source = source
        self.since = time.monotonic()  # opened, or its last request ended
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
        self._per_source: dict[str, int] = {}
        self.refused = 0  # connections closed at once by a cap (metrics)
        self.timed_out = 0  # connections closed for sitting idle

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Guarded(self, inner())

    def admit(self, transport: Any) -> bool:
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if peer else ""
        source = source_of(normalize_ip(address) or address)
        if (self.max_connections and len(self.open) >= self.max_connections) or \
                (self.max_per_source and
                 self._per_source.get(source, 0) >= self.max_per_source):
            self.refused += 1
            return False
        self.open[transport] = _Connection(source)
        self._per_source[source] = self._per_source.get(source, 0) + 1
        return True

    def release(self, transport: Any) -> None:
        state = self.open.pop(transport, None)
        if state is None:
            return
        left = self._per_source.get(state.source, 0) - 1
        if left > 0:
            self._per_source[state.source] = left
        else:
            self._per_source.pop(state.source, None)

    def started(self, transport: Any) -> None:
        state = self.open.get(transport)
        if state is not None:
            state.busy += 1

    def ended(self, transport: Any) -> None:
        state = self.open.get(transport)
        if state is not None:
            state.busy -= 1
            state.since = time.monotonic()

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

    def connection_made(self, transport: Any) -> None:
        if not self.guard.admit(transport):
            transport.abort()
            return
        self.transport = transport
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.guard.release(self.transport)
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()
