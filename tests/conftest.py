"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.harness import RunningBroker, broker_settings


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RunningBroker]:
    """A real keybroker daemon on 127.0.0.1 (TCP and WebSocket, port 0) on a fresh SQLite file."""
    running = RunningBroker(broker_settings(tmp_path)).start()
    try:
        yield running
    finally:
        running.stop()
