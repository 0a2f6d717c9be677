"""SQL steps the KeyStore runs inside its transactions.

Each function takes the open connection and assumes the caller holds the store's lock
and, for writes, an open ``BEGIN IMMEDIATE`` transaction.
"""

# SQL text in this module is assembled only from constants, whitelisted names and
# '?' placeholder counts; every value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import aiosqlite

from keystore import lookup, plans
from keystore.errors import NotFoundError
from keystore.keyspec import KeySpec
from keystore.models import AccessKey, Application, Device, Tag
from keystore.rows import (
    APP_COLUMNS,
    TOKEN_COLUMNS,
    now_micros,
    row_to_app,
    row_to_device,
    row_to_key,
)
from keystore.sqlite.db import (
    DEVICE_COLUMNS,
    KEY_COLUMNS,
    chunks,
    placeholders,
)

# Scope of a restricted key: listed ids that exist, plus devices carrying a listed tag
# pair. Both halves walk primary keys / the (app_id, key, value, device_id) covering
# index: the tag half is one index range per listed pair, with no lookup per device.
# UNION ALL: the caller builds a frozenset anyway, so SQLite need not sort to dedupe.
# CROSS JOIN fixes the join order (SQLite does not reorder it): from the key's few rows
# to devices by primary key, never a walk over an application's devices.
SCOPE_SQL = """
    SELECT d.id FROM key_devices kd CROSS JOIN devices d ON d.id = kd.device_id
     WHERE kd.key = ? AND d.app_id = ?
    UNION ALL
    SELECT dt.device_id FROM key_tags kt
      CROSS JOIN device_tags dt ON dt.key = kt.tkey AND dt.value = kt.tvalue
     WHERE kt.key = ? AND dt.app_id = ?
"""
# KEY_COLUMNS is our own constant; the key is a bound parameter.
# The last column: for a key restricted by device ids alone, the listed ids that exist in
# its application (its whole scope: no second round trip through the writer's thread).
CONNECT_SQL = (
    "SELECT (SELECT value FROM meta WHERE name = 'auth_generation'), "
    + KEY_COLUMNS
    + ", k.salt, k.secret_hash, CASE WHEN k.all_devices = 0 AND NOT EXISTS "
    "(SELECT 1 FROM key_tags WHERE key = k.key) THEN (SELECT json_group_array(d.id) "
    "FROM key_devices kd CROSS JOIN devices d ON d.id = kd.device_id "
    "WHERE kd.key = k.key AND d.app_id = k.app_id) END "
    "FROM (SELECT 1) LEFT JOIN access_keys k ON k.key = ?"
)


APP_LOOKUP_SQL = lookup.APPLICATION.sql("?", APP_COLUMNS)
KEY_LOOKUP_SQL = lookup.ACCESS_KEY.sql("?", "k.key")
TOKEN_LOOKUP_SQL = lookup.API_TOKEN.sql("?", TOKEN_COLUMNS)


async def count(conn: aiosqlite.Connection, sql: str, params: tuple[Any, ...] = ()) -> int:
    rows = list(await conn.execute_fetchall(sql, params))
    return int(rows[0][0])


async def load_app(conn: aiosqlite.Connection, ref: str) -> Application:
    """An application by id or by name (keystore.lookup)."""
    return row_to_app(await named(conn, lookup.APPLICATION, APP_LOOKUP_SQL, ref))


async def named(conn: aiosqlite.Connection, what: lookup.Lookup, sql: str, ref: str,
                scope: str | None = None) -> Sequence[Any]:
    """The row of the one thing ``ref`` names (``sql``: ``what.sql`` in this dialect)."""
    params = what.params(ref, scope)
    return what.pick(ref, list(await conn.execute_fetchall(sql, params)))


async def device_app(conn: aiosqlite.Connection, device_id: str) -> str | None:
    """The application a device id belongs to (ids are unique across applications)."""
    rows = list(await conn.execute_fetchall("SELECT app_id FROM devices WHERE id = ?",
                                            (device_id,)))
    return str(rows[0][0]) if rows else None


async def device_apps(conn: aiosqlite.Connection, ids: Sequence[str]) -> dict[str, str]:
    """id -> application for the ids that exist, in any application."""
    found: dict[str, str] = {}
    for batch in chunks(ids):
        rows = await conn.execute_fetchall(
            f"SELECT id, app_id FROM devices WHERE id IN ({placeholders(len(batch))})", batch
        )
        found.update((str(r[0]), str(r[1])) for r in rows)
    return found


async def missing_devices(conn: aiosqlite.Connection, app_id: str,
                          ids: tuple[str, ...]) -> list[str]:
    """The ids that are not devices of this application."""
    found = await device_apps(conn, ids)
    return [d for d in ids if found.get(d) != app_id]


