"""The sending side of one client connection, the same for TCP/TLS and WebSocket.

Routing writes packets synchronously (no await between a PUBLISH arriving and the
subscribers' packets being handed to their connections), so every link offers a
synchronous ``write`` and reports how many bytes it holds that the peer has not taken
yet (``buffered``): that is what the per-session byte budget bounds, on every transport.

* ``TransportLink``: an asyncio transport (TCP, TLS): ``write`` collects, and one
  ``transport.write`` per pass of the event loop sends.
* ``WebSocketLink``: packets are collected and sent by one short-lived task per burst
  (started on demand, so an idle connection has none), coalesced into one binary frame
  (MQTT over WebSocket may split or join packets across frames). Bytes waiting there
  count as buffered, so a WebSocket client that never reads hits the same bound as a
  TCP one (amqtt buffered without limit).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import websockets
from websockets.asyncio.server import ServerConnection

from broker.core.periodic import spawn

logger = logging.getLogger(__name__)

# Wait for the peer when more than this many bytes are waiting (paced senders only).
LOW_WATER = 64 * 1024
# A closing connection whose peer takes nothing more is aborted after this many seconds.
CLOSE_GRACE = 2.0


class Link:
    """Interface of a connection's sending side."""

    __slots__ = ()

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def buffered(self) -> int:
        raise NotImplementedError

    def flush(self) -> None:
        """Send what was written so far now, not at the end of the loop's pass."""

    def is_closing(self) -> bool:
        raise NotImplementedError

    def abort(self) -> None:
        """Drop the connection now, discarding whatever is still buffered."""
        raise NotImplementedError

    async def close(self) -> None:
        """Close after sending what is buffered (aborting if the peer takes nothing)."""
        raise NotImplementedError

    def shut(self) -> None:
        """``close`` without waiting for it."""
        spawn(self.close())

    def end(self, packet: bytes) -> None:
        """Write a last packet (an MQTT 5 DISCONNECT saying why) and close: nothing more
        is read, what is buffered goes out, and a peer that takes nothing is aborted
        after CLOSE_GRACE."""
        self.write(packet)
        self.shut()

    def writing_paused(self) -> None:
        """The transport holds more than its high-water mark (Protocol.pause_writing)."""

    def writing_resumed(self) -> None:
        """It has drained below its low-water mark (or is gone)."""

    async def writable(self, limit: int = LOW_WATER) -> None:
        """Return once at most ``limit`` bytes are waiting (or the link is closing)."""
        raise NotImplementedError

    def peer(self) -> tuple[str, int] | None:
        raise NotImplementedError


class TransportLink(Link):
    """An asyncio transport's sending side. Packets written in one pass of the event loop
    leave together: ``write`` collects them and one ``transport.write`` (one send) at the
    end of the pass takes them all, instead of a system call per packet (a busy
    subscriber gets hundreds a pass). The connection (the transport's protocol) reports
    when the transport's buffer passes its high-water mark and drains again."""

    __slots__ = ("transport", "_batch", "_batch_bytes", "_write_paused", "_drained")

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport: Any = transport
        self._batch: list[bytes] | None = None  # written in this pass, not yet sent
        self._batch_bytes = 0
        self._write_paused = False  # over the transport's high-water mark
        self._drained: asyncio.Future[None] | None = None  # someone waits for it to drain

    def write(self, data: bytes) -> None:
        batch = self._batch
        if batch is None:
            if self.transport.is_closing():
                return
            self._batch = [data]
            self._batch_bytes = len(data)
            asyncio.get_running_loop().call_soon(self.flush)
        else:
            batch.append(data)
            self._batch_bytes += len(data)

    def flush(self) -> None:
        """Hand what this pass wrote to the transport (at the end of the pass)."""
        batch = self._batch
        if batch is None:
            return
        self._batch, self._batch_bytes = None, 0
        if not self.transport.is_closing():
            self.transport.write(batch[0] if len(batch) == 1 else b"".join(batch))

    def buffered(self) -> int:
        size: int = self.transport.get_write_buffer_size()
        return size + self._batch_bytes

    def is_closing(self) -> bool:
        closing: bool = self.transport.is_closing()
        return closing

    def abort(self) -> None:
        self._batch, self._batch_bytes = None, 0
        self.transport.abort()
        self.writing_resumed()

    async def close(self) -> None:
        self.shut()

    def shut(self) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        self.flush()
        transport.close()  # sends what is buffered first
        if transport.get_write_buffer_size():
            # ... unless the peer is not reading: then it gets nothing more.
            asyncio.get_running_loop().call_later(CLOSE_GRACE, transport.abort)

    def writing_paused(self) -> None:
        self._write_paused = True

    def writing_resumed(self) -> None:
        self._write_paused = False
        waiter, self._drained = self._drained, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def writable(self, limit: int = LOW_WATER) -> None:
        while not self.transport.is_closing() and self.buffered() > limit:
            if self._write_paused:
                if self._drained is None:
                    self._drained = asyncio.get_running_loop().create_future()
                # below the transport's own low-water mark (shielded: one waiter cancelled
                # does not cancel the others' wait)
                await asyncio.shield(self._drained)
            else:
                await asyncio.sleep(0.005)  # under that mark but above ours: poll

    def peer(self) -> tuple[str, int] | None:
        info = self.transport.get_extra_info("peername")
        if not info or len(info) < 2:
            return None
        return str(info[0]), int(info[1])


