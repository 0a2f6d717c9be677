"""Opening an SQLite keystore file safely (the dialect over it: keystore.sqlite.dialect).

One aiosqlite connection in autocommit mode; transactions are explicit
(``BEGIN IMMEDIATE`` for writes) so each operation is exactly one transaction.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import aiosqlite

from keystore.errors import KeybrokerError, NotFoundError
from keystore.files import create_private_file, tighten_mode

log = logging.getLogger(__name__)

# A CLI and the daemon share the file: wait this long for the other's write lock
# instead of failing with "database is locked".
BUSY_TIMEOUT_MS = 5000
CACHE_KIB = 32 * 1024


def _tighten_sidecars(path: str) -> None:
    # SQLite gives -wal/-shm the main file's mode at creation; existing ones may be looser.
    for suffix in ("-wal", "-shm"):
        tighten_mode(path + suffix)


# The first 16 bytes of every SQLite 3 database file.
SQLITE_HEADER = b"SQLite format 3\x00"
# Tables every keybroker keystore has had since schema version 1.
KEYSTORE_TABLES = frozenset({"devices", "access_keys"})


def holds_database(path: str) -> bool:
    """Whether the file at ``path`` holds an SQLite database (False: no file, or an empty
    one). A file that holds anything else (a mistyped ``--db notes.txt``) is refused,
    named, before anything opens it, so nothing about it changes, its mode included."""
    try:
        with open(path, "rb") as file:
            header = file.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise KeybrokerError(f"cannot open keystore {path!r}: {exc.strerror}") from None
    if header and header != SQLITE_HEADER:
        raise KeybrokerError(f"{path!r} is not a keybroker keystore: not an SQLite database")
    return bool(header)


def check_keystore_schema(path: str, version: int, tables: Iterable[str]) -> bool:
    """Whether the SQLite database at ``path`` (``PRAGMA user_version``, its tables) is a
    keystore: True; False when it is empty (a new keystore may go there). Another
    program's database is refused, named, so it is never migrated into a keystore."""
    tables = set(tables)
    if version == 0 and not tables:
        return False
    if version == 0 or not KEYSTORE_TABLES <= tables:
        shown = ", ".join(sorted(tables)[:3]) + (", ..." if len(tables) > 3 else "")
        raise KeybrokerError(f"{path!r} is not a keybroker keystore: an SQLite database "
                             f"with other tables ({shown or 'none'})")
    return True


async def _schema(conn: aiosqlite.Connection) -> tuple[int, list[str]]:
    async with conn.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    async with conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'") as cursor:
        tables = [str(name) for name, in await cursor.fetchall()]
    return (int(row[0]) if row else 0), tables


async def connect(path: str, *, create: bool = True) -> aiosqlite.Connection:
    """Open and configure the keystore connection. With ``create`` a missing or empty file
    becomes a new keystore (a new file is made with mode 0600); without it, that is a
    NotFoundError. A file that is not a keystore is refused before anything changes it."""
    in_memory = path == ":memory:"
    existing = not in_memory and holds_database(path)
    if not in_memory and not existing:
        if not create:
            what = "an empty file" if os.path.exists(path) else "no file"
            raise NotFoundError(f"no keystore at {path!r} ({what})")
        create_private_file(path, "keystore")
    conn = await aiosqlite.connect(path, isolation_level=None)
    try:
        # Read before the PRAGMAs below: journal_mode = WAL rewrites the file's header.
        if existing and not check_keystore_schema(path, *await _schema(conn)) and not create:
            raise NotFoundError(f"no keystore at {path!r} (an empty SQLite database)")
        if existing:
            tighten_mode(path)
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
