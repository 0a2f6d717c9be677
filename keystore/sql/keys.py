"""Access keys in the SQL keystore, and what CONNECT reads of them."""

# SQL text in this module is assembled only from constants, whitelisted names and a
# dialect's fragments; every value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from keystore import plans
from keystore.backend import ConnectRow, Page
from keystore.errors import ConflictError, NotFoundError, ValidationError
from keystore.keyspec import KeySpec
from keystore.models import AccessKey, KeyStatus
from keystore.query import compile_query
from keystore.rows import (
    KEY_COLUMN_COUNT,
    KEY_SORT,
    as_list,
    now_micros,
    order_by,
    row_to_key,
)
from keystore.sql.base import SqlBase


class SqlKeys(SqlBase):
    async def insert_keys(self, app_id: str, specs: list[KeySpec],
                          minted: list[tuple[str, str]], max_keys: int) -> dict[str, AccessKey]:
        """Insert validated keys after the checks that need the database: the
        application's key limit, device ids of this application, names not taken in it;
        returns them as stored (keystore.plans.key_rows)."""
        now = now_micros()
        names = [s.name for s in specs if s.name is not None]
        async with self.db.transaction() as tx:
            if max_keys:
                await self._check_limit(tx, "key", "access_keys", app_id, max_keys, len(specs))
            missing = await self._missing_devices(
                tx, app_id, tuple(dict.fromkeys(d for s in specs for d in s.device_ids)))
            if missing:
                raise ValidationError(f"unknown device id {missing[0]!r} in key device restriction")
            if names:
                taken = await tx.value(
                    "SELECT name FROM access_keys WHERE app_id = $1 AND "
                    f"{self.spelling.in_list('name', 2)} LIMIT 1",
                    app_id, self.spelling.list_param(names))
                if taken is not None:
                    raise ConflictError(f"key name {taken!r} is already used by another key")
            rows = plans.key_rows(app_id, specs, minted, now)
            await tx.insert_rows("access_keys", plans.KEY_INSERT_COLUMNS, rows.keys)
            await tx.insert_rows("key_devices", ("key", "device_id"), rows.device_ids)
            await tx.insert_rows("key_tags", ("key", "tkey", "tvalue"), rows.tags)
        return rows.created

    async def load_key(self, app_id: str, ref: str) -> AccessKey:
        async with self.db.transaction(write=False) as tx:
            key = await self._resolve_key(tx, app_id, ref)
            return (await self._load_keys(tx, [key]))[key]

    async def load_key_by_id(self, app_id: str, key_id: str) -> AccessKey:
        rows = await self.db.fetch(f"SELECT {self.sql.key_columns} FROM access_keys k "
                                   "WHERE k.id = $1 AND k.app_id = $2", key_id, app_id)
        if not rows:
            raise NotFoundError(f"no access key with id {key_id!r}")
        return row_to_key(rows[0])

    async def keys_by_id(self, keys: Iterable[str]) -> dict[str, AccessKey]:
        return await self._load_keys(self.db, list(dict.fromkeys(keys)))

    async def page_keys(self, app_id: str, query: Mapping[str, Any] | str | None, sort: str,
                        descending: bool, offset: int, limit: int) -> Page:
        order = order_by(KEY_SORT, sort, descending, "k.key")
        where, params = compile_query(query, self.spelling.query, [app_id])
        n = len(params)
        async with self.db.transaction(write=False) as tx:
            total = await tx.value(
                f"SELECT count(*) FROM access_keys k WHERE k.app_id = $1 AND ({where})", *params)
            rows = await tx.fetch(
                f"SELECT {self.sql.key_columns} FROM access_keys k WHERE k.app_id = $1 "
                f"AND ({where}) ORDER BY {order} LIMIT ${n + 1} OFFSET ${n + 2}",
                *params, limit, offset)
        return [row_to_key(r) for r in rows], int(total)

    async def query_keys(self, app_id: str,
                         query: Mapping[str, Any] | str | None) -> list[AccessKey]:
        where, params = compile_query(query, self.spelling.query, [app_id])
        rows = await self.db.fetch(
            f"SELECT {self.sql.key_columns} FROM access_keys k WHERE k.app_id = $1 "
            f"AND ({where}) ORDER BY k.created_at, k.key", *params)
        return [row_to_key(r) for r in rows]

    async def count_keys(self, app_id: str | None) -> int:
        if app_id is None:
            rows = await self.db.fetch("SELECT count(*) FROM access_keys")
        else:
            rows = await self.db.fetch("SELECT count(*) FROM access_keys WHERE app_id = $1",
                                       app_id)
        return int(rows[0][0])

    async def change_key(self, app_id: str, ref: str, changes: dict[str, Any],
                         check: Callable[[AccessKey], None]) -> AccessKey:
        async with self.db.transaction(feed=True) as tx:
            key = await self._resolve_key(tx, app_id, ref)
            check((await self._load_keys(tx, [key]))[key])
            if changes.get("name") is not None and await tx.value(
                    "SELECT 1 FROM access_keys WHERE app_id = $1 AND name = $2 AND key != $3",
                    app_id, changes["name"], key):
                raise ConflictError(
                    f"key name {changes['name']!r} is already used by another key")
            if changes:
                assigns = plans.key_changes(changes)
                sets = ", ".join(f"{column} = ${n}"
                                 for n, (column, _) in enumerate(assigns, start=1))
                await tx.execute(f"UPDATE access_keys SET {sets} WHERE key = ${len(assigns) + 1}",
                                 *(value for _, value in assigns), key)
            return (await self._load_keys(tx, [key]))[key]

    async def set_status(self, app_id: str, refs: tuple[str, ...],
                         status: KeyStatus) -> list[AccessKey]:
        async with self.db.transaction(feed=True) as tx:
            full = list(dict.fromkeys([await self._resolve_key(tx, app_id, ref)
                                       for ref in refs]))
            await tx.execute(
                "UPDATE access_keys SET status = $1, updated_at = $2 "
                f"WHERE {self.spelling.in_list('key', 3)} AND status != $1",
                status.value, now_micros(), self.spelling.list_param(full))
            loaded = await self._load_keys(tx, full)
        return [loaded[k] for k in full]

    async def delete_keys(self, app_id: str, refs: tuple[str, ...]) -> list[str]:
        async with self.db.transaction(feed=True) as tx:
            full = list(dict.fromkeys([await self._resolve_key(tx, app_id, ref)
                                       for ref in refs]))
            await tx.execute(f"DELETE FROM access_keys WHERE {self.spelling.in_list('key', 1)}",
                             self.spelling.list_param(full))
        return full

    # --- CONNECT ----------------------------------------------------------------------

    async def connect_row(self, key: str) -> ConnectRow:
        row = (await self.db.lookup(self.sql.connect, key))[0]
        if row[1] is None:
            return ConnectRow(int(row[0]), None, None, None)
        listed = None if row[-1] is None else frozenset(as_list(row[-1]))
        return ConnectRow(int(row[0]), self._parse_key(row[1 : 1 + KEY_COLUMN_COUNT]),
                          row[-3], row[-2], listed)

    async def scope_of(self, key: AccessKey) -> frozenset[str]:
        """The devices of the key's application listed by id or carrying a listed tag
        pair: both halves are index lookups."""
        rows = await self.db.fetch(self.sql.scope, key.key, key.app_id)
        return frozenset(r[0] for r in rows)
