"""One shape for the daemon's background services: call ``tick()`` every ``interval``, or
sooner when woken."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

from keystore.errors import UnavailableError

logger = logging.getLogger(__name__)

_running: set[asyncio.Future[Any]] = set()


def spawn(coro: Coroutine[Any, Any, Any]) -> None:
    """Run a coroutine as its own task, keeping a reference until it ends (asyncio holds
    only weak references to tasks)."""
    task = asyncio.ensure_future(coro)
    _running.add(task)
    task.add_done_callback(_running.discard)


class Periodic:
    """Runs ``tick()`` every ``interval`` seconds from ``start()`` until ``stop()``, and
    at once after ``wake()``. A failing tick is logged and the next one runs: a service
    never dies of one error. An unreachable keystore is not logged per tick: the
    keystore logs the outage once, and its end."""

    name = "keybroker-periodic"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._woken = asyncio.Event()

    def wake(self) -> None:
        """Run the next tick now rather than at the end of the interval."""
        self._woken.set()

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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), self.interval)
            self._woken.clear()
            try:
                await self.tick()
            except UnavailableError as exc:
                logger.debug("%s: %s", self.name, exc)
            except Exception:
                logger.exception("%s: tick failed; continuing", self.name)
