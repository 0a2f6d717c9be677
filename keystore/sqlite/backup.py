"""Online backup of a live keystore file with SQLite's backup API.

The copy is one backup step, so it reads one consistent snapshot of the source: in WAL
mode that read neither blocks the daemon's writes nor is blocked by them, and commits
still in the -wal file are included. The destination is a new file (never an existing
one) created with mode 0600, like the keystore itself, and switched out of WAL mode so
the backup is a single self-contained file. ``KeyStore.open`` on it (or copying it over
the database path while the daemon is stopped) gives back the same keystore.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from dataclasses import dataclass

from keystore.errors import KeybrokerError
from keystore.sqlite.db import BUSY_TIMEOUT_MS, check_keystore_schema, holds_database
from keystore.sqlite.migrations import SCHEMA_VERSION


@dataclass(frozen=True, slots=True)
class BackupReport:
    source: str
    dest: str
    schema_version: int
    devices: int
    keys: int
    size: int  # bytes


async def backup(
    src_path: str | os.PathLike[str], dest_path: str | os.PathLike[str]
) -> BackupReport:
    """Copy the keystore at ``src_path`` to the new file ``dest_path`` (mode 0600).

    Safe while a daemon and CLIs write to the source. Refuses an existing destination
    and a source that is missing or not a keystore this keybroker knows.
    """
    return await asyncio.to_thread(_backup, os.fspath(src_path), os.fspath(dest_path))


def _backup(src: str, dest: str) -> BackupReport:
    if not os.path.isfile(src) or not holds_database(src):
        # Checked first: sqlite3.connect would silently create an empty source.
        raise KeybrokerError(f"no keystore at {src!r}: nothing to back up")
    _create_new_private_file(dest)
    try:
        version, devices, keys = _copy(src, dest)
    except BaseException:
        _remove_partial(dest)
        raise
    return BackupReport(src, dest, version, devices, keys, os.path.getsize(dest))


def _create_new_private_file(path: str) -> None:
    # O_EXCL: never overwrite (or follow a symlink to) anything; 0600 before any data.
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        raise KeybrokerError(
            f"backup file {path!r} already exists; refusing to overwrite it"
        ) from None
    except OSError as exc:
        raise KeybrokerError(f"cannot create backup file {path!r}: {exc.strerror}") from None
    os.close(fd)


def _copy(src: str, dest: str) -> tuple[int, int, int]:
    timeout = BUSY_TIMEOUT_MS / 1000
    with contextlib.closing(sqlite3.connect(src, timeout=timeout, isolation_level=None)) as source:
        version = _user_version(source)
        tables = [name for name, in source.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]
        if not check_keystore_schema(src, version, tables):
            raise KeybrokerError(f"no keystore at {src!r}: an empty SQLite database")
        if version > SCHEMA_VERSION:
            raise KeybrokerError(
                f"keystore {src!r} has schema version {version}, newer than this keybroker "
                f"supports ({SCHEMA_VERSION}); back it up with that keybroker"
            )
        with contextlib.closing(
            sqlite3.connect(dest, timeout=timeout, isolation_level=None)
        ) as target:
            # pages=-1: the whole database in one step, i.e. from one read snapshot.
            source.backup(target, pages=-1)
            # The copied header says WAL; a backup should be one file with no sidecars.
            target.execute("PRAGMA journal_mode = DELETE").fetchall()
            copied_version = _user_version(target)
            devices = _count(target, "devices")
            keys = _count(target, "access_keys")
    return copied_version, devices, keys


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _count(conn: sqlite3.Connection, table: str) -> int:
    # table is one of our own constant names, never user input
    return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608


def _remove_partial(dest: str) -> None:
    """Remove a destination this call created and could not finish (and its sidecars)."""
    for suffix in ("", "-journal", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(dest + suffix)
