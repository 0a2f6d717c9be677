"""The broker state in one SQLite file: WAL, mode 0600, written from one thread.

sqlite3 on one dedicated thread (not aiosqlite): a flush is one function — BEGIN, a few
``executemany``, COMMIT — run as a unit off the event loop, and loading reads every
table in one go. ``synchronous = NORMAL`` (WAL) survives a crash of the daemon; with
``[persistence] sync = true`` it is FULL, so a commit also survives a power cut.

A file of an older schema is migrated when it is opened (one transaction: the new
columns of its rows hold what an MQTT 3.1.1 row means, see broker.state.model). A file
that cannot be used (not SQLite, corrupt, from a newer keybroker, not a state file) is a
``StateError`` naming it and the reason: the daemon refuses to start rather than start
empty and lose it; ``reset_state_file`` (``serve --reset-state``) moves it aside first.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from broker.state.model import (
    Batch,
    MessageRow,
    RetainedRow,
    SessionRow,
    Snapshot,
    StoredSession,
    SubscriptionRow,
)
from broker.state.store import IN_MEMORY, StateError
from keystore.errors import KeybrokerError
from keystore.files import create_private_file, tighten_mode

T = TypeVar("T")

logger = logging.getLogger(__name__)

FORMAT = "keybroker-state"
SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 5000
SIDECARS = ("-wal", "-shm")

# Each table's columns are named as the fields of its row (broker.state.model).
SCHEMA = f"""
CREATE TABLE meta (name TEXT PRIMARY KEY, value);
CREATE TABLE retained (
    mount TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL,
    bucket TEXT NOT NULL, props BLOB, expires REAL, PRIMARY KEY (mount, topic));
CREATE TABLE sessions (
    client_id TEXT PRIMARY KEY, mount TEXT NOT NULL, key TEXT NOT NULL,
    listener TEXT NOT NULL, client_ip TEXT NOT NULL, peer_ip TEXT NOT NULL,
    disconnected_at REAL, inflight_in TEXT NOT NULL, expiry REAL);
CREATE TABLE subscriptions (
    client_id TEXT NOT NULL, filter TEXT NOT NULL, options INTEGER NOT NULL,
    PRIMARY KEY (client_id, filter)) WITHOUT ROWID;
CREATE TABLE messages (
    client_id TEXT NOT NULL, seq INTEGER NOT NULL, topic TEXT NOT NULL,
    payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL,
    packet_id INTEGER NOT NULL, released INTEGER NOT NULL, props BLOB, expires REAL,
    sub_ids TEXT NOT NULL DEFAULT '', share TEXT, PRIMARY KEY (client_id, seq));