class WebSocketLink(Link):
    __slots__ = ("websocket", "_chunks", "_pending", "_sending", "_closed", "_closing",
                 "_closer")

    def __init__(self, websocket: ServerConnection) -> None:
        self.websocket = websocket
        self._chunks: deque[bytes] = deque()
        self._pending = 0
        self._sending = False
        self._closed = False  # nothing more is sent
        self._closing = False  # nothing more is accepted; what was written is still sent
        self._closer: asyncio.Task[None] | None = None  # closes it (see close)

    def write(self, data: bytes) -> None:
        if self._closing or self._closed:
            return
        self._chunks.append(data)
        self._pending += len(data)
        if not self._sending:
            self._sending = True
            spawn(self._send())

    async def _send(self) -> None:
        try:
            while self._chunks and not self._closed:
                data = b"".join(self._chunks)
                self._chunks.clear()
                try:
                    await self.websocket.send(data)
                finally:
                    self._pending -= len(data)
        except (websockets.exceptions.ConnectionClosed, ConnectionError, OSError):
            self._closed = True
        finally:
            self._sending = False

    def buffered(self) -> int:
        transport = self.websocket.transport
        size: int = transport.get_write_buffer_size() if transport is not None else 0
        return self._pending + size

    def is_closing(self) -> bool:
        transport = self.websocket.transport
        return (self._closing or self._closed or transport is None
                or bool(transport.is_closing()))

    def abort(self) -> None:
        self._closed = self._closing = True
        self._chunks.clear()
        transport = self.websocket.transport
        if transport is not None:
            transport.abort()

    def shut(self) -> None:
        if self._closer is None:
            self._closer = asyncio.ensure_future(self._close())

    async def close(self) -> None:
        # The WebSocket server closes the connection when its handler returns, so this is
        # awaited by the handler: what was written goes out first.
        self.shut()
        assert self._closer is not None
        await asyncio.shield(self._closer)

    async def _close(self) -> None:
        if self._closing:
            return
        self._closing = True
        try:
            async with asyncio.timeout(CLOSE_GRACE):
                while self._sending:  # let what was written go out first
                    await asyncio.sleep(0.005)
                self._closed = True
                await self.websocket.close()
        except (TimeoutError, websockets.exceptions.ConnectionClosed, ConnectionError, OSError):
            self.abort()

    async def writable(self, limit: int = LOW_WATER) -> None:
        while not self.is_closing() and self.buffered() > limit:
            await asyncio.sleep(0.005)

    def peer(self) -> tuple[str, int] | None:
        address = self.websocket.remote_address
        if not address:
            return None
        return str(address[0]), int(address[1])
