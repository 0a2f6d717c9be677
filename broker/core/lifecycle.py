"""Run a server until SIGINT/SIGTERM: the one place signals are handled, for the daemon
(broker.daemon.server) and the access-key service (broker.authsvc.server)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Protocol, TypeVar

logger = logging.getLogger(__name__)


class Server(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


S = TypeVar("S", bound=Server)


async def serve_until_signalled(server: S, stop: asyncio.Event | None = None,
                                on_started: Callable[[S], None] | None = None) -> None:
    """Start ``server``, run until SIGINT/SIGTERM (or ``stop`` is set), then stop it."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    await server.start()
    try:
        if on_started is not None:
            on_started(server)
        await stop.wait()
        logger.info("shutting down")
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await server.stop()
    logger.info("stopped")
