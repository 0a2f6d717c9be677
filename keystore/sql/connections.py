"""Connection snapshots and credential checks of external engines (keystore.connections)
in the SQL keystore.

A snapshot refers to its scope's stored device list by foreign key, so the list is
locked once seen (where writers run side by side): a concurrent prune cannot delete it
before the snapshot that needs it commits, and the prune skips lists a writer holds.
"""

# SQL text in this module is assembled only from constants and a dialect's fragments;
# every value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

import json
from datetime import datetime

from keystore.backend import ConnectionRow
from keystore.errors import NotFoundError
from keystore.models import ConnectionSnapshot, CredentialCheck
from keystore.rows import (
    KEY_COLUMN_COUNT,
    SNAPSHOT_COLUMN_COUNT,
    SNAPSHOT_COLUMNS,
    as_list,
    from_micros,
    row_to_snapshot,
    to_micros,
)
from keystore.sql.base import Reader, SqlBase

SNAPSHOT_SQL = f"SELECT {SNAPSHOT_COLUMNS} FROM connection_snapshots s WHERE s.client_id = $1"


class SqlConnections(SqlBase):
    async def connection_snapshot(self, client_id: str) -> ConnectionSnapshot | None:
        return await self._snapshot(self.db, client_id)

    async def _snapshot(self, conn: Reader, client_id: str) -> ConnectionSnapshot | None:
        rows = await conn.fetch(SNAPSHOT_SQL, client_id)
        return row_to_snapshot(rows[0]) if rows else None

    async def put_connection(self, snapshot: ConnectionSnapshot,
                             devices: tuple[str, ...] | None) -> ConnectionSnapshot | None:
        """Store the snapshot of ``snapshot.client_id``, and its scope's device list when
        ``devices`` is given (None: stored already, else NotFoundError naming the scope);
        returns the snapshot it replaces. A client id that is no device is NotFoundError."""
        async with self.db.transaction() as tx:
            if await self._device_app(tx, snapshot.client_id) is None:
                raise NotFoundError(f"no device {snapshot.client_id!r}")
            if snapshot.scope is not None:
                if devices is not None:
                    await tx.execute(
                        "INSERT INTO scope_snapshots (digest, devices, created_at) "
                        "VALUES ($1, $2, $3) ON CONFLICT (digest) DO NOTHING",
                        snapshot.scope, json.dumps(sorted(devices)),
                        to_micros(snapshot.created_at))
                if await tx.value("SELECT 1 FROM scope_snapshots WHERE digest = $1"
                                  + self.spelling.row_lock("KEY SHARE"), snapshot.scope) is None:
                    raise NotFoundError(f"no stored scope {snapshot.scope!r}")
            previous = await self._snapshot(tx, snapshot.client_id)
            await tx.execute(
                "INSERT INTO connection_snapshots (client_id, key, scope, policy, client_ip, "
                "created_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (client_id) DO UPDATE "
                "SET key = excluded.key, scope = excluded.scope, policy = excluded.policy, "
                "client_ip = excluded.client_ip, created_at = excluded.created_at",
                snapshot.client_id, snapshot.key, snapshot.scope, snapshot.policy,
                snapshot.client_ip, to_micros(snapshot.created_at))
        return previous

    async def connection_row(self, client_id: str) -> ConnectionRow | None:
        rows = await self.db.lookup(self.sql.connection, client_id)
        if not rows:
            return None
        row = rows[0]
        after = SNAPSHOT_COLUMN_COUNT + 1  # the snapshot, then its device's application
        key = self._parse_key(tuple(row[after : after + KEY_COLUMN_COUNT]))
        return ConnectionRow(row_to_snapshot(row), key, row[SNAPSHOT_COLUMN_COUNT])

    async def scope_devices(self, digest: str) -> frozenset[str] | None:
        rows = await self.db.fetch("SELECT devices FROM scope_snapshots WHERE digest = $1",
                                   digest)
        return frozenset(as_list(rows[0][0])) if rows else None

    async def connections_of_key(self, key: str) -> list[ConnectionSnapshot]:
        rows = await self.db.fetch(f"SELECT {SNAPSHOT_COLUMNS} FROM connection_snapshots s "
                                   "WHERE s.key = $1 ORDER BY s.client_id", key)
        return [row_to_snapshot(row) for row in rows]

    async def keys_expiring(self, after: datetime, until: datetime) -> list[str]:
        rows = await self.db.fetch("SELECT key FROM access_keys WHERE expires_at > $1 "
                                   "AND expires_at <= $2 ORDER BY expires_at",
                                   to_micros(after), to_micros(until))
        return [str(row[0]) for row in rows]

    async def put_credential_check(self, client_id: str, key: str, at: datetime) -> None:
        """Record (or renew) the check, when ``client_id`` is a device."""
        async with self.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO credential_checks (client_id, key, checked_at) SELECT $1, $2, $3 "
                "WHERE EXISTS (SELECT 1 FROM devices WHERE id = $1) ON CONFLICT (client_id) "
                "DO UPDATE SET key = excluded.key, checked_at = excluded.checked_at",
                client_id, key, to_micros(at))

    async def credential_check(self, client_id: str) -> CredentialCheck | None:
        rows = await self.db.lookup(
            "SELECT key, checked_at FROM credential_checks WHERE client_id = $1", client_id)
        if not rows:
            return None
        checked_at = from_micros(rows[0][1])
        assert checked_at is not None
        return CredentialCheck(client_id, str(rows[0][0]), checked_at)

    async def prune_connections(self, before: datetime, batch: int) -> int:
        """Scope lists no connection refers to any more, stored before ``before``; lists a
        writer holds (it is about to refer to them) are skipped."""
        async with self.db.transaction() as tx:
            return await tx.execute(
                "DELETE FROM scope_snapshots WHERE digest IN (SELECT p.digest FROM "
                "scope_snapshots p WHERE p.created_at < $1 AND NOT EXISTS (SELECT 1 FROM "
                "connection_snapshots s WHERE s.scope = p.digest) LIMIT $2"
                + self.spelling.row_lock("UPDATE SKIP LOCKED") + ")",
                to_micros(before), batch)