INSERT INTO meta VALUES ('format', '{FORMAT}'), ('position', 0);
PRAGMA user_version = {SCHEMA_VERSION};
"""  # noqa: S608 - our own constants

# MIGRATIONS[n - 1] takes a file of schema n to n + 1, rows kept: what a new column holds
# for an old row is what it meant (MQTT 3.1.1: no properties, the server's expiry).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    ("ALTER TABLE retained ADD COLUMN props BLOB",
     "ALTER TABLE retained ADD COLUMN expires REAL",
     "ALTER TABLE sessions ADD COLUMN expiry REAL",
     # it held the packed options (broker.topics.trie.options) already: the name says so
     "ALTER TABLE subscriptions RENAME COLUMN qos TO options",
     "ALTER TABLE messages ADD COLUMN props BLOB",
     "ALTER TABLE messages ADD COLUMN expires REAL",
     "ALTER TABLE messages ADD COLUMN sub_ids TEXT NOT NULL DEFAULT ''",
     "ALTER TABLE messages ADD COLUMN share TEXT"),
)


def _columns(fields: tuple[str, ...]) -> str:
    return ", ".join(fields)


def _insert(table: str, fields: tuple[str, ...], verb: str = "INSERT") -> str:
    marks = ", ".join("?" * len(fields))
    return f"{verb} INTO {table} ({_columns(fields)}) VALUES ({marks})"


def _upsert(table: str, fields: tuple[str, ...], key: int) -> str:
    """Insert a row, or update every column of the row with the same first ``key``
    columns (its primary key)."""
    updates = ", ".join(f"{name} = excluded.{name}" for name in fields[key:])
    return (f"{_insert(table, fields)} ON CONFLICT ({_columns(fields[:key])}) "
            f"DO UPDATE SET {updates}")


def _select(table: str, fields: tuple[str, ...], order: str) -> str:
    return f"SELECT {_columns(fields)} FROM {table} ORDER BY {order}"  # noqa: S608 - ours


# What a start loads: retained messages in the order they were set (the oldest are kept
# when the quotas have been lowered since), each session's messages in order.
LOAD_RETAINED = _select("retained", RetainedRow._fields, "rowid")
LOAD_SESSIONS = _select("sessions", SessionRow._fields, "rowid")
LOAD_SUBSCRIPTIONS = _select("subscriptions", SubscriptionRow._fields, "client_id, filter")
LOAD_MESSAGES = _select("messages", MessageRow._fields, "client_id, seq")

# Each write of a flush, in the order a Batch is applied (see broker.state.model.Batch).
DROP = ("DELETE FROM sessions WHERE client_id = ?",
        "DELETE FROM subscriptions WHERE client_id = ?",
        "DELETE FROM messages WHERE client_id = ?")
UPSERT_SESSION = _upsert("sessions", SessionRow._fields, 1)
UNSUBSCRIBE = "DELETE FROM subscriptions WHERE client_id = ? AND filter = ?"
SUBSCRIBE = _insert("subscriptions", SubscriptionRow._fields, "INSERT OR REPLACE")
REMOVE_MESSAGE = "DELETE FROM messages WHERE client_id = ? AND seq = ?"
# Whole rows: a session's sequence numbers start again with a new session (its old
# rows are deleted first) or after messages a restart left out.
UPSERT_MESSAGE = _insert("messages", MessageRow._fields, "INSERT OR REPLACE")
REMOVE_RETAINED = "DELETE FROM retained WHERE mount = ? AND topic = ?"
UPSERT_RETAINED = _upsert("retained", RetainedRow._fields, 2)

# Column types of each table as loaded (a row of another shape means a damaged file).
_NUMBER = (int, float)
_MAYBE_NUMBER = (*_NUMBER, type(None))
_MAYBE_BYTES = (bytes, type(None))
RETAINED_TYPES = (str, str, bytes, int, str, _MAYBE_BYTES, _MAYBE_NUMBER)
SESSION_TYPES = (str, str, str, str, str, str, _MAYBE_NUMBER, str, _MAYBE_NUMBER)
SUBSCRIPTION_TYPES = (str, str, int)
MESSAGE_TYPES = (str, int, str, bytes, int, int, int, int, _MAYBE_BYTES, _MAYBE_NUMBER, str,
                 (str, type(None)))


def unusable(path: str, reason: str) -> StateError:
    return StateError(
        f"broker state file {path!r} cannot be used: {reason}. Nothing was changed: "
        "restore it from a copy, or start once with `keybroker serve --reset-state` "
        "(moves it aside and starts with an empty state)")


class SqliteStateStore:
    def __init__(self, path: str, conn: sqlite3.Connection, executor: ThreadPoolExecutor,
                 lock: int | None = None) -> None:
        self.location = path
        self._conn = conn
        self._executor = executor
        self._lock = lock  # held while open: one daemon per state file

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, sync: bool = False) -> SqliteStateStore:
        """Open (creating it, mode 0600, if missing) and check the state file."""
        location = os.fspath(path)
        lock = None
        if location != IN_MEMORY:  # one daemon per file, checked before anything is read
            try:
                create_private_file(location, "broker state file")
            except KeybrokerError as exc:
                raise StateError(str(exc)) from None
            lock = _lock(location)
        executor = ThreadPoolExecutor(1, thread_name_prefix="keybroker-state")
        try:
            conn = await asyncio.get_running_loop().run_in_executor(
                executor, _connect, location, sync)
        except BaseException:
            executor.shutdown(wait=False)
            if lock is not None:
                os.close(lock)
            raise
        return cls(location, conn, executor, lock)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, self._conn)

    async def load(self) -> Snapshot:
        try:
            return await self._run(_load)
        except sqlite3.Error as exc:
            raise unusable(self.location, str(exc)) from None
        except _BadRow as exc:
            raise unusable(self.location, str(exc)) from None

    async def write(self, batch: Batch) -> None:
        await self._run(lambda conn: _write(conn, batch))

    async def close(self) -> None:
        try:
            await self._run(lambda conn: conn.close())
        finally:
            self._executor.shutdown(wait=True)
            if self._lock is not None:
                os.close(self._lock)  # releases the flock
                self._lock = None


def _lock(path: str) -> int:
    """An exclusive flock on the state file (independent of SQLite's own POSIX locks): two
    daemons writing one state file would each overwrite the other's sessions."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateError(f"broker state file {path}: in use by another keybroker daemon "
                         "(give each daemon its own [persistence] path)") from None
    return fd


# --- on the store's thread ---------------------------------------------------------------


def _connect(path: str, sync: bool) -> sqlite3.Connection:
    in_memory = path == IN_MEMORY
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise unusable(path, str(exc)) from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not in_memory:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {'FULL' if sync else 'NORMAL'}")
        _check_or_create(conn, path)
        if not in_memory:
            for suffix in SIDECARS:  # SQLite gives them the main file's mode; old ones may differ
                tighten_mode(path + suffix)
    except sqlite3.Error as exc:
        conn.close()
        raise unusable(path, str(exc)) from None
    except BaseException:
        conn.close()
        raise
    return conn


