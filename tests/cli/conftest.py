"""Fixtures for CLI tests: the keystore a command works on, once per backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import BACKENDS


@pytest.fixture(params=BACKENDS)
def cli_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An SQLite file whose parent directory does not exist yet, then a PostgreSQL URL."""
    if request.param == "sqlite":
        return str(tmp_path / "data" / "keys.db")
    return str(request.getfixturevalue("pg_url"))
