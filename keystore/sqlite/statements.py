"""SQL steps the KeyStore runs inside its transactions.

Each function takes the open connection and assumes the caller holds the store's lock
and, for writes, an open ``BEGIN IMMEDIATE`` transaction.
"""

# SQL text in this module is assembled only from constants, whitelisted names and
# '?' placeholder counts; every value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import aiosqlite

from keystore import credentials
from keystore.errors import ConflictError, NotFoundError, ValidationError
from keystore.keyspec import KeySpec
from keystore.models import AccessKey, Application, Device, KeyStatus, Tag
from keystore.sqlite.db import (
    APP_COLUMNS,
    DEVICE_COLUMNS,
    KEY_COLUMNS,
    chunks,
    from_micros,
    now_micros,
    placeholders,
    row_to_app,
    row_to_device,
    row_to_key,
    to_micros,
)
from keystore.validation import MIN_PREFIX_LEN

_HEX = frozenset("0123456789abcdef")

# Scope of a restricted key: listed ids that exist, plus devices carrying a listed tag
# pair. Both halves walk primary keys / the (key, value, device_id) covering index.
# UNION ALL: the caller builds a frozenset anyway, so SQLite need not sort to dedupe.
# CROSS JOIN fixes the join order (SQLite does not reorder it): from the key's few rows
# to devices by primary key, never a walk over an application's devices.
SCOPE_SQL = """
    SELECT d.id FROM key_devices kd CROSS JOIN devices d ON d.id = kd.device_id
     WHERE kd.key = ? AND d.app_id = ?
    UNION ALL
    SELECT dt.device_id FROM key_tags kt
      CROSS JOIN device_tags dt ON dt.key = kt.tkey AND dt.value = kt.tvalue
      CROSS JOIN devices d ON d.id = dt.device_id
     WHERE kt.key = ? AND d.app_id = ?
"""
async def count(conn: aiosqlite.Connection, sql: str, params: tuple[Any, ...] = ()) -> int:
    rows = list(await conn.execute_fetchall(sql, params))
    return int(rows[0][0])


async def load_app(conn: aiosqlite.Connection, ref: str) -> Application:
    """An application by id or by name."""
    rows = list(await conn.execute_fetchall(
        f"SELECT {APP_COLUMNS} FROM applications a WHERE a.id = ? OR a.name = ? "
        "ORDER BY a.id = ? DESC LIMIT 1", (ref, ref, ref)))
    if not rows:
        raise NotFoundError(f"no application {ref!r}")
    return row_to_app(rows[0])


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
    names: dict[str, str | None] = {}
    tags: dict[str, set[Tag]] = {}
    for part in chunks(batch):
        marks = placeholders(len(part))
        for dev_id, name, owner in await conn.execute_fetchall(
            f"SELECT id, name, app_id FROM devices WHERE id IN ({marks})", part
        ):
            if owner != app_id:
                raise ConflictError(f"device {dev_id!r} exists in another application")
            names[dev_id] = name
            tags[dev_id] = set()
        for dev_id, k, v in await conn.execute_fetchall(
            f"SELECT device_id, key, value FROM device_tags WHERE device_id IN ({marks})", part
        ):
            tags[dev_id].add((k, v))
    new_devices: list[tuple[str, str | None, int, int]] = []
    changed: list[tuple[str | None, int, str]] = []
    add_tags: list[tuple[str, str, str]] = []
    drop_tags: list[tuple[str, str, str]] = []
    for dev_id in batch:
        name, want_tags = wanted[dev_id]
        if dev_id not in names:
            new_devices.append((dev_id, name, now, now))
            add_tags.extend((dev_id, k, v) for k, v in want_tags)
            continue
        have = tags[dev_id]
        if names[dev_id] == name and have == want_tags:
            continue
        changed.append((name, now, dev_id))
        add_tags.extend((dev_id, k, v) for k, v in want_tags - have)
        drop_tags.extend((dev_id, k, v) for k, v in have - want_tags)
    await conn.executemany(
        "INSERT INTO devices (id, name, created_at, updated_at, app_id) VALUES (?, ?, ?, ?, ?)",
        [(*row, app_id) for row in new_devices],
    )
    await conn.executemany("UPDATE devices SET name = ?, updated_at = ? WHERE id = ?", changed)
    await conn.executemany(
        "DELETE FROM device_tags WHERE device_id = ? AND key = ? AND value = ?", drop_tags
    )
    await conn.executemany(
        "INSERT INTO device_tags (device_id, key, value) VALUES (?, ?, ?)", add_tags
    )
    return len(new_devices) + len(changed)


