"""The event loop the daemon and the cluster service run on: uvloop when it is installed
(`pip install keybroker[fast]`), as uvicorn does with `uvicorn[standard]`, and the
standard asyncio loop otherwise or when ``KEYBROKER_EVENT_LOOP=asyncio`` says so. Both
are supported and tested: keybroker uses only the asyncio API both implement."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from broker.core.environment import ENV_EVENT_LOOP
from keystore.errors import ConfigError

T = TypeVar("T")
CHOICES = ("auto", "uvloop", "asyncio")


def chosen() -> str:
    """"uvloop" or "asyncio": what ``run`` will use here."""
    choice = os.environ.get(ENV_EVENT_LOOP, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ConfigError(f"{ENV_EVENT_LOOP}={choice!r}: must be one of {', '.join(CHOICES)}")
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(f"{ENV_EVENT_LOOP}=uvloop but uvloop is not installed "
                              "(pip install keybroker[fast])") from None
        return "asyncio"
    return "uvloop"


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``asyncio.run(main())`` on the chosen loop (chosen before ``main`` is called)."""
    if chosen() == "uvloop":
        import uvloop

        result: T = uvloop.run(main())
        return result
    return asyncio.run(main())


def running() -> str:
    """The name of the running loop's implementation, for the start-up line."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") \
        else "asyncio"
