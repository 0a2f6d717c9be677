"""The SQLite dialect (keystore.sql.dialect): one aiosqlite connection, one transaction per
operation.

An asyncio.Lock serialises operations on the single connection: without it, one
coroutine's statements could run inside another's open transaction. Writes take the
write lock up front (BEGIN IMMEDIATE, waiting up to busy_timeout for another process),
so checks made inside them stay true and no row lock is ever needed. A primary-key read
for CONNECT takes about 10 µs, so it runs synchronously on a private read-only
connection rather than paying aiosqlite's thread round trip (WAL readers are not blocked
by writers; if the file is busy anyway, it falls back to the shared connection).
Statements come with ``$n`` parameters and run as SQLite's numbered ``?n``.
"""

# SQL text in this module is assembled only from constants and our own table and column
# names; every value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sqlite3
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Any

import aiosqlite

from keystore.query import SQLITE as SQLITE_QUERY
from keystore.sql.dialect import Row, Spelling, conflict
from keystore.sqlite.db import connect
from keystore.sqlite.migrations import NOW_MICROS, migrate

log = logging.getLogger(__name__)

SQLITE = Spelling(
    query=SQLITE_QUERY,
    array=lambda element, rest: f"(SELECT json_group_array({element}) {rest})",
    pair=lambda a, b: f"json_array({a}, {b})",
    in_list=lambda column, n: f"{column} IN (SELECT value FROM json_each(${n}))",
    list_param=lambda values: json.dumps(list(values)),
    ordered_join="CROSS JOIN",  # SQLite never reorders a CROSS JOIN
    row_lock=lambda _mode: "",
    add_change=f"INSERT INTO changes (kind, subject, at) VALUES ($1, $2, {NOW_MICROS})",
)
# Errors of a write that another writer made impossible (the rest are bugs: raised as is).
CONFLICTS = frozenset({"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY",
                       "SQLITE_CONSTRAINT_FOREIGNKEY"})


@lru_cache(maxsize=1024)
def qmarks(sql: str) -> str:
    """``sql`` with SQLite's numbered parameters ``?n`` for ``$n``."""
    return re.sub(r"\$(\d+)", r"?\1", sql)


class SqliteTransaction:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return list(await self._conn.execute_fetchall(qmarks(sql), args))

    async def value(self, sql: str, *args: Any) -> Any:
        rows = await self.fetch(sql, *args)
        return rows[0][0] if rows else None

    async def execute(self, sql: str, *args: Any) -> int:
        cursor = await self._conn.execute(qmarks(sql), args)
        return max(cursor.rowcount, 0)

    async def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            await self._conn.executemany(qmarks(sql), rows)

    async def insert_rows(self, table: str, columns: Sequence[str],
                          rows: Sequence[Sequence[Any]]) -> None:
        marks = ", ".join(f"${n}" for n in range(1, len(columns) + 1))
        await self.execute_many(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)


class SqliteDialect:
    spelling = SQLITE

    def __init__(self, conn: aiosqlite.Connection, path: str) -> None:
        self._conn = conn
        self.path = path
        self.location = path
        self._lock = asyncio.Lock()
        self._closed = False
        # Commits on our own connection do not move PRAGMA data_version; count them.
        self._local_commits = 0
        self._ro: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: str, *, create: bool = True) -> SqliteDialect:
        """Open (migrating if needed) the keystore file at ``path``; ``create``: a missing
        or empty file becomes a new keystore (mode 0600), else it is a NotFoundError."""
        conn = await connect(path, create=create)
        try:
            await migrate(conn, path)
        except BaseException:
            await conn.close()
            raise
        return cls(conn, path)

    async def close(self) -> None:
        if self._ro is not None:
            self._ro.close()
            self._ro = None
        async with self._lock:
            if not self._closed:
                self._closed = True
                await self._conn.close()

    async def _begin(self, statement: str) -> None:
        """BEGIN on aiosqlite's thread. A task cancelled while waiting for it (a service
        stopping) leaves the BEGIN running there: a ROLLBACK queued behind it undoes the
        transaction, or the next writer would find one already open."""
        try:
            await self._conn.execute(statement)
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await asyncio.shield(self._conn.execute("ROLLBACK"))
            raise

    @asynccontextmanager
    async def transaction(self, *, write: bool = True,
                          feed: bool = False) -> AsyncIterator[SqliteTransaction]:
        """``feed`` needs nothing here: the one writer holds the whole file."""
        async with self._lock:
            await self._begin("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield SqliteTransaction(self._conn)
            except BaseException as exc:
                if self._conn.in_transaction:
                    await self._conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.IntegrityError) and \
                        exc.sqlite_errorname in CONFLICTS:
                    raise conflict(str(exc)) from None
                raise
            await self._conn.execute("COMMIT")
            if write:
                self._local_commits += 1

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._lock:
            return list(await self._conn.execute_fetchall(qmarks(sql), args))

    async def lookup(self, sql: str, *args: Any) -> list[Row]:
        rows = self._read_now(qmarks(sql), args)
        return rows if rows is not None else await self.fetch(sql, *args)

    def _read_now(self, sql: str, params: tuple[Any, ...]) -> list[Row] | None:
        """The rows on the read-only connection, or None to use the shared one."""
        if self.path == ":memory:":
            return None
        try:
            if self._ro is None:
                uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
                self._ro = sqlite3.connect(uri, uri=True, isolation_level=None,
                                           check_same_thread=False)
                self._ro.execute("PRAGMA busy_timeout = 0")
            return self._ro.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            log.debug("read-only lookup unavailable (%s); using the shared connection", exc)
            return None

    async def commit_marker(self) -> tuple[int, int]:
        """PRAGMA data_version moves with other connections' commits (the CLI in another
        process), the counter with our own."""
        rows = await self.fetch("PRAGMA data_version")
        return int(rows[0][0]), self._local_commits

    async def watch_changes(self, wake: Callable[[], None]) -> bool:
        """Nothing to push: a file has no notifications (the marker is polled)."""
        return False
