"""The SQLite backend: one aiosqlite connection, one transaction per operation.

An asyncio.Lock serialises operations on the single connection: without it, one
coroutine's statements could run inside another's open transaction. Writes take the
write lock up front (BEGIN IMMEDIATE, waiting up to busy_timeout for another process) so
checks done inside them stay true. The CONNECT lookup is a primary-key read of about
10 µs, so it runs synchronously on a private read-only connection rather than paying
aiosqlite's thread round trip (WAL readers are not blocked by writers; if the file is
busy anyway, it falls back to the shared connection).
"""

# SQL text in this module is assembled only from constants, whitelisted names and
# '?' placeholder counts; every value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import urllib.parse
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime
from typing import Any

import aiosqlite

from keystore import credentials, lookup, plans
from keystore.backend import ConnectRow, DeviceTokenRow, Page
from keystore.errors import ConflictError, NotFoundError, ValidationError
from keystore.keyspec import KeySpec
from keystore.models import AccessKey, ApiToken, Application, Change, Device, KeyStatus, Tag
from keystore.query import compile_query, like_to_glob
from keystore.rows import (
    APP_COLUMNS,
    DEVICE_SORT,
    KEY_COLUMN_COUNT,
    KEY_SORT,
    LAST_USED,
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
from keystore.sqlite import connections, statements
from keystore.sqlite.db import (
    DEVICE_COLUMNS,
    KEY_COLUMNS,
    chunks,
    connect,
    placeholders,
)
from keystore.sqlite.migrations import migrate
from keystore.sqlite.statements import CONNECT_SQL, SCOPE_SQL

log = logging.getLogger(__name__)

PARSED_KEYS = 4096  # parsed key rows kept for CONNECT (see _key_from_row)
DEVICE_TOKEN_SQL = (
    "SELECT (SELECT value FROM meta WHERE name = 'auth_generation'), t.device_id, t.salt, "
    "t.secret_hash, t.expires_at, " + KEY_COLUMNS
    + " FROM device_tokens t JOIN access_keys k ON k.key = t.key WHERE t.id = ?"
)


class SqliteBackend(SharedOps, SharedConnections):
    statements = statements
    connections = connections

    def __init__(self, conn: aiosqlite.Connection, path: str) -> None:
        self._conn = conn
        self.path = path
        self.location = path
        self._lock = asyncio.Lock()
        self._closed = False
        # Commits on our own connection do not move PRAGMA data_version; count them.
        self._local_commits = 0
        self._ro: sqlite3.Connection | None = None
        self._parsed: OrderedDict[tuple[Any, ...], AccessKey] = OrderedDict()

    @classmethod
    async def open(cls, path: str, *, create: bool = True) -> SqliteBackend:
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

    # --- transaction plumbing ---------------------------------------------------------

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
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            await self._begin("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                if self._conn.in_transaction:
                    await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")
            self._local_commits += 1

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[aiosqlite.Connection]:
        """A consistent snapshot for reads of more than one statement."""
        async with self._lock:
            await self._begin("BEGIN")
            try:
                yield self._conn
            finally:
                if self._conn.in_transaction:
                    await self._conn.execute("COMMIT")

    async def _fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        async with self._lock:
            return list(await self._conn.execute_fetchall(sql, tuple(params)))

    async def _count(self, sql: str) -> int:
        return int((await self._fetchall(sql))[0][0])

    # --- applications -------------------------------------------------------------------

    async def insert_app(self, name: str, description: str | None,
                         max_keys: int | None) -> Application:
        now = now_micros()
        async with self._write() as conn:
            if await conn.execute_fetchall("SELECT 1 FROM applications WHERE name = ?",
                                           (name,)):
                raise ConflictError(f"application name {name!r} is already used")
            app_id = credentials.new_object_id()
            await conn.execute(
                "INSERT INTO applications (id, name, description, max_keys, created_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                (app_id, name, description, max_keys, now, now))
            return await statements.load_app(conn, app_id)

    async def load_app(self, ref: str) -> Application:
        async with self._lock:
            return await statements.load_app(self._conn, ref)

    async def all_apps(self) -> list[Application]:
        rows = await self._fetchall(f"SELECT {APP_COLUMNS} FROM applications a ORDER BY a.name")
        return [row_to_app(r) for r in rows]

    async def change_app(self, ref: str, changes: dict[str, Any]) -> Application:
        async with self._write() as conn:
            app = await statements.load_app(conn, ref)
            name = changes.get("name")
            if name is not None and await conn.execute_fetchall(
                    "SELECT 1 FROM applications WHERE name = ? AND id != ?", (name, app.id)):
                raise ConflictError(f"application name {name!r} is already used")
            if changes:
                assigns = ", ".join(f"{column} = ?" for column in changes)
                await conn.execute(
                    f"UPDATE applications SET {assigns}, updated_at = ? WHERE id = ?",
                    (*changes.values(), now_micros(), app.id))
            return await statements.load_app(conn, app.id)

    async def delete_apps(self, refs: tuple[str, ...]) -> list[Application]:
        """Delete applications with all their keys and devices (all, or none if one is
        missing). Triggers write a change for every key, device and application."""
        async with self._write() as conn:
            apps = [await statements.load_app(conn, ref) for ref in refs]
            for app in dict((a.id, a) for a in apps).values():
                await conn.execute("DELETE FROM access_keys WHERE app_id = ?", (app.id,))
                await conn.execute("DELETE FROM devices WHERE app_id = ?", (app.id,))
                await conn.execute("DELETE FROM applications WHERE id = ?", (app.id,))
        return apps

    # --- devices --------------------------------------------------------------------------

    async def upsert_devices(
        self, app_id: str, wanted: Mapping[str, tuple[str | None, frozenset[Tag]]]
    ) -> int:
        now = now_micros()
        touched = 0
        async with self._write() as conn:
            for batch in chunks(list(wanted), 20_000):
                touched += await statements.upsert_batch(conn, app_id, batch, dict(wanted), now)
        return touched

    async def load_device(self, app_id: str, device_id: str) -> Device:
        async with self._lock:
            return await statements.load_device(self._conn, app_id, device_id)

    async def all_devices(self, app_id: str) -> list[Device]:
        rows = await self._fetchall(
            f"SELECT {DEVICE_COLUMNS} FROM devices d WHERE d.app_id = ? ORDER BY d.id",
            (app_id,))
        return [row_to_device(r) for r in rows]

    async def delete_devices(self, app_id: str, device_ids: tuple[str, ...]) -> None:
        async with self._write() as conn:
            missing = await statements.missing_devices(conn, app_id, device_ids)
            if missing:
                raise NotFoundError(f"no device {missing[0]!r} (nothing removed)")
            for batch in chunks(device_ids):
                await conn.execute(
                    f"DELETE FROM devices WHERE id IN ({placeholders(len(batch))})", batch
                )

    async def page_devices(self, app_id: str, name_glob: str | None, sort: str,
                           descending: bool, offset: int, limit: int) -> Page:
        order = order_by(DEVICE_SORT, sort, descending, "d.id")
        where, params = "d.app_id = ?", [app_id]
        if name_glob is not None:
            where += " AND d.name GLOB ?"
            params.append(like_to_glob(name_glob))
        async with self._read() as conn:
            total = await statements.count(conn, f"SELECT count(*) FROM devices d WHERE {where}",
                                           tuple(params))
            rows = await conn.execute_fetchall(
                f"SELECT {DEVICE_COLUMNS} FROM devices d WHERE {where} ORDER BY {order} "
                "LIMIT ? OFFSET ?", (*params, limit, offset))
        return [row_to_device(r) for r in rows], total

    async def device_app(self, device_id: str) -> str | None:
        async with self._lock:
            return await statements.device_app(self._conn, device_id)

    async def count_devices(self, app_id: str | None) -> int:
        if app_id is None:
            return await self._count("SELECT count(*) FROM devices")
        rows = await self._fetchall("SELECT count(*) FROM devices WHERE app_id = ?", (app_id,))
        return int(rows[0][0])

    # --- keys -------------------------------------------------------------------------

    async def insert_keys(self, app_id: str, specs: list[KeySpec],
                          minted: list[tuple[str, str]], max_keys: int) -> dict[str, AccessKey]:
        """Insert validated keys after the checks that need the database: the
        application's key limit, device ids of this application, names not taken in it."""
        now = now_micros()
        names = [s.name for s in specs if s.name is not None]
        async with self._write() as conn:
            if max_keys:
                existing = await statements.count(
                    conn, "SELECT count(*) FROM access_keys WHERE app_id = ?", (app_id,))
                plans.check_key_limit(max_keys, existing, len(specs))
            missing = await statements.missing_devices(
                conn, app_id, tuple(dict.fromkeys(d for s in specs for d in s.device_ids)))
            if missing:
                raise ValidationError(f"unknown device id {missing[0]!r} in key device restriction")
            for batch in chunks(names):
                rows = await conn.execute_fetchall(
                    f"SELECT name FROM access_keys WHERE app_id = ? "
                    f"AND name IN ({placeholders(len(batch))})", (app_id, *batch),
                )
                for (taken,) in rows:
                    raise ConflictError(f"key name {taken!r} is already used by another key")
            return await statements.insert_keys(conn, app_id, specs, minted, now)

    async def load_key_by_id(self, app_id: str, key_id: str) -> AccessKey:
        rows = await self._fetchall(
            f"SELECT {KEY_COLUMNS} FROM access_keys k WHERE k.id = ? AND k.app_id = ?",
            (key_id, app_id))
        if not rows:
            raise NotFoundError(f"no access key with id {key_id!r}")
        return row_to_key(rows[0])

    async def page_keys(self, app_id: str, query: Mapping[str, Any] | str | None, sort: str,
                        descending: bool, offset: int, limit: int) -> Page:
        order = order_by(KEY_SORT, sort, descending, "k.key")
        where, params = compile_query(query)
        async with self._read() as conn:
            total = await statements.count(
                conn, f"SELECT count(*) FROM access_keys k WHERE k.app_id = ? AND ({where})",
                (app_id, *params))
            rows = await conn.execute_fetchall(
                f"SELECT {KEY_COLUMNS} FROM access_keys k WHERE k.app_id = ? AND ({where}) "
                f"ORDER BY {order} LIMIT ? OFFSET ?", (app_id, *params, limit, offset))
        return [row_to_key(r) for r in rows], total

    async def query_keys(self, app_id: str,
                         query: Mapping[str, Any] | str | None) -> list[AccessKey]:
        where, params = compile_query(query)
        rows = await self._fetchall(
            f"SELECT {KEY_COLUMNS} FROM access_keys k WHERE k.app_id = ? AND ({where}) "
            "ORDER BY k.created_at, k.key",
            (app_id, *params),
        )
        return [row_to_key(r) for r in rows]

    async def count_keys(self, app_id: str | None) -> int:
        if app_id is None:
            return await self._count("SELECT count(*) FROM access_keys")
        rows = await self._fetchall("SELECT count(*) FROM access_keys WHERE app_id = ?",
                                    (app_id,))
        return int(rows[0][0])

    async def change_key(self, app_id: str, ref: str, changes: dict[str, Any],
                         check: Callable[[AccessKey], None]) -> AccessKey:
        async with self._write() as conn:
            key = await statements.resolve_key(conn, app_id, ref)
            current = (await statements.load_keys(conn, [key]))[key]
            check(current)
            if changes.get("name") is not None:
                rows = await conn.execute_fetchall(
                    "SELECT key FROM access_keys WHERE app_id = ? AND name = ? AND key != ?",
                    (app_id, changes["name"], key),
                )
                if rows:
                    raise ConflictError(
                        f"key name {changes['name']!r} is already used by another key")
            if changes:
                await statements.apply_key_changes(conn, key, changes)
            return (await statements.load_keys(conn, [key]))[key]

    async def set_status(self, app_id: str, refs: tuple[str, ...],
                         status: KeyStatus) -> list[AccessKey]:
        async with self._write() as conn:
            full = list(dict.fromkeys([await statements.resolve_key(conn, app_id, ref)
                                       for ref in refs]))
            now = now_micros()
            await conn.executemany(
                "UPDATE access_keys SET status = ?, updated_at = ? WHERE key = ? AND status != ?",
                [(status.value, now, k, status.value) for k in full],
            )
            loaded = await statements.load_keys(conn, full)
        return [loaded[k] for k in full]

    async def delete_keys(self, app_id: str, refs: tuple[str, ...]) -> list[str]:
        async with self._write() as conn:
            full = list(dict.fromkeys([await statements.resolve_key(conn, app_id, ref)
                                       for ref in refs]))
            for batch in chunks(full):
                await conn.execute(
                    f"DELETE FROM access_keys WHERE key IN ({placeholders(len(batch))})", batch
                )
        return full

    # --- CONNECT ----------------------------------------------------------------------

    async def connect_row(self, key: str) -> ConnectRow:
        row = (await self._lookup(CONNECT_SQL, key))[0]
        if row[1] is None:
            return ConnectRow(int(row[0]), None, None, None)
        listed = None if row[-1] is None else frozenset(json.loads(row[-1]))
        return ConnectRow(int(row[0]), self._key_from_row(row[1 : 1 + KEY_COLUMN_COUNT]),
                          row[-3], row[-2], listed)

    async def _lookup(self, sql: str, *params: Any) -> list[Any]:
        rows = self._read_now(sql, params)
        return rows if rows is not None else await self._fetchall(sql, params)

    async def _rows(self, sql: str, *params: Any) -> list[Any]:
        return await self._fetchall(sql, params)

    def _read_now(self, sql: str, params: tuple[Any, ...]) -> list[Any] | None:
        """A primary-key lookup on the read-only connection, or None to use the async
        path."""
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

    def _key_from_row(self, row: tuple[Any, ...]) -> AccessKey:
        """Parse a key row, reusing the AccessKey of an identical row (the row is read
        fresh on every CONNECT; only its parse is cached). last_used, which changes on
        every connection, is left out of the identity and taken from the row."""
        identity = row[:LAST_USED] + row[LAST_USED + 1 :]
        cached = self._parsed.get(identity)
        if cached is None:
            cached = row_to_key(row)
            self._parsed[identity] = cached
            if len(self._parsed) > PARSED_KEYS:
                self._parsed.popitem(last=False)
        else:
            self._parsed.move_to_end(identity)
        last_used = from_micros(row[LAST_USED])
        return cached if cached.last_used == last_used else replace(cached, last_used=last_used)

    async def scope_of(self, key: AccessKey) -> frozenset[str]:
        """The devices of the key's application listed by id or carrying a listed tag
        pair: both halves are index lookups."""
        rows = await self._fetchall(SCOPE_SQL, (key.key, key.app_id, key.key, key.app_id))
        return frozenset(r[0] for r in rows)

    # --- API tokens ---------------------------------------------------------------------

    async def insert_api_token(self, token_id: str, name: str, app_id: str | None,
                               scopes: tuple[str, ...], salt: bytes, secret_hash: bytes,
                               expires_at: datetime | None) -> ApiToken:
        async with self._write() as conn:
            if await conn.execute_fetchall("SELECT 1 FROM api_tokens WHERE name = ?", (name,)):
                raise ConflictError(f"token name {name!r} is already used")
            await conn.execute(
                "INSERT INTO api_tokens (id, name, app_id, scopes, salt, secret_hash, status, "
                "created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, 'active', ?, ?)",
                (token_id, name, app_id, json.dumps(scopes), salt, secret_hash, now_micros(),
                 to_micros(expires_at) if expires_at is not None else None))
            return await self._token(conn, token_id)

    @staticmethod
    async def _token(conn: aiosqlite.Connection, ref: str) -> ApiToken:
        return row_to_token(await statements.named(conn, lookup.API_TOKEN,
                                                   statements.TOKEN_LOOKUP_SQL, ref))

    async def all_api_tokens(self) -> list[ApiToken]:
        rows = await self._fetchall(
            f"SELECT {TOKEN_COLUMNS} FROM api_tokens t ORDER BY t.created_at, t.id")
        return [row_to_token(r) for r in rows]

    async def load_api_token(self, ref: str) -> ApiToken:
        async with self._lock:
            return await self._token(self._conn, ref)

    async def revoke_api_tokens(self, refs: tuple[str, ...]) -> list[ApiToken]:
        async with self._write() as conn:
            tokens = [await self._token(conn, ref) for ref in refs]
            await conn.executemany("UPDATE api_tokens SET status = 'revoked' WHERE id = ?",
                                   [(t.id,) for t in tokens])
            return [await self._token(conn, t.id) for t in tokens]

    async def touch_api_token(self, token_id: str, when: datetime) -> None:
        async with self._write() as conn:
            await conn.execute("UPDATE api_tokens SET last_used = ? WHERE id = ?",
                               (to_micros(when), token_id))

    async def api_token_row(self, token_id: str) -> tuple[ApiToken, bytes, bytes] | None:
        rows = await self._fetchall(
            f"SELECT {TOKEN_COLUMNS}, t.salt, t.secret_hash FROM api_tokens t WHERE t.id = ?",
            (token_id,))
        if not rows:
            return None
        return row_to_token(rows[0]), rows[0][-2], rows[0][-1]

    async def insert_device_token(self, token_id: str, key: str, device_id: str, salt: bytes,
                                  secret_hash: bytes, expires_at: datetime, keep: int) -> None:
        async with self._write() as conn:
            await conn.execute(
                "INSERT INTO device_tokens (id, key, device_id, salt, secret_hash, created_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (token_id, key, device_id, salt, secret_hash, now_micros(),
                 to_micros(expires_at)))
            # A device that logs in again and again keeps only its newest tokens.
            await conn.execute(
                "DELETE FROM device_tokens WHERE key = ? AND device_id = ? AND id NOT IN "
                "(SELECT id FROM device_tokens WHERE key = ? AND device_id = ? "
                "ORDER BY created_at DESC LIMIT ?)", (key, device_id, key, device_id, keep))

    async def device_token_row(self, token_id: str) -> DeviceTokenRow | None:
        rows = await self._fetchall(DEVICE_TOKEN_SQL, (token_id,))
        if not rows:
            return None
        return to_device_token_row(rows[0])

    async def prune_device_tokens(self, before: datetime, batch: int) -> int:
        async with self._write() as conn:
            cursor = await conn.execute(
                "DELETE FROM device_tokens WHERE id IN (SELECT id FROM device_tokens "
                "WHERE expires_at < ? LIMIT ?)", (to_micros(before), batch))
            return max(cursor.rowcount, 0)

    # --- status -------------------------------------------------------------------------

    async def mark_keys_used(self, keys: tuple[str, ...], when: datetime) -> None:
        stamp = to_micros(when)
        async with self._write() as conn:
            await conn.executemany("UPDATE access_keys SET last_used = ? WHERE key = ?",
                                   [(stamp, k) for k in keys])

    async def set_devices_connected(self, ids: tuple[str, ...], connected: bool,
                                    when: datetime) -> None:
        stamp = to_micros(when)
        async with self._write() as conn:
            await conn.executemany(
                "UPDATE devices SET connected = ?, last_seen = ? WHERE id = ?",
                [(int(connected), stamp, d) for d in ids])

    # --- change feed --------------------------------------------------------------------

    async def change_marker(self) -> tuple[int, int]:
        """Moves whenever anyone commits: PRAGMA data_version for other connections (the
        CLI in another process), a counter for our own."""
        return (await self._count("PRAGMA data_version"), self._local_commits)

    async def latest_change_id(self) -> int:
        return await self._count("SELECT COALESCE(MAX(id), 0) FROM changes")

    async def changes_since(self, change_id: int, limit: int) -> list[Change]:
        rows = await self._fetchall(
            "SELECT id, kind, subject, at FROM changes WHERE id > ? ORDER BY id LIMIT ?",
            (change_id, limit),
        )
        return [Change(int(r[0]), str(r[1]), str(r[2]), from_micros(r[3])) for r in rows]

    async def add_change(self, kind: str, subject: str) -> None:
        async with self._write() as conn:
            await conn.execute("INSERT INTO changes (kind, subject, at) VALUES (?, ?, ?)",
                               (kind, subject, now_micros()))

    async def prune_changes(self, before: datetime, up_to: int | None, batch: int) -> int:
        """One rowid range of at most ``batch`` rows from the oldest, in one short write."""
        async with self._write() as conn:
            async with conn.execute("SELECT MIN(id) FROM changes") as cursor:
                row = await cursor.fetchone()
            oldest = row[0] if row else None
            if oldest is None:
                return 0
            last = oldest + batch - 1 if up_to is None else min(oldest + batch - 1, up_to)
            cursor = await conn.execute(
                "DELETE FROM changes WHERE id BETWEEN ? AND ? AND at < ?",
                (oldest, last, to_micros(before)),
            )
            return max(cursor.rowcount, 0)

    async def watch_changes(self, wake: Callable[[], None]) -> bool:
        """Nothing to push: a file has no notifications (the marker is polled)."""
        return False
