"""Backend operations that are the same steps on either database: a backend provides its
transactions (``_write``, ``_read``), its one-statement reads (``_lookup``, ``_rows``) and its
``statements`` and ``connections`` modules (the SQL of each step, in its dialect), and
these run them. What differs between SQLite and PostgreSQL stays in the backends; what a
step decides lives in keystore.plans.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Protocol

from keystore import plans
from keystore.backend import ConnectionRow, UntagSpec
from keystore.errors import NotFoundError
from keystore.models import AccessKey, ConnectionSnapshot, CredentialCheck, Device, Tag
from keystore.rows import (
    KEY_COLUMN_COUNT,
    SNAPSHOT_COLUMN_COUNT,
    as_list,
    from_micros,
    now_micros,
    row_to_key,
    row_to_snapshot,
    to_micros,
)


class Statements(Protocol):
    """The steps a backend's statements module offers (``conn``: its connection type)."""

    async def device_app(self, conn: Any, device_id: str) -> str | None: ...
    async def load_device(self, conn: Any, app_id: str, device_id: str) -> Device: ...
    async def insert_device(self, conn: Any, app_id: str, device_id: str, name: str | None,
                            now: int) -> None: ...
    async def rename_device(self, conn: Any, device_id: str, name: str | None) -> None: ...
    async def touch_device(self, conn: Any, device_id: str) -> None: ...
    async def add_device_tags(self, conn: Any, app_id: str,
                              rows: Sequence[tuple[str, str, str]]) -> None: ...
    async def drop_device_tags(self, conn: Any, rows: Sequence[tuple[str, str, str]]) -> None: ...
    async def resolve_key(self, conn: Any, app_id: str, ref: str) -> str: ...
    async def load_keys(self, conn: Any, keys: Iterable[str]) -> dict[str, AccessKey]: ...


class ConnectionStatements(Protocol):
    """The connection-snapshot steps of a backend's ``connections`` module: its SQL
    constants (the parameters of each in the order named) and its write steps."""

    SNAPSHOT_SQL: str  # client id
    CONNECTION_SQL: str  # client id
    SCOPE_DEVICES_SQL: str  # digest
    KEY_CONNECTIONS_SQL: str  # key
    KEYS_EXPIRING_SQL: str  # after, until (microseconds)
    CREDENTIAL_CHECK_SQL: str  # client id

    async def load_snapshot(self, conn: Any, client_id: str) -> ConnectionSnapshot | None: ...
    async def store_scope(self, conn: Any, digest: str, devices: list[str],
                          at: int) -> None: ...
    async def scope_stored(self, conn: Any, digest: str) -> bool: ...
    async def store_snapshot(self, conn: Any, snapshot: ConnectionSnapshot) -> None: ...
    async def prune_scopes(self, conn: Any, before: int, batch: int) -> int: ...
    async def store_credential_check(self, conn: Any, client_id: str, key: str,
                                     at: int) -> None: ...


class SharedOps:
    statements: Statements

    def _write(self) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    def _read(self) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    async def insert_device(self, app_id: str, device_id: str, name: str | None,
                            tags: tuple[Tag, ...]) -> Device:
        now = now_micros()
        sql = self.statements
        async with self._write() as conn:
            plans.check_new_device(device_id, await sql.device_app(conn, device_id), app_id)
            await sql.insert_device(conn, app_id, device_id, name, now)
            await sql.add_device_tags(conn, app_id, [(device_id, k, v) for k, v in tags])
            return await sql.load_device(conn, app_id, device_id)

    async def add_tags(self, app_id: str, device_id: str, tags: tuple[Tag, ...]) -> Device:
        sql = self.statements
        async with self._write() as conn:
            before = await sql.load_device(conn, app_id, device_id)
            added = [p for p in tags if p not in before.tags]
            if added:
                await sql.add_device_tags(conn, app_id, [(before.id, k, v) for k, v in added])
                await sql.touch_device(conn, before.id)
            return await sql.load_device(conn, app_id, before.id)

    async def remove_tags(self, app_id: str, device_id: str, specs: list[UntagSpec]) -> Device:
        sql = self.statements
        async with self._write() as conn:
            before = await sql.load_device(conn, app_id, device_id)
            doomed = plans.doomed_tags(before, specs)
            if doomed:
                await sql.drop_device_tags(conn, [(before.id, k, v) for k, v in doomed])
                await sql.touch_device(conn, before.id)
            return await sql.load_device(conn, app_id, before.id)

    async def change_device(self, app_id: str, device_id: str, name: Any,
                            tags: tuple[Tag, ...] | None) -> Device:
        """Set the name (``...`` leaves it) and replace the tag set (None leaves it)."""
        sql = self.statements
        async with self._write() as conn:
            before = await sql.load_device(conn, app_id, device_id)
            edit = plans.device_edit(before, name, tags)
            if edit.rename:
                await sql.rename_device(conn, before.id, name)
            await sql.drop_device_tags(conn, edit.drop)
            await sql.add_device_tags(conn, app_id, edit.add)
            if edit.touched:
                await sql.touch_device(conn, before.id)
            return await sql.load_device(conn, app_id, before.id)

    async def load_key(self, app_id: str, ref: str) -> AccessKey:
        sql = self.statements
        async with self._read() as conn:
            key = await sql.resolve_key(conn, app_id, ref)
            return (await sql.load_keys(conn, [key]))[key]

    async def keys_by_id(self, keys: Iterable[str]) -> dict[str, AccessKey]:
        async with self._read() as conn:
            return await self.statements.load_keys(conn, list(dict.fromkeys(keys)))


