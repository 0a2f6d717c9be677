"""The SQLite side of connection snapshots (keystore.connections), mixed into
SqliteBackend: the tables of migration 7."""

# SQL text in this module is assembled only from constants; every value is a bound
# parameter.
# ruff: noqa: S608

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any

import aiosqlite

from keystore.backend import ConnectionRow
from keystore.errors import NotFoundError
from keystore.models import AccessKey, ConnectionSnapshot
from keystore.sqlite.db import KEY_COLUMN_COUNT, KEY_COLUMNS, from_micros, to_micros

SNAPSHOT_COLUMNS = "s.client_id, s.key, s.scope, s.policy, s.client_ip, s.created_at"
# One primary-key read per request of a connection: the snapshot, its key as it is now
# and its device's application.
CONNECTION_SQL = (
    f"SELECT {SNAPSHOT_COLUMNS}, (SELECT app_id FROM devices WHERE id = s.client_id), "
    + KEY_COLUMNS
    + " FROM connection_snapshots s JOIN access_keys k ON k.key = s.key WHERE s.client_id = ?"
)


def row_to_snapshot(row: Sequence[Any]) -> ConnectionSnapshot:
    created = from_micros(row[5])
    assert created is not None
    return ConnectionSnapshot(client_id=row[0], key=row[1], scope=row[2], policy=row[3],
                              client_ip=row[4], created_at=created)


class SqliteConnections:
    """Needs the backend's transaction plumbing and its read-only fast path."""

    def _write(self) -> AbstractAsyncContextManager[aiosqlite.Connection]:
        raise NotImplementedError

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        raise NotImplementedError

    def _read_now(self, sql: str, params: tuple[Any, ...]) -> list[Any] | None:
        raise NotImplementedError

    def _key_from_row(self, row: tuple[Any, ...]) -> AccessKey:
        raise NotImplementedError

    async def connection_snapshot(self, client_id: str) -> ConnectionSnapshot | None:
        sql = f"SELECT {SNAPSHOT_COLUMNS} FROM connection_snapshots s WHERE s.client_id = ?"
        rows = self._read_now(sql, (client_id,))
        if rows is None:
            rows = await self._fetchall(sql, (client_id,))
        return row_to_snapshot(rows[0]) if rows else None

    async def put_connection(self, snapshot: ConnectionSnapshot,
                             devices: tuple[str, ...] | None) -> ConnectionSnapshot | None:
        """Store the snapshot of ``snapshot.client_id``, and its scope's device list when
        ``devices`` is given (None: stored already, else NotFoundError); returns the
        snapshot it replaces."""
        async with self._write() as conn:
            if snapshot.scope is not None and devices is not None:
                await conn.execute(
                    "INSERT INTO scope_snapshots (digest, devices, created_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (digest) DO NOTHING",
                    (snapshot.scope, json.dumps(sorted(devices)), to_micros(snapshot.created_at)))
            elif snapshot.scope is not None and not await conn.execute_fetchall(
                    "SELECT 1 FROM scope_snapshots WHERE digest = ?", (snapshot.scope,)):
                raise NotFoundError(f"no stored scope {snapshot.scope!r}")
            rows = list(await conn.execute_fetchall(
                f"SELECT {SNAPSHOT_COLUMNS} FROM connection_snapshots s WHERE s.client_id = ?",
                (snapshot.client_id,)))
            await conn.execute(
                "INSERT INTO connection_snapshots (client_id, key, scope, policy, client_ip, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (client_id) DO UPDATE SET "
                "key = excluded.key, scope = excluded.scope, policy = excluded.policy, "
                "client_ip = excluded.client_ip, created_at = excluded.created_at",
                (snapshot.client_id, snapshot.key, snapshot.scope, snapshot.policy,
                 snapshot.client_ip, to_micros(snapshot.created_at)))
        return row_to_snapshot(rows[0]) if rows else None

    async def connection_row(self, client_id: str) -> ConnectionRow | None:
        rows = self._read_now(CONNECTION_SQL, (client_id,))
        if rows is None:
            rows = await self._fetchall(CONNECTION_SQL, (client_id,))
        if not rows:
            return None
        row = rows[0]
        key = self._key_from_row(tuple(row[7 : 7 + KEY_COLUMN_COUNT]))
        return ConnectionRow(row_to_snapshot(row), key, row[6])

    async def scope_devices(self, digest: str) -> frozenset[str] | None:
        rows = await self._fetchall("SELECT devices FROM scope_snapshots WHERE digest = ?",
                                    (digest,))
        return frozenset(json.loads(rows[0][0])) if rows else None

    async def connections_of_key(self, key: str) -> list[ConnectionSnapshot]:
        rows = await self._fetchall(
            f"SELECT {SNAPSHOT_COLUMNS} FROM connection_snapshots s WHERE s.key = ? "
            "ORDER BY s.client_id", (key,))
        return [row_to_snapshot(row) for row in rows]

    async def keys_expiring(self, after: datetime, until: datetime) -> list[str]:
        rows = await self._fetchall(
            "SELECT key FROM access_keys WHERE expires_at > ? AND expires_at <= ? "
            "ORDER BY expires_at", (to_micros(after), to_micros(until)))
        return [str(row[0]) for row in rows]

    async def prune_connections(self, before: datetime, batch: int) -> int:
        """Scope lists no connection refers to any more, stored before ``before``."""
        async with self._write() as conn:
            cursor = await conn.execute(
                "DELETE FROM scope_snapshots WHERE digest IN (SELECT p.digest FROM "
                "scope_snapshots p WHERE p.created_at < ? AND NOT EXISTS (SELECT 1 FROM "
                "connection_snapshots s WHERE s.scope = p.digest) LIMIT ?)",
                (to_micros(before), batch))
            return max(cursor.rowcount, 0)