async def resolve_key(conn: aiosqlite.Connection, app_id: str, key_or_prefix: str) -> str:
    """The full id of this application's key named by its id or a unique prefix."""
    if not isinstance(key_or_prefix, str):
        raise ValidationError(f"invalid key {key_or_prefix!r}: must be a string")
    ref = key_or_prefix.strip().lower()
    if len(ref) < MIN_PREFIX_LEN:
        raise ValidationError(
            f"key prefix {key_or_prefix!r} is too short: give at least {MIN_PREFIX_LEN} characters"
        )
    if len(ref) >= credentials.KEY_HEX_LEN or not set(ref) <= _HEX:
        rows = list(await conn.execute_fetchall(
            "SELECT key FROM access_keys WHERE key = ? AND app_id = ?", (ref, app_id)))
    else:
        # Keys are lowercase hex, so [prefix, prefix + 'g') is exactly "starts with prefix"
        # and is a range scan on the primary key.
        rows = list(
            await conn.execute_fetchall(
                "SELECT key FROM access_keys WHERE key >= ? AND key < ? AND app_id = ? LIMIT 2",
                (ref, ref + "g", app_id),
            )
        )
    if not rows:
        raise NotFoundError(f"no access key {key_or_prefix!r}")
    if len(rows) > 1:
        raise NotFoundError(
            f"key prefix {key_or_prefix!r} is ambiguous: several keys start with it; "
            "give more characters"
        )
    return str(rows[0][0])


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
    """Insert validated keys; returns them as stored, built here rather than read back
    (reading 100k keys back would cost more than inserting them)."""
    stamp = from_micros(now)
    assert stamp is not None
    created: dict[str, AccessKey] = {}
    key_rows: list[tuple[Any, ...]] = []
    id_rows: list[tuple[str, str]] = []
    tag_rows: list[tuple[str, str, str]] = []
    for spec, (key, secret) in zip(specs, minted, strict=True):
        salt, digest = credentials.hash_secret(secret)
        key_rows.append(
            (
                key,
                salt,
                digest,
                spec.name,
                spec.description,
                KeyStatus.ACTIVE.value,
                to_micros(spec.expires_at) if spec.expires_at else None,
                int(spec.all_devices),
                spec.address_mode.value,
                json.dumps(spec.addresses),
                spec.topic_mode.value,
                json.dumps(spec.pub_topics),
                json.dumps(spec.sub_topics),
                now,
                now,
                app_id,
                key_id := credentials.new_object_id(),
            )
        )
        id_rows.extend((key, d) for d in spec.device_ids)
        tag_rows.extend((key, k, v) for k, v in spec.device_tags)
        created[key] = AccessKey(
            key=key,
            name=spec.name,
            description=spec.description,
            status=KeyStatus.ACTIVE,
            expires_at=spec.expires_at,
            all_devices=spec.all_devices,
            device_ids=tuple(sorted(spec.device_ids)),  # as row_to_key returns them
            device_tags=spec.device_tags,
            address_mode=spec.address_mode,
            addresses=spec.addresses,
            topic_mode=spec.topic_mode,
            pub_topics=spec.pub_topics,
            sub_topics=spec.sub_topics,
            created_at=stamp,
            updated_at=stamp,
            app_id=app_id,
            id=key_id,
        )
    await conn.executemany(
        """INSERT INTO access_keys (key, salt, secret_hash, name, description, status,
               expires_at, all_devices, address_mode, addresses, topic_mode, pub_topics,
               sub_topics, created_at, updated_at, app_id, id)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        key_rows,
    )
    await conn.executemany("INSERT INTO key_devices (key, device_id) VALUES (?, ?)", id_rows)
    await conn.executemany("INSERT INTO key_tags (key, tkey, tvalue) VALUES (?, ?, ?)", tag_rows)
    return created


# Column each update_key field writes to, and how its value is stored.
KEY_UPDATE_COLUMNS: dict[str, tuple[str, Any]] = {
    "name": ("name", lambda v: v),
    "description": ("description", lambda v: v),
    "expires_at": ("expires_at", lambda v: to_micros(v) if v is not None else None),
    "address_mode": ("address_mode", lambda v: v.value),
    "addresses": ("addresses", json.dumps),
    "topic_mode": ("topic_mode", lambda v: v.value),
    "pub_topics": ("pub_topics", json.dumps),
    "sub_topics": ("sub_topics", json.dumps),
}


async def apply_key_changes(conn: aiosqlite.Connection, key: str, changes: dict[str, Any]) -> None:
    assigns, params = [], []
    for field, value in changes.items():
        column, encode = KEY_UPDATE_COLUMNS[field]
        assigns.append(f"{column} = ?")
        params.append(encode(value))
    assigns.append("updated_at = ?")
    params.append(now_micros())
    await conn.execute(f"UPDATE access_keys SET {', '.join(assigns)} WHERE key = ?", (*params, key))
