"""SQL of the connection snapshots and credential checks (keystore.connections) for
SQLite: the tables of schemas 8 and 9. keystore.sharedops.SharedConnections runs these
steps; the PostgreSQL twin is keystore.postgres.connections.

Each step takes the connection of an open transaction (the backend holds its lock).
"""

# SQL text in this module is assembled only from constants; every value is a bound
# parameter.
# ruff: noqa: S608

from __future__ import annotations

import json

import aiosqlite

from keystore.models import ConnectionSnapshot
from keystore.rows import SNAPSHOT_COLUMNS, row_to_snapshot, to_micros
from keystore.sqlite.db import KEY_COLUMNS

SNAPSHOT_SQL = f"SELECT {SNAPSHOT_COLUMNS} FROM connection_snapshots s WHERE s.client_id = ?"
# One primary-key read per request of a connection: the snapshot, its device's
# application and its key as it is now.
CONNECTION_SQL = (
    f"SELECT {SNAPSHOT_COLUMNS}, (SELECT app_id FROM devices WHERE id = s.client_id), "
    + KEY_COLUMNS
    + " FROM connection_snapshots s JOIN access_keys k ON k.key = s.key WHERE s.client_id = ?"
)
SCOPE_DEVICES_SQL = "SELECT devices FROM scope_snapshots WHERE digest = ?"
KEY_CONNECTIONS_SQL = (f"SELECT {SNAPSHOT_COLUMNS} FROM connection_snapshots s "
                       "WHERE s.key = ? ORDER BY s.client_id")
KEYS_EXPIRING_SQL = ("SELECT key FROM access_keys WHERE expires_at > ? AND expires_at <= ? "
                     "ORDER BY expires_at")
CREDENTIAL_CHECK_SQL = "SELECT key, checked_at FROM credential_checks WHERE client_id = ?"


async def load_snapshot(conn: aiosqlite.Connection,
                        client_id: str) -> ConnectionSnapshot | None:
    rows = list(await conn.execute_fetchall(SNAPSHOT_SQL, (client_id,)))
    return row_to_snapshot(rows[0]) if rows else None


async def store_scope(conn: aiosqlite.Connection, digest: str, devices: list[str],
                      at: int) -> None:
    """The device list of a scope, unless stored already (same digest, same list)."""
    await conn.execute(
        "INSERT INTO scope_snapshots (digest, devices, created_at) VALUES (?, ?, ?) "
        "ON CONFLICT (digest) DO NOTHING", (digest, json.dumps(devices), at))


async def scope_stored(conn: aiosqlite.Connection, digest: str) -> bool:
    """Whether the scope is stored (the write lock keeps it so until commit)."""
    rows = await conn.execute_fetchall("SELECT 1 FROM scope_snapshots WHERE digest = ?",
                                       (digest,))
    return bool(list(rows))


async def store_snapshot(conn: aiosqlite.Connection, snapshot: ConnectionSnapshot) -> None:
    await conn.execute(
        "INSERT INTO connection_snapshots (client_id, key, scope, policy, client_ip, "
        "created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (client_id) DO UPDATE SET "
        "key = excluded.key, scope = excluded.scope, policy = excluded.policy, "
        "client_ip = excluded.client_ip, created_at = excluded.created_at",
        (snapshot.client_id, snapshot.key, snapshot.scope, snapshot.policy,
         snapshot.client_ip, to_micros(snapshot.created_at)))


async def store_credential_check(conn: aiosqlite.Connection, client_id: str, key: str,
                                 at: int) -> None:
    """Record (or renew) the check, when ``client_id`` is a device."""
    await conn.execute(
        "INSERT INTO credential_checks (client_id, key, checked_at) SELECT ?, ?, ? "
        "WHERE EXISTS (SELECT 1 FROM devices WHERE id = ?) ON CONFLICT (client_id) DO "
        "UPDATE SET key = excluded.key, checked_at = excluded.checked_at",
        (client_id, key, at, client_id))


async def prune_scopes(conn: aiosqlite.Connection, before: int, batch: int) -> int:
    """Scope lists no connection refers to any more, stored before ``before``."""
    cursor = await conn.execute(
        "DELETE FROM scope_snapshots WHERE digest IN (SELECT p.digest FROM "
        "scope_snapshots p WHERE p.created_at < ? AND NOT EXISTS (SELECT 1 FROM "
        "connection_snapshots s WHERE s.scope = p.digest) LIMIT ?)", (before, batch))
    return max(cursor.rowcount, 0)
