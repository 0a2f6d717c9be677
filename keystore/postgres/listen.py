"""LISTEN keybroker_changes on a connection of its own, so that a committed change
reaches the daemon at once rather than at its next poll.

Notifications carry nothing but "something changed": the reader then reads the
``changes`` rows after the last one it applied, so a notification lost with its
connection costs nothing. When the connection is lost the listener reconnects with
backoff, and wakes the reader once it listens again (catching up on what it missed).
The reader keeps polling meanwhile (broker.services.live), so changes still arrive without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from keystore.postgres.db import CONNECT_TIMEOUT, LOST, RETRY_FIRST, RETRY_MAX, reason
from keystore.postgres.migrations import CHANNEL

log = logging.getLogger(__name__)

LISTENER_NAME = "keybroker-listener"  # application_name of the LISTEN connection


def _setter(event: asyncio.Event) -> Callable[[Any], None]:
    return lambda _conn: event.set()


class ChangeListener:
    def __init__(self, url: str, location: str) -> None:
        self._url = url
        self.location = location
        self.wakers: list[Callable[[], None]] = []
        self.listening = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name="keybroker-pg-listener")

    def _wake(self, *_args: Any) -> None:
        for wake in self.wakers:
            wake()

    async def _run(self) -> None:
        delay = RETRY_FIRST
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self._url, timeout=CONNECT_TIMEOUT,
                    server_settings={"application_name": LISTENER_NAME})
                lost = asyncio.Event()
                conn.add_termination_listener(_setter(lost))
                await conn.add_listener(CHANNEL, self._wake)
                self.listening = True
                delay = RETRY_FIRST
                log.debug("listening for keystore changes on %s", self.location)
                self._wake()  # whatever was committed while nobody listened
                await lost.wait()
                log.debug("change listener connection to %s lost", self.location)
            except LOST as exc:
                log.debug("change listener cannot reach %s: %s", self.location, reason(exc))
            finally:
                self.listening = False
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(*LOST):
                        await conn.close(timeout=1)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
