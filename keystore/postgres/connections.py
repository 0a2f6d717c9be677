"""SQL of the connection snapshots and credential checks (keystore.connections) for
PostgreSQL: the tables of schemas 8 and 9. keystore.sharedops.SharedConnections runs these
steps; the SQLite twin is keystore.sqlite.connections.

Each step takes the connection of an open READ COMMITTED transaction. A snapshot refers
to its scope by foreign key, so the scope row is locked (FOR KEY SHARE) once seen: a
concurrent prune cannot delete it before the snapshot that needs it commits.
"""

# SQL text in this module is assembled only from constants; every value is a bound
# parameter.
# ruff: noqa: S608

from __future__ import annotations

import json

import asyncpg

from keystore.models import ConnectionSnapshot
from keystore.postgres.db import KEY_COLUMNS, affected
from keystore.rows import SNAPSHOT_COLUMNS, row_to_snapshot, to_micros

SNAPSHOT_SQL = f"SELECT {SNAPSHOT_COLUMNS} FROM connection_snapshots s WHERE s.client_id = $1"
# One primary-key read per request of a connection: the snapshot, its device's
# application and its key as it is now.
CONNECTION_SQL = (
    f"SELECT {SNAPSHOT_COLUMNS}, (SELECT app_id FROM devices WHERE id = s.client_id), "
    + KEY_COLUMNS
    + " FROM connection_snapshots s JOIN access_keys k ON k.key = s.key WHERE s.client_id = $1"
)
SCOPE_DEVICES_SQL = "SELECT devices FROM scope_snapshots WHERE digest = $1"
KEY_CONNECTIONS_SQL = (f"SELECT {SNAPSHOT_COLUMNS} FROM connection_snapshots s "
                       "WHERE s.key = $1 ORDER BY s.client_id")
KEYS_EXPIRING_SQL = ("SELECT key FROM access_keys WHERE expires_at > $1 AND expires_at <= $2 "
                     "ORDER BY expires_at")
CREDENTIAL_CHECK_SQL = "SELECT key, checked_at FROM credential_checks WHERE client_id = $1"


async def load_snapshot(conn: asyncpg.Connection,
                        client_id: str) -> ConnectionSnapshot | None:
    row = await conn.fetchrow(SNAPSHOT_SQL, client_id)
    return row_to_snapshot(row) if row is not None else None


async def store_scope(conn: asyncpg.Connection, digest: str, devices: list[str],
                      at: int) -> None:
    """The device list of a scope, unless stored already (same digest, same list)."""
    await conn.execute(
        "INSERT INTO scope_snapshots (digest, devices, created_at) VALUES ($1, $2, $3) "
        "ON CONFLICT (digest) DO NOTHING", digest, json.dumps(devices), at)


async def scope_stored(conn: asyncpg.Connection, digest: str) -> bool:
    """Whether the scope is stored; locks it against deletion until commit."""
    found = await conn.fetchval(
        "SELECT 1 FROM scope_snapshots WHERE digest = $1 FOR KEY SHARE", digest)
    return found is not None


async def store_snapshot(conn: asyncpg.Connection, snapshot: ConnectionSnapshot) -> None:
    await conn.execute(
        "INSERT INTO connection_snapshots (client_id, key, scope, policy, client_ip, "
        "created_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (client_id) DO UPDATE SET "
        "key = excluded.key, scope = excluded.scope, policy = excluded.policy, "
        "client_ip = excluded.client_ip, created_at = excluded.created_at",
        snapshot.client_id, snapshot.key, snapshot.scope, snapshot.policy,
        snapshot.client_ip, to_micros(snapshot.created_at))


async def store_credential_check(conn: asyncpg.Connection, client_id: str, key: str,
                                 at: int) -> None:
    """Record (or renew) the check, when ``client_id`` is a device."""
    await conn.execute(
        "INSERT INTO credential_checks (client_id, key, checked_at) SELECT $1, $2, $3 "
        "WHERE EXISTS (SELECT 1 FROM devices WHERE id = $1) ON CONFLICT (client_id) DO "
        "UPDATE SET key = excluded.key, checked_at = excluded.checked_at",
        client_id, key, at)


async def prune_scopes(conn: asyncpg.Connection, before: int, batch: int) -> int:
    """Scope lists no connection refers to any more, stored before ``before``; rows a
    writer holds (it is about to refer to them) are skipped."""
    status = await conn.execute(
        "DELETE FROM scope_snapshots WHERE digest IN (SELECT p.digest FROM "
        "scope_snapshots p WHERE p.created_at < $1 AND NOT EXISTS (SELECT 1 FROM "
        "connection_snapshots s WHERE s.scope = p.digest) LIMIT $2 FOR UPDATE SKIP LOCKED)",
        before, batch)
    return affected(status)
