"""The PostgreSQL connection pool, what counts as an outage, and the link state (up, or
down and retrying with backoff)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from keystore.errors import UnavailableError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # seconds to open one connection
RETRY_FIRST, RETRY_MAX = 0.1, 5.0  # seconds between probes of a lost database
APPLICATION_NAME = "keybroker"

# The server or the way to it is gone: the operation was not done and may be retried.
LOST = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,  # class 08, and a connection that no longer exists
    asyncpg.InterfaceError,  # "connection is closed", a pool closing under us
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,  # starting up or shutting down
    asyncpg.exceptions.TooManyConnectionsError,
)


def affected(status: str) -> int:
    """The row count of a command tag such as "DELETE 12"."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


def reason(exc: BaseException) -> str:
    """One line saying why the database could not be used."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


async def create_pool(url: str, size: int, statement_timeout: float) -> asyncpg.Pool:
    """A pool of at most ``size`` connections whose statements the server cancels after
    ``statement_timeout`` seconds (the client gives up one second later)."""
    pool = await asyncpg.create_pool(
        url,
        min_size=1,
        max_size=size,
        timeout=CONNECT_TIMEOUT,
        command_timeout=statement_timeout + 1,
        server_settings={
            "statement_timeout": str(int(statement_timeout * 1000)),
            "application_name": APPLICATION_NAME,
        },
    )
    assert pool is not None
    return pool


class Link:
    """Whether the database answers. The first lost connection trips it: the outage is
    logged once, operations fail fast with UnavailableError instead of each waiting on a
    connect timeout, and a probe retries with backoff until the database answers again,
    which is logged once and announced to ``on_up`` callbacks (the change feed catches
    up then)."""

    def __init__(self, location: str, probe: Callable[[], Awaitable[Any]]) -> None:
        self.location = location
        self.up = True
        self._probe = probe
        self._task: asyncio.Task[None] | None = None
        self.on_up: list[Callable[[], None]] = []

    def check(self) -> None:
        if not self.up:
            raise UnavailableError(f"keystore {self.location} is unreachable (retrying)")

    def lost(self, exc: BaseException) -> UnavailableError:
        """Record a lost connection; returns the error to raise."""
        why = reason(exc)
        if self.up:
            self.up = False
            log.warning("keystore %s unreachable (%s): refusing what needs it and "
                        "reconnecting with backoff", self.location, why)
            self._task = asyncio.get_running_loop().create_task(self._recover())
        return UnavailableError(f"keystore {self.location} is unreachable: {why}")

    async def _recover(self) -> None:
        delay = RETRY_FIRST
        while True:
            await asyncio.sleep(delay)
            try:
                await self._probe()
                break
            except LOST as exc:
                log.debug("keystore %s still unreachable: %s", self.location, reason(exc))
                delay = min(delay * 2, RETRY_MAX)
        self.up = True
        self._task = None
        log.warning("keystore %s reachable again", self.location)
        for callback in self.on_up:
            callback()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
