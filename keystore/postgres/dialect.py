"""The PostgreSQL dialect (keystore.sql.dialect): an asyncpg pool, one transaction per
operation.

Writes run in READ COMMITTED transactions whose checks are made safe by row locks (the
Spelling's ``row_lock``: the application row for its limits) and constraints (a
concurrent duplicate is a ConflictError). Writes that make change-feed rows take the feed
lock first, so they never wait for it while holding row locks another feed writer wants.
Reads of more than one statement share one REPEATABLE READ snapshot.

Outages (keystore.postgres.db.Link): a lost connection makes the operation raise
UnavailableError, and later ones fail fast until a probe finds the server again. A
single statement that only reads is retried once on a fresh connection first: after the
server restarted, the pool's idle connections are all dead, and the first CONNECT to
find one should not be refused for it. Committed changes are pushed as well as polled:
``watch_changes`` LISTENs on a connection of its own (keystore.postgres.listen).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from keystore.defaults import DEFAULT_POOL_SIZE, DEFAULT_STATEMENT_TIMEOUT
from keystore.errors import ConflictError, KeybrokerError, UnavailableError, ValidationError
from keystore.location import check_postgres_url, redact
from keystore.postgres.db import LOST, Link, affected, create_pool, reason
from keystore.postgres.listen import ChangeListener
from keystore.postgres.migrations import FEED_LOCK, migrate
from keystore.query import POSTGRES as POSTGRES_QUERY
from keystore.sql.dialect import Row, Spelling, conflict

CLOSE_TIMEOUT = 5.0  # seconds

POSTGRES = Spelling(
    query=POSTGRES_QUERY,
    array=lambda element, rest: f"ARRAY(SELECT {element} {rest})",
    pair=lambda a, b: f"ARRAY[{a}, {b}]",
    in_list=lambda column, n: f"{column} = ANY(${n}::text[])",
    list_param=list,
    ordered_join="JOIN",  # the planner picks the order from its statistics
    row_lock=lambda mode: f" FOR {mode}",
    # The function also notifies listeners and takes the feed lock (migrations, step 2).
    add_change="SELECT keybroker_add_change($1, $2)",
)


class PostgresTransaction:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        rows: list[Row] = await self._conn.fetch(sql, *args)
        return rows

    async def value(self, sql: str, *args: Any) -> Any:
        return await self._conn.fetchval(sql, *args)

    async def execute(self, sql: str, *args: Any) -> int:
        return affected(await self._conn.execute(sql, *args))

    async def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            await self._conn.executemany(sql, rows)

    async def insert_rows(self, table: str, columns: Sequence[str],
                          rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            await self._conn.copy_records_to_table(table, records=rows, columns=columns)


class PostgresDialect:
    spelling = POSTGRES

    def __init__(self, pool: asyncpg.Pool, url: str, statement_timeout: float) -> None:
        self._pool = pool
        self._url = url
        self.location = redact(url)
        self.statement_timeout = statement_timeout
        self._link = Link(self.location, lambda: self._pool.fetchval("SELECT 1"))
        self._listener: ChangeListener | None = None

    @classmethod
    async def open(cls, url: str, *, pool_size: int = DEFAULT_POOL_SIZE,
                   statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT) -> PostgresDialect:
        """Connect to the database at ``url`` and migrate it; a clear error if that fails."""
        check_postgres_url(url)
        if not isinstance(pool_size, int) or isinstance(pool_size, bool) or pool_size < 1:
            raise ValidationError(f"invalid pool size {pool_size!r}: must be 1 or more")
        if statement_timeout <= 0:
            raise ValidationError(
                f"invalid statement timeout {statement_timeout!r}: must be more than 0")
        shown = redact(url)
        try:
            pool = await create_pool(url, pool_size, statement_timeout)
        except LOST as exc:
            raise UnavailableError(
                f"cannot reach the PostgreSQL keystore {shown}: {reason(exc)}") from None
        except asyncpg.PostgresError as exc:  # e.g. no such database, authentication
            raise KeybrokerError(
                f"cannot open the PostgreSQL keystore {shown}: {reason(exc)}") from None
        try:
            async with pool.acquire() as conn:
                await migrate(conn, shown)
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, LOST):
                raise UnavailableError(
                    f"cannot reach the PostgreSQL keystore {shown}: {reason(exc)}") from None
            if isinstance(exc, asyncpg.PostgresError):  # e.g. no right to create tables
                raise KeybrokerError(
                    f"cannot migrate the PostgreSQL keystore {shown}: {reason(exc)}") from None
            raise
        return cls(pool, url, statement_timeout)

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        await self._link.close()
        try:  # graceful, unless the server does not answer (then just drop the sockets)
            await asyncio.wait_for(self._pool.close(), CLOSE_TIMEOUT)
        except TimeoutError:
            self._pool.terminate()

    _HANDLED = (*LOST, asyncpg.exceptions.QueryCanceledError, asyncpg.UniqueViolationError,
                asyncpg.ForeignKeyViolationError, asyncpg.exceptions.DeadlockDetectedError)

    def _failed(self, exc: BaseException) -> KeybrokerError:
        """The keystore error for a database error (an outage, a timeout, a conflict)."""
        if isinstance(exc, asyncpg.exceptions.QueryCanceledError):
            return UnavailableError(f"keystore {self.location} did not answer within "
                                    f"{self.statement_timeout:g}s (statement timeout)")
        if isinstance(exc, asyncpg.UniqueViolationError | asyncpg.ForeignKeyViolationError):
            return conflict(exc.detail or str(exc))
        if isinstance(exc, asyncpg.exceptions.DeadlockDetectedError):
            return ConflictError("conflicts with a concurrent change (deadlock); try again")
        return self._link.lost(exc)

    @asynccontextmanager
    async def transaction(self, *, write: bool = True,
                          feed: bool = False) -> AsyncIterator[PostgresTransaction]:
        self._link.check()
        try:
            async with self._pool.acquire() as conn:
                if write:
                    transaction = conn.transaction()
                else:
                    transaction = conn.transaction(isolation="repeatable_read", readonly=True)
                async with transaction:
                    if feed:
                        await conn.execute(f"SELECT pg_advisory_xact_lock({FEED_LOCK})")
                    yield PostgresTransaction(conn)
        except self._HANDLED as exc:
            raise self._failed(exc) from None

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """Retried once on a fresh connection if the first one turns out dead."""
        self._link.check()
        try:
            try:
                rows: list[Row] = await self._pool.fetch(sql, *args)
            except LOST:
                rows = await self._pool.fetch(sql, *args)
            return rows
        except self._HANDLED as exc:
            raise self._failed(exc) from None

    lookup = fetch  # every read is a round trip to the server

    async def commit_marker(self) -> None:
        """None: the change feed's newest id moves with every commit that matters."""
        return None

    async def watch_changes(self, wake: Callable[[], None]) -> bool:
        """Call ``wake`` as soon as a change-feed row is committed (LISTEN/NOTIFY on a
        connection of its own, re-established with backoff when lost), and when the
        database answers again after an outage. True: changes are pushed."""
        self._link.on_up.append(wake)
        if self._listener is None:
            self._listener = ChangeListener(self._url, self.location)
            self._listener.start()
        self._listener.wakers.append(wake)
        return True
