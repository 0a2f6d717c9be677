"""SQL steps the PostgreSQL backend runs inside its transactions.

Each function takes the connection of an open transaction. Lists travel as one array
parameter (``= ANY($1)``, ``unnest``), so a batch is one statement, never one per row.
"""

# SQL text in this module is assembled only from constants and whitelisted names; every
# value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg

from keystore import lookup, plans
from keystore.errors import NotFoundError
from keystore.keyspec import KeySpec
from keystore.models import AccessKey, Application, Device, Tag
from keystore.postgres.db import DEVICE_COLUMNS, KEY_COLUMNS
from keystore.rows import (
    APP_COLUMNS,
    TOKEN_COLUMNS,
    now_micros,
    row_to_app,
    row_to_device,
    row_to_key,
)

# Scope of a restricted key (see the SQLite twin): listed ids through devices_app_of, and
# each listed tag pair as one range of device_tags_by_app_pair, index-only.
SCOPE_SQL = """
    SELECT d.id FROM key_devices kd JOIN devices d ON d.id = kd.device_id
     WHERE kd.key = $1 AND d.app_id = $2
    UNION ALL
    SELECT dt.device_id FROM key_tags kt
      JOIN device_tags dt ON dt.key = kt.tkey AND dt.value = kt.tvalue
     WHERE kt.key = $1 AND dt.app_id = $2
"""
# One round trip for CONNECT: the auth generation, the key, its salt and hash.
CONNECT_SQL = (
    "SELECT (SELECT value FROM meta WHERE name = 'auth_generation'), "
    + KEY_COLUMNS
    + ", k.salt, k.secret_hash, CASE WHEN k.all_devices = 0 AND NOT EXISTS "
    "(SELECT 1 FROM key_tags WHERE key = k.key) THEN ARRAY(SELECT d.id "
    "FROM key_devices kd JOIN devices d ON d.id = kd.device_id "
    "WHERE kd.key = k.key AND d.app_id = k.app_id) END "
    "FROM (SELECT 1) AS one LEFT JOIN access_keys k ON k.key = $1"
)
DEVICE_TOKEN_SQL = (
    "SELECT (SELECT value FROM meta WHERE name = 'auth_generation'), t.device_id, t.salt, "
    "t.secret_hash, t.expires_at, " + KEY_COLUMNS
    + " FROM device_tokens t JOIN access_keys k ON k.key = t.key WHERE t.id = $1"
)

APP_LOOKUP_SQL = lookup.APPLICATION.sql("$", APP_COLUMNS)
KEY_LOOKUP_SQL = lookup.ACCESS_KEY.sql("$", "k.key")
TOKEN_LOOKUP_SQL = lookup.API_TOKEN.sql("$", TOKEN_COLUMNS)


async def load_app(conn: asyncpg.Connection, ref: str) -> Application:
    """An application by id or by name (keystore.lookup)."""
    return row_to_app(await named(conn, lookup.APPLICATION, APP_LOOKUP_SQL, ref))


async def named(conn: asyncpg.Connection, what: lookup.Lookup, sql: str, ref: str,
                scope: str | None = None) -> Sequence[Any]:
    """The row of the one thing ``ref`` names (``sql``: ``what.sql`` in this dialect)."""
    params = what.params(ref, scope)
    return what.pick(ref, await conn.fetch(sql, *params))


async def device_app(conn: asyncpg.Connection, device_id: str) -> str | None:
    """The application a device id belongs to (ids are unique across applications)."""
    found = await conn.fetchval("SELECT app_id FROM devices WHERE id = $1", device_id)
    return str(found) if found is not None else None


async def missing_devices(conn: asyncpg.Connection, app_id: str,
                          ids: Sequence[str]) -> list[str]:
    """The ids that are not devices of this application."""
    rows = await conn.fetch("SELECT id, app_id FROM devices WHERE id = ANY($1::text[])",
                            list(ids))
    found = {r[0]: r[1] for r in rows}
    return [d for d in ids if found.get(d) != app_id]


async def load_device(conn: asyncpg.Connection, app_id: str, device_id: str) -> Device:
    row = await conn.fetchrow(
        f"SELECT {DEVICE_COLUMNS} FROM devices d WHERE d.id = $1 AND d.app_id = $2",
        device_id, app_id)
    if row is None:
        raise NotFoundError(f"no device {device_id!r}")
    return row_to_device(row)


async def touch_device(conn: asyncpg.Connection, device_id: str) -> None:
    await conn.execute("UPDATE devices SET updated_at = $1 WHERE id = $2", now_micros(),
                       device_id)


