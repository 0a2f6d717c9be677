"""The SQLite side of the keystore: opening the file safely, the key and device columns
(row mapping and stored forms: keystore.rows).

One aiosqlite connection in autocommit mode; transactions are explicit
(``BEGIN IMMEDIATE`` for writes) so each operation is exactly one transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import aiosqlite

from keystore.files import create_private_file, tighten_mode

log = logging.getLogger(__name__)

# A CLI and the daemon share the file: wait this long for the other's write lock
# instead of failing with "database is locked".
BUSY_TIMEOUT_MS = 5000
CACHE_KIB = 32 * 1024
# Parameters per IN (...) list; well under SQLite's variable limit.
IN_CHUNK = 500


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


# --- access keys and devices ------------------------------------------------------------

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


DEVICE_COLUMNS = """
    d.id, d.name, d.created_at, d.updated_at, d.connected, d.last_seen,
    (SELECT json_group_array(json_array(key, value)) FROM device_tags WHERE device_id = d.id),
    d.app_id
"""
