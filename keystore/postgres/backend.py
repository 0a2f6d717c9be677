"""The PostgreSQL backend: an asyncpg pool, one transaction per operation.

Writes run in READ COMMITTED transactions whose checks are made safe by locks (the
application row for its key limit) and constraints (a concurrent duplicate is a
ConflictError). Operations that write change-feed rows take the feed lock first, so
they never wait for it while holding row locks another feed writer wants. Reads of more
than one statement share one REPEATABLE READ snapshot.

Outages (keystore.postgres.db.Link): a lost connection makes the operation raise
UnavailableError, and later ones fail fast until a probe finds the server again. A
single statement that only reads is retried once on a fresh connection first: after
the server restarted, the pool's idle connections are all dead, and the first
CONNECT to find one should not be refused for it.

The change feed is pushed as well as polled: ``watch_changes`` LISTENs on a connection
of its own (keystore.postgres.listen).
"""

# SQL text in this module is assembled only from constants and whitelisted names; every
# value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg

from keystore import credentials, lookup, plans
from keystore.backend import ConnectRow, DeviceTokenRow, Page
from keystore.errors import (
    ConflictError,
    KeybrokerError,
    NotFoundError,
    UnavailableError,
    ValidationError,
)
from keystore.keyspec import KeySpec
from keystore.location import check_postgres_url, redact
from keystore.models import AccessKey, ApiToken, Application, Change, Device, KeyStatus, Tag
from keystore.postgres import DEFAULT_POOL_SIZE, DEFAULT_STATEMENT_TIMEOUT, connections, statements
from keystore.postgres.db import (
    DEVICE_COLUMNS,
    KEY_COLUMNS,
    LOST,
    Link,
    affected,
    create_pool,
    reason,
)
from keystore.postgres.listen import ChangeListener
from keystore.postgres.migrations import FEED_LOCK, migrate
from keystore.postgres.statements import CONNECT_SQL, DEVICE_TOKEN_SQL, SCOPE_SQL
from keystore.query import POSTGRES, compile_query
from keystore.rows import (
    APP_COLUMNS,
    DEVICE_SORT,
    KEY_COLUMN_COUNT,
    KEY_SORT,
    TOKEN_COLUMNS,
    from_micros,
    now_micros,
    order_by,
    row_to_app,
    row_to_device,
    row_to_key,
    row_to_token,
    to_device_token_row,
    to_micros,
)
from keystore.sharedops import SharedConnections, SharedOps

log = logging.getLogger(__name__)

UPSERT_BATCH = 20_000
CLOSE_TIMEOUT = 5.0  # seconds


