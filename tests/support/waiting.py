"""Waiting for a condition instead of for a number of seconds (sleeps belong only where
time itself is under test)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

POLL = 0.02


def wait_until(condition: Callable[[], T], timeout: float = 5.0,
               what: str | None = None, poll: float = POLL) -> T:
    """Poll ``condition`` (every ``poll`` seconds) until it returns something true and
    return that; fail with an AssertionError naming ``what`` (or the condition) when
    ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {timeout:g}s: "
                                 f"{what or getattr(condition, '__name__', condition)}")
        time.sleep(poll)


async def async_wait_until(condition: Callable[[], T | Awaitable[T]], timeout: float = 5.0,
                           what: str | None = None, poll: float = POLL) -> T:
    """``wait_until`` inside an event loop: ``condition`` may be a plain or an async
    callable; the loop keeps running between polls."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {timeout:g}s: "
                                 f"{what or getattr(condition, '__name__', condition)}")
        await asyncio.sleep(poll)
