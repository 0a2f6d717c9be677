"""A connection's sending side whose buffer the test controls (no sockets)."""

from __future__ import annotations

import asyncio

from broker.mqtt.link import Link


class FakeLink(Link):
    """``held``: the bytes the client has not taken yet; set it to play the client
    reading. ``checks`` counts the times a ``writable`` waiter looked at the buffer, so a
    test can wait until a waiter has seen a change (and stayed, or gone on)."""

    __slots__ = ("_held", "written", "closing", "checks", "_changed")

    def __init__(self, held: int) -> None:
        self._held = held
        self.written: list[bytes] = []
        self.closing = False
        self.checks = 0
        self._changed = asyncio.Event()

    @property
    def held(self) -> int:
        return self._held

    @held.setter
    def held(self, value: int) -> None:
        self._held = value
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self.held += len(data)

    def buffered(self) -> int:
        return self._held

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True
        self._wake()

    async def close(self) -> None:
        self.abort()

    async def writable(self, limit: int = 65536) -> None:
        while True:
            self.checks += 1
            if self.closing or self._held <= limit:
                return
            await self._changed.wait()

    def peer(self) -> tuple[str, int] | None:
        return ("127.0.0.1", 1)
