"""The one home of "this test needs an outside program" (a database server, a message
broker, a browser): skip when it is missing, or fail when the run must not skip (CI sets
KEYBROKER_REQUIRE_SERVICES=1, so a missing install step shows as a failure rather than as
tests quietly not run)."""

from __future__ import annotations

import glob
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

REQUIRE = "KEYBROKER_REQUIRE_SERVICES"


def services_required() -> bool:
    return os.environ.get(REQUIRE, "") not in ("", "0")


def unavailable(message: str) -> None:
    """Skip the test with ``message``, or fail it when services are required."""
    if services_required():
        pytest.fail(f"{message} ({REQUIRE} is set: this run must not skip it)")
    pytest.skip(message)


def find_binary(name: str, extra_dirs: Iterable[str] = ()) -> Path | None:
    """``name`` on PATH, else in a directory matching one of ``extra_dirs`` (glob
    patterns; of several matches, the highest version number first)."""
    found = shutil.which(name)
    if found:
        return Path(found)
    for pattern in extra_dirs:
        for directory in sorted(glob.glob(pattern), key=_natural, reverse=True):
            candidate = Path(directory) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    return None


def _natural(text: str) -> list[Any]:
    """Sort key: numbers by value ("15" after "9.6")."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text)]


def require_binary(names: str | tuple[str, ...], why: str,
                   extra_dirs: Iterable[str] = ()) -> Path:
    """The first of the programs ``names`` found (see find_binary), or skip/fail saying
    ``why`` it is needed (name the package to install there)."""
    options = (names,) if isinstance(names, str) else names
    for name in options:
        path = find_binary(name, extra_dirs)
        if path is not None:
            return path
    unavailable(f"{' or '.join(options)} not found: {why}")
    raise AssertionError("unreachable")  # pytest.skip and pytest.fail raise
