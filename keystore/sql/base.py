"""What every part of the SQL keystore shares: its dialect, its rendered statements, and the
reads that several operations make inside their transactions.

A step that takes ``conn`` runs on an open transaction, or on the dialect itself for a
read that stands alone (both offer ``fetch``).
"""

# SQL text in this module is assembled only from constants and a dialect's fragments;
# every value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from keystore import lookup, plans
from keystore.errors import NotFoundError
from keystore.models import AccessKey, Application, Device
from keystore.rows import KeyParser, row_to_app, row_to_device, row_to_key
from keystore.sql.dialect import Dialect, Row, Transaction
from keystore.sql.statements import APP_LOOKUP_SQL, KEY_LOOKUP_SQL, render


class Reader(Protocol):
    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...


class SqlBase:
    def __init__(self, db: Dialect) -> None:
        self.db = db
        self.spelling = db.spelling
        self.sql = render(db.spelling)
        self.location = db.location
        self._parse_key = KeyParser()  # for the reads of every CONNECT

    async def close(self) -> None:
        await self.db.close()

    async def _named(self, conn: Reader, what: lookup.Lookup, sql: str, ref: str,
                     scope: str | None = None) -> Sequence[Any]:
        """The row of the one thing ``ref`` names (``sql``: ``what.sql``)."""
        return what.pick(ref, await conn.fetch(sql, *what.params(ref, scope)))

    async def _load_app(self, conn: Reader, ref: str) -> Application:
        """An application by id or by name (keystore.lookup)."""
        return row_to_app(await self._named(conn, lookup.APPLICATION, APP_LOOKUP_SQL, ref))

    async def _device_app(self, conn: Reader, device_id: str) -> str | None:
        """The application a device id belongs to (ids are unique across applications)."""
        rows = await conn.fetch("SELECT app_id FROM devices WHERE id = $1", device_id)
        return str(rows[0][0]) if rows else None

    async def _missing_devices(self, conn: Reader, app_id: str,
                               ids: Sequence[str]) -> list[str]:
        """The ids that are not devices of this application."""
        if not ids:
            return []
        rows = await conn.fetch(
            f"SELECT id, app_id FROM devices WHERE {self.spelling.in_list('id', 1)}",
            self.spelling.list_param(ids))
        found = {r[0]: r[1] for r in rows}
        return [d for d in ids if found.get(d) != app_id]

    async def _load_device(self, conn: Reader, app_id: str, device_id: str) -> Device:
        rows = await conn.fetch(
            f"SELECT {self.sql.device_columns} FROM devices d WHERE d.id = $1 AND d.app_id = $2",
            device_id, app_id)
        if not rows:
            raise NotFoundError(f"no device {device_id!r}")
        return row_to_device(rows[0])

    async def _resolve_key(self, conn: Reader, app_id: str, ref: str) -> str:
        """The key of this application's key that ``ref`` names: its key, id, a unique
        prefix of its key or its name (keystore.lookup)."""
        return str((await self._named(conn, lookup.ACCESS_KEY, KEY_LOOKUP_SQL, ref, app_id))[0])

    async def _load_keys(self, conn: Reader, keys: Iterable[str]) -> dict[str, AccessKey]:
        rows = await conn.fetch(
            f"SELECT {self.sql.key_columns} FROM access_keys k "
            f"WHERE {self.spelling.in_list('k.key', 1)}", self.spelling.list_param(list(keys)))
        return {(loaded := row_to_key(row)).key: loaded for row in rows}

    async def _check_limit(self, tx: Transaction, noun: str, table: str, app_id: str,
                           limit: int, adding: int) -> None:
        """The application's limit of ``noun``s (rows of ``table``) holds with ``adding``
        more (keystore.plans.check_limit). Its row is locked first where writers run
        side by side (PostgreSQL), so that two of them cannot both pass the limit."""
        name = await tx.value(
            f"SELECT name FROM applications WHERE id = $1{self.spelling.row_lock('UPDATE')}",
            app_id)
        existing = await tx.value(f"SELECT count(*) FROM {table} WHERE app_id = $1", app_id)
        plans.check_limit(noun, str(name), limit, int(existing), adding)
