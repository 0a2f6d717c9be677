"""A throwaway PostgreSQL server for tests: ``initdb`` + ``pg_ctl`` into a temporary
directory, listening on 127.0.0.1 only on a free port (its unix socket stays in that
directory), run as the unprivileged ``postgres`` user when the tests run as root
(``initdb`` refuses root; CI runs as root). One server per test session, one database per
test, cloned from a migrated template (fast), dropped at the end of the test.

Binaries are found on PATH, else in Debian's /usr/lib/postgresql/*/bin.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import asyncpg

from tests.support.services import require_binary

T = TypeVar("T")
DEBIAN_BINDIR = "/usr/lib/postgresql/*/bin"
SUPERUSER = "keybroker"
TEMPLATE = "keybroker_template"
RUN_AS = "postgres"


def run_sync(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a fresh loop in a helper thread (callable from
    inside a running loop, e.g. an async test)."""
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(fn()))  # type: ignore[arg-type]
        except BaseException as exc:  # handed to the caller
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    def __init__(self) -> None:
        why = "the PostgreSQL keystore tests start a throwaway server"
        self.initdb = require_binary("initdb", why, [DEBIAN_BINDIR])
        self.pg_ctl = require_binary("pg_ctl", why, [DEBIAN_BINDIR])
        self.as_root = os.geteuid() == 0
        self.base = Path(tempfile.mkdtemp(prefix="keybroker-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = free_port()
        self._names = itertools.count(1)
        if self.as_root:
            user = pwd.getpwnam(RUN_AS)
            os.chown(self.base, user.pw_uid, user.pw_gid)
        self.running = False

    def _run(self, *args: str | Path) -> None:
        cmd = [str(a) for a in args]
        if self.as_root:
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"  # sbin may be off PATH
            cmd = [runuser, "-u", RUN_AS, "--", *cmd]
        # cwd: the postgres user may not be allowed into the caller's directory.
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                              cwd=self.base)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                               f"{done.stdout}{done.stderr}{log}")

    def init(self) -> PostgresServer:
        self._run(self.initdb, "-D", self.data, "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        return self

    def start(self, port: int | None = None, *, durable: bool = False) -> None:
        """Start (again) on ``port`` (default: this server's port). Tests trade durability
        for speed; ``durable`` keeps PostgreSQL's defaults (for benchmarks)."""
        options = (f"-p {port or self.port} -k {self.base} -c listen_addresses=127.0.0.1 "
                   "-c max_connections=200")
        if not durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(self.pg_ctl, "-D", self.data, "-l", self.log, "-o", options, "-w",
                  "-t", "60", "start")
        self.running = True

    def stop(self) -> None:
        if self.running:
            self._run(self.pg_ctl, "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop")
            self.running = False

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def url(self, database: str = "postgres", port: int | None = None) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{port or self.port}/{database}"

    def admin(self, *statements: str, database: str = "postgres") -> None:
        async def go() -> None:
            conn = await asyncpg.connect(self.url(database))
            try:
                for sql in statements:
                    await conn.execute(sql)
            finally:
                await conn.close()

        run_sync(go)

    def make_template(self, migrate: Callable[[str], Awaitable[None]]) -> None:
        """A database at the current schema, cloned by new_database."""
        self.admin(f"CREATE DATABASE {TEMPLATE}")
        run_sync(lambda: migrate(self.url(TEMPLATE)))

    def new_database(self) -> str:
        name = f"ks_{next(self._names)}"
        self.admin(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        return name

    def drop_database(self, name: str) -> None:
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