async def load_device(conn: aiosqlite.Connection, app_id: str, device_id: str) -> Device:
    rows = list(
        await conn.execute_fetchall(
            f"SELECT {DEVICE_COLUMNS} FROM devices d WHERE d.id = ? AND d.app_id = ?",
            (device_id, app_id),
        )
    )
    if not rows:
        raise NotFoundError(f"no device {device_id!r}")
    return row_to_device(rows[0])


async def insert_device(conn: aiosqlite.Connection, app_id: str, device_id: str,
                        name: str | None, now: int) -> None:
    await conn.execute(
        "INSERT INTO devices (id, name, created_at, updated_at, app_id) VALUES (?, ?, ?, ?, ?)",
        (device_id, name, now, now, app_id))


async def rename_device(conn: aiosqlite.Connection, device_id: str, name: str | None) -> None:
    await conn.execute("UPDATE devices SET name = ? WHERE id = ?", (name, device_id))


async def add_device_tags(conn: aiosqlite.Connection, app_id: str,
                          rows: Sequence[tuple[str, str, str]]) -> None:
    """Tag rows (device id, key, value) of devices of ``app_id``."""
    await conn.executemany(
        "INSERT INTO device_tags (device_id, key, value, app_id) VALUES (?, ?, ?, ?)",
        [(*row, app_id) for row in rows])


async def drop_device_tags(conn: aiosqlite.Connection,
                           rows: Sequence[tuple[str, str, str]]) -> None:
    await conn.executemany(
        "DELETE FROM device_tags WHERE device_id = ? AND key = ? AND value = ?", rows)


async def touch_device(conn: aiosqlite.Connection, device_id: str) -> None:
    await conn.execute("UPDATE devices SET updated_at = ? WHERE id = ?", (now_micros(), device_id))


async def upsert_batch(
    conn: aiosqlite.Connection,
    app_id: str,
    batch: Sequence[str],
    wanted: dict[str, tuple[str | None, frozenset[Tag]]],
    now: int,
) -> int:
    """Diff one batch against what is stored and write only the differences."""
    devices: list[Any] = []
    tag_rows: list[Any] = []
    for part in chunks(batch):
        marks = placeholders(len(part))
        devices += await conn.execute_fetchall(
            f"SELECT id, name, app_id FROM devices WHERE id IN ({marks})", part)
        tag_rows += await conn.execute_fetchall(
            f"SELECT device_id, key, value FROM device_tags WHERE device_id IN ({marks})", part)
    names, tags = plans.existing_devices(app_id, devices, tag_rows)
    plan = plans.plan_upsert(batch, wanted, names, tags, now)
    await conn.executemany(
        "INSERT INTO devices (id, name, created_at, updated_at, app_id) VALUES (?, ?, ?, ?, ?)",
        [(*row, app_id) for row in plan.new_devices],
    )
    await conn.executemany("UPDATE devices SET name = ?, updated_at = ? WHERE id = ?",
                           plan.changed)
    await drop_device_tags(conn, plan.drop_tags)
    await add_device_tags(conn, app_id, plan.add_tags)
    return plan.touched


async def resolve_key(conn: aiosqlite.Connection, app_id: str, ref: str) -> str:
    """The key of this application's key that ``ref`` names: its key, id, a unique
    prefix of its key or its name (keystore.lookup)."""
    return str((await named(conn, lookup.ACCESS_KEY, KEY_LOOKUP_SQL, ref, app_id))[0])


async def load_keys(conn: aiosqlite.Connection, keys: Iterable[str]) -> dict[str, AccessKey]:
    out: dict[str, AccessKey] = {}
    for batch in chunks(list(keys)):
        rows = await conn.execute_fetchall(
            f"SELECT {KEY_COLUMNS} FROM access_keys k WHERE k.key IN ({placeholders(len(batch))})",
            batch,
        )
        for row in rows:
            loaded = row_to_key(row)
            out[loaded.key] = loaded
    return out


async def insert_keys(
    conn: aiosqlite.Connection, app_id: str, specs: list[KeySpec],
    minted: list[tuple[str, str]], now: int
) -> dict[str, AccessKey]:
    """Insert validated keys; returns them as stored (keystore.plans.key_rows)."""
    rows = plans.key_rows(app_id, specs, minted, now)
    await conn.executemany(
        f"INSERT INTO access_keys ({', '.join(plans.KEY_INSERT_COLUMNS)}) "
        f"VALUES ({placeholders(len(plans.KEY_INSERT_COLUMNS))})", rows.keys)
    await conn.executemany("INSERT INTO key_devices (key, device_id) VALUES (?, ?)",
                           rows.device_ids)
    await conn.executemany("INSERT INTO key_tags (key, tkey, tvalue) VALUES (?, ?, ?)",
                           rows.tags)
    return rows.created


async def apply_key_changes(conn: aiosqlite.Connection, key: str, changes: dict[str, Any]) -> None:
    assigns = plans.key_changes(changes)
    await conn.execute(
        f"UPDATE access_keys SET {', '.join(f'{c} = ?' for c, _ in assigns)} WHERE key = ?",
        (*(v for _, v in assigns), key))
