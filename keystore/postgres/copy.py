"""Copy a whole SQLite keystore into an empty PostgreSQL one (``keybroker migrate``).

Both backends store the same values the same way (keystore.rows), so every row is copied
as it is: applications, devices with their tags and status, keys with their salts and
secret hashes (secrets keep working; none is ever known here), restrictions, API and
device tokens. The source is read in one snapshot and the target written in one
transaction with COPY, then the row counts of every table are compared inside that
transaction: a difference rolls everything back. The change feed is not copied (it
describes the source's past; a daemon on the target starts at its end), nor are
keybroker authsvc's connection snapshots and credential checks (they describe live
connections of an engine; a connection admitted before the move is refused at its next
request and records a new snapshot when it reconnects).
"""

# Table and column names below are our own constants, never input.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from dataclasses import dataclass

from keystore.errors import KeybrokerError, NotFoundError
from keystore.postgres.dialect import PostgresDialect
from keystore.sqlite.dialect import SqliteDialect

CHUNK = 10_000  # rows per COPY

# In the order foreign keys need; columns as both backends name them.
TABLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("applications", ("id", "name", "description", "max_keys", "max_devices", "created_at",
                      "updated_at")),
    ("devices", ("id", "name", "created_at", "updated_at", "connected", "last_seen", "app_id")),
    ("device_tags", ("device_id", "key", "value", "app_id")),
    ("access_keys", ("key", "salt", "secret_hash", "name", "description", "status",
                     "expires_at", "all_devices", "address_mode", "addresses", "topic_mode",
                     "pub_topics", "sub_topics", "created_at", "updated_at", "last_used",
                     "app_id", "id")),
    ("key_devices", ("key", "device_id")),
    ("key_tags", ("key", "tkey", "tvalue")),
    ("api_tokens", ("id", "name", "app_id", "scopes", "salt", "secret_hash", "status",
                    "created_at", "expires_at", "last_used")),
    ("device_tokens", ("id", "key", "device_id", "salt", "secret_hash", "created_at",
                       "expires_at")),
)


@dataclass(frozen=True, slots=True)
class CopyReport:
    source: str
    target: str  # without its password
    counts: dict[str, int]  # table -> rows copied (equal on both sides)


async def copy_keystore(sqlite_path: str | os.PathLike[str], url: str) -> CopyReport:
    source = os.fspath(sqlite_path)
    if not os.path.isfile(source):
        raise NotFoundError(f"no keystore at {source!r}: nothing to migrate")
    # Bring the source to the current schema (what any keybroker command would do).
    await (await SqliteDialect.open(source)).close()
    target = await PostgresDialect.open(url)
    try:
        with contextlib.closing(sqlite3.connect(source, isolation_level=None,
                                                check_same_thread=False)) as reader:
            reader.execute("BEGIN")  # one snapshot of every table
            try:
                counts = await _copy(reader, target)
            finally:
                reader.execute("COMMIT")
    finally:
        await target.close()
    return CopyReport(source, target.location, counts)


async def _copy(reader: sqlite3.Connection, target: PostgresDialect) -> dict[str, int]:
    async with target.transaction(feed=True) as tx:
        found = {table: int(await tx.value(f"SELECT count(*) FROM {table}"))
                 for table, _ in TABLES}
        apps = await tx.fetch("SELECT name FROM applications")
        untouched = [r[0] for r in apps] in ([], ["default"]) and not any(
            n for table, n in found.items() if table != "applications")
        if not untouched:
            held = ", ".join(f"{n} {table}" for table, n in found.items() if n)
            raise KeybrokerError(
                f"keystore {target.location} is not empty ({held}): migrate copies into a "
                "new keystore; give it an empty database")
        await tx.execute("DELETE FROM applications")  # the fresh keystore's own default
        expected: dict[str, int] = {}
        for table, columns in TABLES:
            names = ", ".join(columns)
            expected[table] = reader.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            cursor = reader.execute(f"SELECT {names} FROM {table}")
            while rows := await asyncio.to_thread(cursor.fetchmany, CHUNK):
                await tx.insert_rows(table, columns, rows)
        copied = {table: int(await tx.value(f"SELECT count(*) FROM {table}"))
                  for table, _ in TABLES}
        if copied != expected:
            wrong = next(t for t in expected if copied[t] != expected[t])
            raise KeybrokerError(
                f"copy check failed: {wrong} has {copied[wrong]} rows in "
                f"{target.location} but {expected[wrong]} in the source; nothing was copied")
    return copied
