"""One shape for the daemon's background services: call ``tick()`` every ``interval``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

logger = logging.getLogger(__name__)

_running: set[asyncio.Future[Any]] = set()


def spawn(coro: Coroutine[Any, Any, Any]) -> None:
    """Run a coroutine as its own task, keeping a reference until it ends (asyncio holds
    only weak references to tasks)."""
    task = asyncio.ensure_future(coro)
    _running.add(task)
    task.add_done_callback(_running.discard)


class Periodic:
    """Runs ``tick()`` every ``interval`` seconds from ``start()`` until ``stop()``.
    A failing tick is logged and the next one runs: a service never dies of one error."""

    name = "keybroker-periodic"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.start_ticking()

    async def stop(self) -> None:
        await self.stop_ticking()

    def start_ticking(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop_ticking(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def tick(self) -> None:
        raise NotImplementedError

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except Exception:
                logger.exception("%s: tick failed; continuing", self.name)
