"""A connection's sending side whose buffer the test controls (no sockets)."""

from __future__ import annotations

import asyncio

from broker.mqtt.link import Link


class FakeLink(Link):
    __slots__ = ("held", "written", "closing")

    def __init__(self, held: int) -> None:
        self.held = held
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self.held += len(data)

    def buffered(self) -> int:
        return self.held

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    async def close(self) -> None:
        self.closing = True

    async def writable(self, limit: int = 65536) -> None:
        while not self.closing and self.held > limit:
            await asyncio.sleep(0.001)

    def peer(self) -> tuple[str, int] | None:
        return ("127.0.0.1", 1)
