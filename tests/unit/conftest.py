"""Unit-test fixtures: the MQTT engine without sockets (tests/support/engine.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.engine import Engine


@pytest.fixture
def engine_with(tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    """``engine_with(**settings overrides)``: a registry and its router, closed at
    teardown."""
    made: list[Engine] = []

    def make(**overrides: Any) -> Engine:
        made.append(Engine(tmp_path / f"engine-{len(made)}", **overrides))
        return made[-1]

    yield make
    for engine in made:
        engine.close()


@pytest.fixture
def engine(engine_with: Callable[..., Engine]) -> Engine:
    """An engine with the default settings."""
    return engine_with()
