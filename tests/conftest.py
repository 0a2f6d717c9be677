"""Shared fixtures."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from broker.core.settings import Settings
from keystore import KeyStore
from tests.support.authsvc import create_keystore
from tests.support.harness import RunningBroker, StartDaemon, broker_settings, running_daemon
from tests.support.postgres import PostgresServer

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture
def daemon_with(tmp_path: Path) -> Iterator[StartDaemon]:
    """``daemon_with(**overrides)``: start a real keybroker daemon on 127.0.0.1 (TCP and
    WebSocket, port 0) on a fresh SQLite file in tmp_path, with ``overrides`` of any
    Settings field, and return it; ``daemon_with(settings, **overrides)`` starts one on
    prepared settings instead. Every daemon started is stopped at teardown (a test may stop
    one itself first, e.g. to start another on the same files)."""
    with contextlib.ExitStack() as running:

        def start(settings: Settings | None = None, **overrides: Any) -> RunningBroker:
            base = broker_settings(tmp_path) if settings is None else settings
            return running.enter_context(running_daemon(replace(base, **overrides)))

        yield start


@pytest.fixture
def broker(daemon_with: StartDaemon) -> RunningBroker:
    """A real keybroker daemon with the default settings (see ``daemon_with``)."""
    return daemon_with()


async def _migrate(url: str) -> None:
    async with KeyStore.open(url):
        pass


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the whole session (skipped, or failed under
    KEYBROKER_REQUIRE_SERVICES=1, when its binaries are missing)."""
    server = PostgresServer()
    try:
        server.init()
        server.start()
        server.make_template(_migrate)
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> Iterator[str]:
    """A fresh, migrated PostgreSQL keystore database of its own for this test."""
    with fresh_database(postgres) as url:
        yield url


@pytest.fixture(params=BACKENDS)
def broker_on_each_backend(request: pytest.FixtureRequest) -> RunningBroker:
    """Like ``broker``, once on an SQLite file and once on a PostgreSQL database (modules
    whose tests should run on both name it ``broker`` with ``broker = ...``)."""
    # The database first, so that it is dropped after the daemon using it has stopped.
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    start: StartDaemon = request.getfixturevalue("daemon_with")
    return start(db_url=url)


@pytest.fixture(params=BACKENDS)
def keystore_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a fresh keystore lives, once per backend: an SQLite file path, then a
    PostgreSQL URL."""
    if request.param == "sqlite":
        return str(tmp_path / "keystore.db")
    return str(request.getfixturevalue("pg_url"))


@contextlib.contextmanager
def keystore_on(request: pytest.FixtureRequest, backend: str, work: Path) -> Iterator[str]:
    """A fresh, migrated keystore on ``backend`` for fixtures wider than one test (module,
    session): an SQLite file in ``work``, or a database of the session's PostgreSQL
    server, dropped afterwards."""
    if backend == "sqlite":
        path = work / "keystore.db"
        create_keystore(path)
        yield str(path)
        return
    with fresh_database(request.getfixturevalue("postgres")) as url:
        yield url


@contextlib.contextmanager
def fresh_database(server: PostgresServer) -> Iterator[str]:
    """The URL of a new, migrated database on ``server``, dropped afterwards (while the
    server still runs)."""
    name = server.new_database()
    try:
        yield server.url(name)
    finally:
        if server.running:
            server.drop_database(name)
