"""The SQLite side of the keystore: opening the file safely, time encoding, row mapping.

One aiosqlite connection in autocommit mode; transactions are explicit
(``BEGIN IMMEDIATE`` for writes) so each operation is exactly one transaction.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import aiosqlite

from keystore.files import create_private_file, tighten_mode
from keystore.models import (
    AccessKey,
    AddressMode,
    ApiToken,
    Application,
    Device,
    KeyStatus,
    Tag,
    TopicMode,
)

log = logging.getLogger(__name__)

# A CLI and the daemon share the file: wait this long for the other's write lock
# instead of failing with "database is locked".
BUSY_TIMEOUT_MS = 5000
CACHE_KIB = 32 * 1024
# Parameters per IN (...) list; well under SQLite's variable limit.
IN_CHUNK = 500

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_micros(when: datetime) -> int:
    """Aware datetime -> integer microseconds since the epoch, UTC (the stored form)."""
    delta = when.astimezone(UTC) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(micros: int | None) -> datetime | None:
    if micros is None:
        return None
    seconds, rest = divmod(micros, 1_000_000)
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=rest)


def now_micros() -> int:
    return to_micros(datetime.now(UTC))


def _tighten_sidecars(path: str) -> None:
    # SQLite gives -wal/-shm the main file's mode at creation; existing ones may be looser.
    for suffix in ("-wal", "-shm"):
        tighten_mode(path + suffix)


async def connect(path: str) -> aiosqlite.Connection:
    """Open (creating with mode 0600 if needed) and configure the keystore connection."""
    in_memory = path == ":memory:"
    if not in_memory:
        create_private_file(path, "keystore")
    conn = await aiosqlite.connect(path, isolation_level=None)
    try:
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not in_memory:
            await conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL is durable against application crashes in WAL mode and keeps
            # writes fast; a power cut can lose the last commits, never corrupt.
            await conn.execute("PRAGMA synchronous = NORMAL")
        await conn.execute("PRAGMA foreign_keys = ON")
        # 32 MiB page cache (default 2 MiB): keeps the hot index pages for CONNECT-time
        # lookups and scope resolution in memory on a million-device file.
        await conn.execute(f"PRAGMA cache_size = {-CACHE_KIB}")
        if not in_memory:
            _tighten_sidecars(path)
    except BaseException:
        await conn.close()
        raise
    return conn


def chunks(items: Sequence[Any], size: int = IN_CHUNK) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def placeholders(count: int) -> str:
    return ",".join("?" * count)


# --- access keys -----------------------------------------------------------------------

# Restriction lists come back in the same row as JSON arrays so that fetching a key is one
# statement (one thread hop in aiosqlite), which keeps CONNECT latency low.
KEY_COLUMNS = """
    k.key, k.name, k.description, k.status, k.expires_at, k.all_devices,
    k.address_mode, k.addresses, k.topic_mode, k.pub_topics, k.sub_topics,
    k.created_at, k.updated_at, k.last_used,
    (SELECT json_group_array(device_id) FROM key_devices WHERE key = k.key),
    (SELECT json_group_array(json_array(tkey, tvalue)) FROM key_tags WHERE key = k.key),
    k.app_id, k.id
"""
KEY_COLUMN_COUNT = 18


def _json_list(text: str) -> list[Any]:
    # Most restriction lists are empty; skipping the parser for them is a measurable
    # share of authenticate() and list_keys().
    return [] if text == "[]" else list(json.loads(text))


def row_to_key(row: Sequence[Any]) -> AccessKey:
    created = from_micros(row[11])
    updated = from_micros(row[12])
    assert created is not None and updated is not None
    return AccessKey(
        key=row[0],
        name=row[1],
        description=row[2],
        status=KeyStatus(row[3]),
        expires_at=from_micros(row[4]),
        all_devices=bool(row[5]),
        device_ids=tuple(sorted(_json_list(row[14]))),
        device_tags=tuple(sorted((k, v) for k, v in _json_list(row[15]))),
        address_mode=AddressMode(row[6]),
        addresses=tuple(_json_list(row[7])),
        topic_mode=TopicMode(row[8]),
        pub_topics=tuple(_json_list(row[9])),
        sub_topics=tuple(_json_list(row[10])),
        created_at=created,
        updated_at=updated,
        last_used=from_micros(row[13]),
        app_id=row[16],
        id=row[17],
    )


# --- applications ---------------------------------------------------------------------

APP_COLUMNS = "a.id, a.name, a.description, a.max_keys, a.created_at, a.updated_at"


def row_to_app(row: Sequence[Any]) -> Application:
    created, updated = from_micros(row[4]), from_micros(row[5])
    assert created is not None and updated is not None
    return Application(id=row[0], name=row[1], description=row[2], max_keys=row[3],
                       created_at=created, updated_at=updated)


# --- devices --------------------------------------------------------------------------

DEVICE_COLUMNS = """
    d.id, d.name, d.created_at, d.updated_at, d.connected, d.last_seen,
    (SELECT json_group_array(json_array(key, value)) FROM device_tags WHERE device_id = d.id),
    d.app_id
"""


def row_to_device(row: Sequence[Any]) -> Device:
    created = from_micros(row[2])
    updated = from_micros(row[3])
    assert created is not None and updated is not None
    tags: tuple[Tag, ...] = tuple(sorted((k, v) for k, v in _json_list(row[6])))
    return Device(
        id=row[0],
        name=row[1],
        tags=tags,
        created_at=created,
        updated_at=updated,
        connected=bool(row[4]),
        last_seen=from_micros(row[5]),
        app_id=row[7],
    )


# --- API tokens -----------------------------------------------------------------------

# Column names, not a password.
TOKEN_COLUMNS = "t.id, t.name, t.app_id, t.scopes, t.status, t.created_at, t.expires_at, t.last_used"  # noqa: S105, E501


def row_to_token(row: Sequence[Any]) -> ApiToken:
    created = from_micros(row[5])
    assert created is not None
    return ApiToken(id=row[0], name=row[1], app_id=row[2], scopes=tuple(json.loads(row[3])),
                    status=row[4], created_at=created, expires_at=from_micros(row[6]),
                    last_used=from_micros(row[7]))