class SharedConnections:
    """The Backend's connection-snapshot operations (keystore.connections)."""

    statements: Statements
    connections: ConnectionStatements

    def _write(self) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    async def _lookup(self, sql: str, *params: Any) -> list[Any]:
        """The rows of a primary-key read (SQLite runs it on its fast read-only path)."""
        raise NotImplementedError

    async def _rows(self, sql: str, *params: Any) -> list[Any]:
        """The rows of any one reading statement."""
        raise NotImplementedError

    def _key_from_row(self, row: tuple[Any, ...]) -> AccessKey:
        return row_to_key(row)

    async def connection_snapshot(self, client_id: str) -> ConnectionSnapshot | None:
        rows = await self._lookup(self.connections.SNAPSHOT_SQL, client_id)
        return row_to_snapshot(rows[0]) if rows else None

    async def put_connection(self, snapshot: ConnectionSnapshot,
                             devices: tuple[str, ...] | None) -> ConnectionSnapshot | None:
        """Store the snapshot of ``snapshot.client_id``, and its scope's device list when
        ``devices`` is given (None: stored already, else NotFoundError naming the scope);
        returns the snapshot it replaces. A client id that is no device is NotFoundError."""
        sql = self.connections
        async with self._write() as conn:
            if await self.statements.device_app(conn, snapshot.client_id) is None:
                raise NotFoundError(f"no device {snapshot.client_id!r}")
            if snapshot.scope is not None:
                if devices is not None:
                    await sql.store_scope(conn, snapshot.scope, sorted(devices),
                                          to_micros(snapshot.created_at))
                if not await sql.scope_stored(conn, snapshot.scope):
                    raise NotFoundError(f"no stored scope {snapshot.scope!r}")
            previous = await sql.load_snapshot(conn, snapshot.client_id)
            await sql.store_snapshot(conn, snapshot)
        return previous

    async def connection_row(self, client_id: str) -> ConnectionRow | None:
        rows = await self._lookup(self.connections.CONNECTION_SQL, client_id)
        if not rows:
            return None
        row = rows[0]
        after = SNAPSHOT_COLUMN_COUNT + 1  # the snapshot, then its device's application
        key = self._key_from_row(tuple(row[after : after + KEY_COLUMN_COUNT]))
        return ConnectionRow(row_to_snapshot(row), key, row[SNAPSHOT_COLUMN_COUNT])

    async def scope_devices(self, digest: str) -> frozenset[str] | None:
        rows = await self._rows(self.connections.SCOPE_DEVICES_SQL, digest)
        return frozenset(as_list(rows[0][0])) if rows else None

    async def connections_of_key(self, key: str) -> list[ConnectionSnapshot]:
        rows = await self._rows(self.connections.KEY_CONNECTIONS_SQL, key)
        return [row_to_snapshot(row) for row in rows]

    async def keys_expiring(self, after: datetime, until: datetime) -> list[str]:
        rows = await self._rows(self.connections.KEYS_EXPIRING_SQL, to_micros(after),
                                to_micros(until))
        return [str(row[0]) for row in rows]

    async def put_credential_check(self, client_id: str, key: str, at: datetime) -> None:
        async with self._write() as conn:
            await self.connections.store_credential_check(conn, client_id, key,
                                                          to_micros(at))

    async def credential_check(self, client_id: str) -> CredentialCheck | None:
        rows = await self._lookup(self.connections.CREDENTIAL_CHECK_SQL, client_id)
        if not rows:
            return None
        checked_at = from_micros(rows[0][1])
        assert checked_at is not None
        return CredentialCheck(client_id, str(rows[0][0]), checked_at)

    async def prune_connections(self, before: datetime, batch: int) -> int:
        """Scope lists no connection refers to any more, stored before ``before``."""
        async with self._write() as conn:
            return await self.connections.prune_scopes(conn, to_micros(before), batch)