async def insert_device(conn: asyncpg.Connection, app_id: str, device_id: str,
                        name: str | None, now: int) -> None:
    await conn.execute("INSERT INTO devices (id, name, created_at, updated_at, app_id) "
                       "VALUES ($1, $2, $3, $3, $4)", device_id, name, now, app_id)


async def rename_device(conn: asyncpg.Connection, device_id: str, name: str | None) -> None:
    await conn.execute("UPDATE devices SET name = $1 WHERE id = $2", name, device_id)


async def add_device_tags(conn: asyncpg.Connection, app_id: str,
                          rows: Sequence[tuple[str, str, str]]) -> None:
    """Tag rows (device id, key, value) of devices of ``app_id``."""
    if rows:
        await conn.execute(
            "INSERT INTO device_tags (device_id, key, value, app_id) "
            "SELECT t.*, $4 FROM unnest($1::text[], $2::text[], $3::text[]) AS t",
            *_columns(rows, 3), app_id)


async def drop_device_tags(conn: asyncpg.Connection,
                           rows: Sequence[tuple[str, str, str]]) -> None:
    if rows:
        await conn.execute(
            "DELETE FROM device_tags t USING unnest($1::text[], $2::text[], $3::text[]) "
            "AS gone(device_id, key, value) WHERE t.device_id = gone.device_id "
            "AND t.key = gone.key AND t.value = gone.value", *_columns(rows, 3))


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows as one list per column (unnest's parameters)."""
    return [[row[i] for row in rows] for i in range(width)]


async def upsert_batch(
    conn: asyncpg.Connection,
    app_id: str,
    batch: Sequence[str],
    wanted: dict[str, tuple[str | None, frozenset[Tag]]],
    now: int,
) -> int:
    """Diff one batch against what is stored and write only the differences."""
    ids = list(batch)
    names, tags = plans.existing_devices(
        app_id,
        await conn.fetch("SELECT id, name, app_id FROM devices WHERE id = ANY($1::text[])", ids),
        await conn.fetch("SELECT device_id, key, value FROM device_tags "
                         "WHERE device_id = ANY($1::text[])", ids))
    plan = plans.plan_upsert(batch, wanted, names, tags, now)
    if plan.new_devices:
        await conn.execute(
            "INSERT INTO devices (id, name, created_at, updated_at, app_id) "
            "SELECT n.*, $5 FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS n",
            *_columns(plan.new_devices, 4), app_id)
    if plan.changed:
        await conn.execute(
            "UPDATE devices d SET name = c.name, updated_at = c.at "
            "FROM unnest($1::text[], $2::bigint[], $3::text[]) AS c(name, at, id) "
            "WHERE d.id = c.id", *_columns(plan.changed, 3))
    await drop_device_tags(conn, plan.drop_tags)
    await add_device_tags(conn, app_id, plan.add_tags)
    return plan.touched


async def resolve_key(conn: asyncpg.Connection, app_id: str, ref: str) -> str:
    """The key of this application's key that ``ref`` names: its key, id, a unique
    prefix of its key or its name (keystore.lookup)."""
    return str((await named(conn, lookup.ACCESS_KEY, KEY_LOOKUP_SQL, ref, app_id))[0])


async def load_keys(conn: asyncpg.Connection, keys: Iterable[str]) -> dict[str, AccessKey]:
    rows = await conn.fetch(f"SELECT {KEY_COLUMNS} FROM access_keys k "
                            "WHERE k.key = ANY($1::text[])", list(keys))
    return {(loaded := row_to_key(row)).key: loaded for row in rows}


async def insert_keys(conn: asyncpg.Connection, app_id: str, specs: list[KeySpec],
                      minted: list[tuple[str, str]], now: int) -> dict[str, AccessKey]:
    """Insert validated keys (COPY: no trigger watches key inserts); returns them as
    stored (keystore.plans.key_rows)."""
    rows = plans.key_rows(app_id, specs, minted, now)
    await conn.copy_records_to_table("access_keys", records=rows.keys,
                                     columns=plans.KEY_INSERT_COLUMNS)
    if rows.device_ids:
        await conn.copy_records_to_table("key_devices", records=rows.device_ids,
                                         columns=("key", "device_id"))
    if rows.tags:
        await conn.copy_records_to_table("key_tags", records=rows.tags,
                                         columns=("key", "tkey", "tvalue"))
    return rows.created


async def apply_key_changes(conn: asyncpg.Connection, key: str, changes: dict[str, Any]) -> None:
    assigns = plans.key_changes(changes)
    sets = ", ".join(f"{column} = ${n}" for n, (column, _) in enumerate(assigns, start=1))
    await conn.execute(f"UPDATE access_keys SET {sets} WHERE key = ${len(assigns) + 1}",
                       *(value for _, value in assigns), key)