def _check_or_create(conn: sqlite3.Connection, path: str) -> None:
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if not tables and not version:
        # One transaction: a file cut short while created would be of no schema.
        conn.executescript(f"BEGIN IMMEDIATE;{SCHEMA}COMMIT;")
        return
    if "meta" not in tables or _meta(conn, "format") != FORMAT:
        raise unusable(path, "not a keybroker state file")
    if version > SCHEMA_VERSION:
        raise unusable(path, f"written by a newer keybroker (state schema {version}, this "
                             f"one reads {SCHEMA_VERSION})")
    if version < 1:
        raise unusable(path, f"unknown state schema {version}")
    problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
    if problems != ["ok"]:
        raise unusable(path, f"damaged ({problems[0]})")
    if version < SCHEMA_VERSION:
        _migrate(conn, version)
        logger.info("broker state file %s: state schema %d migrated to %d", path, version,
                    SCHEMA_VERSION)


def _migrate(conn: sqlite3.Connection, version: int) -> None:
    """From ``version`` to ``SCHEMA_VERSION`` in one transaction: all or nothing."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for step in MIGRATIONS[version - 1:]:
            for statement in step:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def _meta(conn: sqlite3.Connection, name: str) -> Any:
    row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return None if row is None else row[0]


class _BadRow(Exception):
    pass


def _rows(conn: sqlite3.Connection, sql: str, table: str,
          types: tuple[type | tuple[type, ...], ...]) -> Iterable[tuple[Any, ...]]:
    for row in conn.execute(sql):
        if len(row) != len(types) or not all(isinstance(v, t) for v, t in zip(row, types,
                                                                              strict=True)):
            raise _BadRow(f"damaged row in {table}: {str(row)[:120]}")
        yield row


def _load(conn: sqlite3.Connection) -> Snapshot:
    retained = [RetainedRow(*row)
                for row in _rows(conn, LOAD_RETAINED, "retained", RETAINED_TYPES)]
    sessions: dict[str, StoredSession] = {}
    for row in _rows(conn, LOAD_SESSIONS, "sessions", SESSION_TYPES):
        session = SessionRow(*row)
        if session.expiry is not None and session.expiry < 0:
            raise _BadRow(f"damaged row in sessions: {str(row)[:120]}")
        sessions[session.client_id] = StoredSession(session)
    for client_id, topic_filter, packed in _rows(conn, LOAD_SUBSCRIPTIONS, "subscriptions",
                                                 SUBSCRIPTION_TYPES):
        stored = sessions.get(client_id)
        if stored is not None:
            stored.subscriptions[topic_filter] = packed
    for row in _rows(conn, LOAD_MESSAGES, "messages", MESSAGE_TYPES):
        message = MessageRow(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6],
                             bool(row[7]), row[8], row[9], row[10], row[11])
        if message.qos not in (1, 2) or not 0 <= message.packet_id <= 65535:
            raise _BadRow(f"damaged row in messages: {str(row)[:120]}")
        stored = sessions.get(message.client_id)
        if stored is not None:
            stored.messages.append(message)
    position = _meta(conn, "position")
    if not isinstance(position, int):
        raise _BadRow(f"damaged meta position: {position!r}")
    return Snapshot(retained, list(sessions.values()), position)


def _write(conn: sqlite3.Connection, batch: Batch) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        if batch.dropped:
            dropped = [(client_id,) for client_id in batch.dropped]
            for sql in DROP:
                conn.executemany(sql, dropped)
        writes = ((UPSERT_SESSION, batch.sessions), (UNSUBSCRIBE, batch.unsubscribed),
                  (SUBSCRIBE, batch.subscriptions), (REMOVE_MESSAGE, batch.removed_messages),
                  (UPSERT_MESSAGE, batch.messages), (REMOVE_RETAINED, batch.removed_retained),
                  (UPSERT_RETAINED, batch.retained))
        for sql, rows in writes:
            if rows:
                conn.executemany(sql, rows)
        if batch.position is not None:
            conn.execute("UPDATE meta SET value = ? WHERE name = 'position'", (batch.position,))
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


# --- operators ---------------------------------------------------------------------------


def reset_state_file(path: Path) -> Path | None:
    """Move the state file (and its WAL) aside as ``<name>.<time>.bak``, so the daemon
    starts with an empty state; returns the copy's path (None: there was no file)."""
    if str(path) == IN_MEMORY or not path.exists():
        return None
    lock = _lock(str(path))  # never from under a running daemon
    try:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        backup = path.with_name(f"{path.name}.{stamp}.bak")
        counter = 1
        while backup.exists():
            counter += 1
            backup = path.with_name(f"{path.name}.{stamp}-{counter}.bak")
        os.replace(path, backup)
        wal = Path(f"{path}-wal")
        if wal.exists():  # the copy opens with its WAL, as the original would have
            os.replace(wal, Path(f"{backup}-wal"))
        Path(f"{path}-shm").unlink(missing_ok=True)
    finally:
        os.close(lock)
    return backup
