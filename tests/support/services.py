"""Real services the tests need (a browser, a database server, a message broker): found on
this machine, or the test is skipped with a plain message, or, when CI sets
KEYBROKER_REQUIRE_SERVICES=1 (.ci/run does), failed: CI must never pass by skipping."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest

REQUIRE = "KEYBROKER_REQUIRE_SERVICES"


def missing(what: str, install: str) -> None:
    """Skip (or, under KEYBROKER_REQUIRE_SERVICES, fail) because ``what`` is absent."""
    message = f"{what} not found; install it with: {install}"
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(f"{REQUIRE}=1 and {message}")
    pytest.skip(message)


def require_binary(names: Iterable[str], what: str, install: str,
                   extra_dirs: Iterable[str] = ()) -> Path:
    """The first of ``names`` on PATH or in ``extra_dirs`` (globs allowed)."""
    for name in names:
        found = shutil.which(name)
        if found:
            return Path(found)
        for pattern in extra_dirs:
            for folder in sorted(Path("/").glob(pattern.lstrip("/")), reverse=True):
                candidate = folder / name
                if candidate.is_file() and os.access(candidate, os.X_OK):
                    return candidate
    missing(what, install)
    raise AssertionError("unreachable")  # missing() skips or fails