class PostgresBackend(SharedOps, SharedConnections):
    statements = statements
    connections = connections

    def __init__(self, pool: asyncpg.Pool, url: str, statement_timeout: float) -> None:
        self._pool = pool
        self._url = url
        self.location = redact(url)
        self.statement_timeout = statement_timeout
        self._link = Link(self.location, lambda: self._pool.fetchval("SELECT 1"))
        self._listener: ChangeListener | None = None

    @classmethod
    async def open(cls, url: str, *, pool_size: int = DEFAULT_POOL_SIZE,
                   statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT) -> PostgresBackend:
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

    # --- transaction plumbing ---------------------------------------------------------

    def _failed(self, exc: BaseException) -> KeybrokerError:
        """The keystore error for a database error (an outage, a timeout, a conflict)."""
        if isinstance(exc, asyncpg.exceptions.QueryCanceledError):
            return UnavailableError(f"keystore {self.location} did not answer within "
                                    f"{self.statement_timeout:g}s (statement timeout)")
        if isinstance(exc, asyncpg.UniqueViolationError):
            return ConflictError(f"conflicts with a concurrent change ({exc.detail or exc})")
        if isinstance(exc, asyncpg.exceptions.DeadlockDetectedError):
            return ConflictError("conflicts with a concurrent change (deadlock); try again")
        return self._link.lost(exc)

    _HANDLED = (*LOST, asyncpg.exceptions.QueryCanceledError, asyncpg.UniqueViolationError,
                asyncpg.exceptions.DeadlockDetectedError)

    @asynccontextmanager
    async def _tx(self, *, feed: bool = False,
                  snapshot: bool = False) -> AsyncIterator[asyncpg.Connection]:
        """One transaction: a write (READ COMMITTED; ``feed``: it writes change-feed rows,
        take the feed lock first) or, with ``snapshot``, a consistent read."""
        self._link.check()
        try:
            async with self._pool.acquire() as conn:
                if snapshot:
                    transaction = conn.transaction(isolation="repeatable_read", readonly=True)
                else:
                    transaction = conn.transaction()
                async with transaction:
                    if feed:
                        await conn.execute(f"SELECT pg_advisory_xact_lock({FEED_LOCK})")
                    yield conn
        except self._HANDLED as exc:
            raise self._failed(exc) from None

    def _write(self) -> AbstractAsyncContextManager[asyncpg.Connection]:
        return self._tx()

    def _read(self) -> AbstractAsyncContextManager[asyncpg.Connection]:
        return self._tx(snapshot=True)

    def transaction(self, *, feed: bool = False) -> AbstractAsyncContextManager[asyncpg.Connection]:
        """One write transaction (``async with``), for whole-keystore work in this package
        (keystore.postgres.copy); ``feed``: it writes change-feed rows."""
        return self._tx(feed=feed)

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """One reading statement (its own transaction), retried once on a fresh
        connection if the first one turns out dead."""
        self._link.check()
        try:
            try:
                rows: list[asyncpg.Record] = await self._pool.fetch(sql, *args)
            except LOST:
                rows = await self._pool.fetch(sql, *args)
            return rows
        except self._HANDLED as exc:
            raise self._failed(exc) from None

    # keystore.sharedops's reads: both are one statement on the pool.
    _lookup = _fetch
    _rows = _fetch

    async def _value(self, sql: str, *args: Any) -> int:
        return int((await self._fetch(sql, *args))[0][0])

    # --- applications -------------------------------------------------------------------

    async def insert_app(self, name: str, description: str | None,
                         max_keys: int | None) -> Application:
        now = now_micros()
        async with self._tx() as conn:
            if await conn.fetchval("SELECT 1 FROM applications WHERE name = $1", name):
                raise ConflictError(f"application name {name!r} is already used")
            app_id = credentials.new_object_id()
            await conn.execute(
                "INSERT INTO applications (id, name, description, max_keys, created_at, "
                "updated_at) VALUES ($1, $2, $3, $4, $5, $5)",
                app_id, name, description, max_keys, now)
            return await statements.load_app(conn, app_id)

    async def load_app(self, ref: str) -> Application:
        async with self._tx(snapshot=True) as conn:
            return await statements.load_app(conn, ref)

    async def all_apps(self) -> list[Application]:
        rows = await self._fetch(f"SELECT {APP_COLUMNS} FROM applications a ORDER BY a.name")
        return [row_to_app(r) for r in rows]

    async def change_app(self, ref: str, changes: dict[str, Any]) -> Application:
        async with self._tx() as conn:
            app = await statements.load_app(conn, ref)
            name = changes.get("name")
            if name is not None and await conn.fetchval(
                    "SELECT 1 FROM applications WHERE name = $1 AND id != $2", name, app.id):
                raise ConflictError(f"application name {name!r} is already used")
            if changes:
                assigns = ", ".join(f"{column} = ${n}"
                                    for n, column in enumerate(changes, start=1))
                n = len(changes)
                await conn.execute(
                    f"UPDATE applications SET {assigns}, updated_at = ${n + 1} "
                    f"WHERE id = ${n + 2}", *changes.values(), now_micros(), app.id)
            return await statements.load_app(conn, app.id)

    async def delete_apps(self, refs: tuple[str, ...]) -> list[Application]:
        """Delete applications with all their keys and devices (all, or none if one is
        missing). Triggers write a change for every key, device and application."""
        async with self._tx(feed=True) as conn:
            apps = [await statements.load_app(conn, ref) for ref in refs]
            for app in dict((a.id, a) for a in apps).values():
                await conn.execute("DELETE FROM access_keys WHERE app_id = $1", app.id)
                await conn.execute("DELETE FROM devices WHERE app_id = $1", app.id)
                await conn.execute("DELETE FROM applications WHERE id = $1", app.id)
        return apps

    # --- devices --------------------------------------------------------------------------

    async def upsert_devices(
        self, app_id: str, wanted: Mapping[str, tuple[str | None, frozenset[Tag]]]
    ) -> int:
        now = now_micros()
        touched = 0
        ids = list(wanted)
        async with self._tx() as conn:
            for start in range(0, len(ids), UPSERT_BATCH):
                touched += await statements.upsert_batch(
                    conn, app_id, ids[start:start + UPSERT_BATCH], dict(wanted), now)
        return touched

    async def load_device(self, app_id: str, device_id: str) -> Device:
        async with self._tx(snapshot=True) as conn:
            return await statements.load_device(conn, app_id, device_id)

    async def all_devices(self, app_id: str) -> list[Device]:
        rows = await self._fetch(
            f"SELECT {DEVICE_COLUMNS} FROM devices d WHERE d.app_id = $1 ORDER BY d.id", app_id)
        return [row_to_device(r) for r in rows]

    async def delete_devices(self, app_id: str, device_ids: tuple[str, ...]) -> None:
        async with self._tx(feed=True) as conn:
            missing = await statements.missing_devices(conn, app_id, device_ids)
            if missing:
                raise NotFoundError(f"no device {missing[0]!r} (nothing removed)")
            await conn.execute("DELETE FROM devices WHERE id = ANY($1::text[])", list(device_ids))

    async def page_devices(self, app_id: str, name_glob: str | None, sort: str,
                           descending: bool, offset: int, limit: int) -> Page:
        order = order_by(DEVICE_SORT, sort, descending, "d.id")
        where, params = "d.app_id = $1", [app_id]
        if name_glob is not None:
            where += " AND d.name LIKE $2"
            params.append(POSTGRES.like(name_glob))
        n = len(params)
        async with self._tx(snapshot=True) as conn:
            total = await conn.fetchval(f"SELECT count(*) FROM devices d WHERE {where}", *params)
            rows = await conn.fetch(
                f"SELECT {DEVICE_COLUMNS} FROM devices d WHERE {where} ORDER BY {order} "
                f"LIMIT ${n + 1} OFFSET ${n + 2}", *params, limit, offset)
        return [row_to_device(r) for r in rows], int(total)

    async def device_app(self, device_id: str) -> str | None:
        rows = await self._fetch("SELECT app_id FROM devices WHERE id = $1", device_id)
        return str(rows[0][0]) if rows else None

    async def count_devices(self, app_id: str | None) -> int:
        if app_id is None:
            return await self._value("SELECT count(*) FROM devices")
        return await self._value("SELECT count(*) FROM devices WHERE app_id = $1", app_id)

    # --- keys -------------------------------------------------------------------------

    async def insert_keys(self, app_id: str, specs: list[KeySpec],
                          minted: list[tuple[str, str]], max_keys: int) -> dict[str, AccessKey]:
        """Insert validated keys after the checks that need the database: the
        application's key limit (its row is locked, so two writers cannot both pass),
        device ids of this application, names not taken in it."""
        now = now_micros()
        names = [s.name for s in specs if s.name is not None]
        async with self._tx() as conn:
            if max_keys:
                await conn.execute("SELECT 1 FROM applications WHERE id = $1 FOR UPDATE", app_id)
                existing = await conn.fetchval(
                    "SELECT count(*) FROM access_keys WHERE app_id = $1", app_id)
                plans.check_key_limit(max_keys, existing, len(specs))
            missing = await statements.missing_devices(
                conn, app_id, tuple(dict.fromkeys(d for s in specs for d in s.device_ids)))
            if missing:
                raise ValidationError(f"unknown device id {missing[0]!r} in key device restriction")
            if names:
                taken = await conn.fetchval(
                    "SELECT name FROM access_keys WHERE app_id = $1 AND name = ANY($2::text[]) "
                    "LIMIT 1", app_id, names)
                if taken is not None:
                    raise ConflictError(f"key name {taken!r} is already used by another key")
            return await statements.insert_keys(conn, app_id, specs, minted, now)

    async def load_key_by_id(self, app_id: str, key_id: str) -> AccessKey:
        rows = await self._fetch(
            f"SELECT {KEY_COLUMNS} FROM access_keys k WHERE k.id = $1 AND k.app_id = $2",
            key_id, app_id)
        if not rows:
            raise NotFoundError(f"no access key with id {key_id!r}")
        return row_to_key(rows[0])

    async def page_keys(self, app_id: str, query: Mapping[str, Any] | str | None, sort: str,
                        descending: bool, offset: int, limit: int) -> Page:
        order = order_by(KEY_SORT, sort, descending, "k.key")
        where, params = compile_query(query, POSTGRES, [app_id])
        n = len(params)
        async with self._tx(snapshot=True) as conn:
            total = await conn.fetchval(
                f"SELECT count(*) FROM access_keys k WHERE k.app_id = $1 AND ({where})", *params)
            rows = await conn.fetch(
                f"SELECT {KEY_COLUMNS} FROM access_keys k WHERE k.app_id = $1 AND ({where}) "
                f"ORDER BY {order} LIMIT ${n + 1} OFFSET ${n + 2}", *params, limit, offset)
        return [row_to_key(r) for r in rows], int(total)

    async def query_keys(self, app_id: str,
                         query: Mapping[str, Any] | str | None) -> list[AccessKey]:
        where, params = compile_query(query, POSTGRES, [app_id])
        rows = await self._fetch(
            f"SELECT {KEY_COLUMNS} FROM access_keys k WHERE k.app_id = $1 AND ({where}) "
            "ORDER BY k.created_at, k.key", *params)
        return [row_to_key(r) for r in rows]

    async def count_keys(self, app_id: str | None) -> int:
        if app_id is None:
            return await self._value("SELECT count(*) FROM access_keys")
        return await self._value("SELECT count(*) FROM access_keys WHERE app_id = $1", app_id)

    async def change_key(self, app_id: str, ref: str, changes: dict[str, Any],
                         check: Callable[[AccessKey], None]) -> AccessKey:
        async with self._tx(feed=True) as conn:
            key = await statements.resolve_key(conn, app_id, ref)
            current = (await statements.load_keys(conn, [key]))[key]
            check(current)
            if changes.get("name") is not None and await conn.fetchval(
                    "SELECT 1 FROM access_keys WHERE app_id = $1 AND name = $2 AND key != $3",
                    app_id, changes["name"], key):
                raise ConflictError(
                    f"key name {changes['name']!r} is already used by another key")
            if changes:
                await statements.apply_key_changes(conn, key, changes)
            return (await statements.load_keys(conn, [key]))[key]

    async def set_status(self, app_id: str, refs: tuple[str, ...],
                         status: KeyStatus) -> list[AccessKey]:
        async with self._tx(feed=True) as conn:
            full = list(dict.fromkeys([await statements.resolve_key(conn, app_id, ref)
                                       for ref in refs]))
            await conn.execute(
                "UPDATE access_keys SET status = $1, updated_at = $2 "
                "WHERE key = ANY($3::text[]) AND status != $1",
                status.value, now_micros(), full)
            loaded = await statements.load_keys(conn, full)
        return [loaded[k] for k in full]

    async def delete_keys(self, app_id: str, refs: tuple[str, ...]) -> list[str]:
        async with self._tx(feed=True) as conn:
            full = list(dict.fromkeys([await statements.resolve_key(conn, app_id, ref)
                                       for ref in refs]))
            await conn.execute("DELETE FROM access_keys WHERE key = ANY($1::text[])", full)
        return full

    # --- CONNECT ----------------------------------------------------------------------

    async def connect_row(self, key: str) -> ConnectRow:
        row = (await self._fetch(CONNECT_SQL, key))[0]
        if row[1] is None:
            return ConnectRow(int(row[0]), None, None, None)
        listed = None if row[-1] is None else frozenset(row[-1])
        return ConnectRow(int(row[0]), row_to_key(row[1 : 1 + KEY_COLUMN_COUNT]),
                          row[-3], row[-2], listed)

    async def scope_of(self, key: AccessKey) -> frozenset[str]:
        rows = await self._fetch(SCOPE_SQL, key.key, key.app_id)
        return frozenset(r[0] for r in rows)

    # --- API tokens ---------------------------------------------------------------------

    async def insert_api_token(self, token_id: str, name: str, app_id: str | None,
                               scopes: tuple[str, ...], salt: bytes, secret_hash: bytes,
                               expires_at: datetime | None) -> ApiToken:
        async with self._tx() as conn:
            if await conn.fetchval("SELECT 1 FROM api_tokens WHERE name = $1", name):
                raise ConflictError(f"token name {name!r} is already used")
            await conn.execute(
                "INSERT INTO api_tokens (id, name, app_id, scopes, salt, secret_hash, status, "
                "created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, 'active', $7, $8)",
                token_id, name, app_id, json.dumps(scopes), salt, secret_hash, now_micros(),
                to_micros(expires_at) if expires_at is not None else None)
            return await self._token(conn, token_id)

    @staticmethod
    async def _token(conn: asyncpg.Connection, ref: str) -> ApiToken:
        return row_to_token(await statements.named(conn, lookup.API_TOKEN,
                                                   statements.TOKEN_LOOKUP_SQL, ref))

    async def all_api_tokens(self) -> list[ApiToken]:
        rows = await self._fetch(
            f"SELECT {TOKEN_COLUMNS} FROM api_tokens t ORDER BY t.created_at, t.id")
        return [row_to_token(r) for r in rows]

    async def load_api_token(self, ref: str) -> ApiToken:
        async with self._tx(snapshot=True) as conn:
            return await self._token(conn, ref)

    async def revoke_api_tokens(self, refs: tuple[str, ...]) -> list[ApiToken]:
        async with self._tx() as conn:
            tokens = [await self._token(conn, ref) for ref in refs]
            await conn.execute("UPDATE api_tokens SET status = 'revoked' "
                               "WHERE id = ANY($1::text[])", [t.id for t in tokens])
            return [await self._token(conn, t.id) for t in tokens]

    async def touch_api_token(self, token_id: str, when: datetime) -> None:
        async with self._tx() as conn:
            await conn.execute("UPDATE api_tokens SET last_used = $1 WHERE id = $2",
                               to_micros(when), token_id)

    async def api_token_row(self, token_id: str) -> tuple[ApiToken, bytes, bytes] | None:
        rows = await self._fetch(
            f"SELECT {TOKEN_COLUMNS}, t.salt, t.secret_hash FROM api_tokens t WHERE t.id = $1",
            token_id)
        if not rows:
            return None
        return row_to_token(rows[0]), rows[0][-2], rows[0][-1]

    async def insert_device_token(self, token_id: str, key: str, device_id: str, salt: bytes,
                                  secret_hash: bytes, expires_at: datetime, keep: int) -> None:
        async with self._tx() as conn:
            await conn.execute(
                "INSERT INTO device_tokens (id, key, device_id, salt, secret_hash, created_at, "
                "expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                token_id, key, device_id, salt, secret_hash, now_micros(),
                to_micros(expires_at))
            # A device that logs in again and again keeps only its newest tokens.
            await conn.execute(
                "DELETE FROM device_tokens WHERE key = $1 AND device_id = $2 AND id NOT IN "
                "(SELECT id FROM device_tokens WHERE key = $1 AND device_id = $2 "
                "ORDER BY created_at DESC LIMIT $3)", key, device_id, keep)

    async def device_token_row(self, token_id: str) -> DeviceTokenRow | None:
        rows = await self._fetch(DEVICE_TOKEN_SQL, token_id)
        if not rows:
            return None
        return to_device_token_row(rows[0])

    async def prune_device_tokens(self, before: datetime, batch: int) -> int:
        async with self._tx() as conn:
            status = await conn.execute(
                "DELETE FROM device_tokens WHERE id IN (SELECT id FROM device_tokens "
                "WHERE expires_at < $1 LIMIT $2)", to_micros(before), batch)
        return affected(status)

    # --- status -------------------------------------------------------------------------

    async def mark_keys_used(self, keys: tuple[str, ...], when: datetime) -> None:
        async with self._tx() as conn:
            await conn.execute("UPDATE access_keys SET last_used = $1 WHERE key = ANY($2::text[])",
                               to_micros(when), list(keys))

    async def set_devices_connected(self, ids: tuple[str, ...], connected: bool,
                                    when: datetime) -> None:
        async with self._tx() as conn:
            await conn.execute(
                "UPDATE devices SET connected = $1, last_seen = $2 WHERE id = ANY($3::text[])",
                int(connected), to_micros(when), list(ids))

    # --- change feed --------------------------------------------------------------------

    async def change_marker(self) -> tuple[int, int]:
        """Moves whenever a change-feed row is committed (ids become visible in order)."""
        return (await self.latest_change_id(), 0)

    async def latest_change_id(self) -> int:
        return await self._value("SELECT COALESCE(MAX(id), 0) FROM changes")

    async def changes_since(self, change_id: int, limit: int) -> list[Change]:
        rows = await self._fetch(
            "SELECT id, kind, subject, at FROM changes WHERE id > $1 ORDER BY id LIMIT $2",
            change_id, limit)
        return [Change(int(r[0]), str(r[1]), str(r[2]), from_micros(r[3])) for r in rows]

    async def add_change(self, kind: str, subject: str) -> None:
        async with self._tx(feed=True) as conn:
            await conn.execute("SELECT keybroker_add_change($1, $2)", kind, subject)

    async def prune_changes(self, before: datetime, up_to: int | None, batch: int) -> int:
        """One id range of at most ``batch`` rows from the oldest, in one short write."""
        async with self._tx() as conn:
            oldest = await conn.fetchval("SELECT MIN(id) FROM changes")
            if oldest is None:
                return 0
            last = oldest + batch - 1 if up_to is None else min(oldest + batch - 1, up_to)
            status = await conn.execute(
                "DELETE FROM changes WHERE id BETWEEN $1 AND $2 AND at < $3",
                oldest, last, to_micros(before))
        return affected(status)

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
