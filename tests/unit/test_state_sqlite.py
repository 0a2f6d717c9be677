"""The SQLite broker-state store (broker.state.sqlite) on a real file: what MQTT 5 added
to its rows is written and read back as it was, a file of state schema 1 is migrated
in one transaction, and a file of a newer schema is refused unchanged."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from broker.state.model import Batch, MessageRow, RetainedRow, SessionRow, SubscriptionRow
from broker.state.sqlite import SCHEMA_VERSION, SqliteStateStore
from broker.state.store import StateError
from broker.topics.trie import options

# The state file as keybroker wrote it before MQTT 5 (state schema 1), as it was created.
SCHEMA_1 = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value);
CREATE TABLE retained (
    mount TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL,
    bucket TEXT NOT NULL, PRIMARY KEY (mount, topic));
CREATE TABLE sessions (
    client_id TEXT PRIMARY KEY, mount TEXT NOT NULL, key TEXT NOT NULL,
    listener TEXT NOT NULL, client_ip TEXT NOT NULL, peer_ip TEXT NOT NULL,
    disconnected_at REAL, inflight_in TEXT NOT NULL);
CREATE TABLE subscriptions (
    client_id TEXT NOT NULL, filter TEXT NOT NULL, qos INTEGER NOT NULL,
    PRIMARY KEY (client_id, filter)) WITHOUT ROWID;
CREATE TABLE messages (
    client_id TEXT NOT NULL, seq INTEGER NOT NULL, topic TEXT NOT NULL,
    payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL,
    packet_id INTEGER NOT NULL, released INTEGER NOT NULL, PRIMARY KEY (client_id, seq));
INSERT INTO meta VALUES ('format', 'keybroker-state'), ('position', 0);
PRAGMA user_version = 1;
"""

GROUP = "\x00app/g\x00jobs/#"  # a shared subscription's group key (broker.mqtt.shared)


def schema_1_file(path: Path, then: str = "") -> Path:
    """A file of schema 1 with a row in each table; ``then``: SQL run on it afterwards."""
    path.touch(0o600)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(SCHEMA_1)
        db.execute("INSERT INTO retained VALUES ('app/', 'cfg', x'01', 1, 'k:key1')")
        db.execute("INSERT INTO sessions VALUES ('dev', 'app/', 'key1', 'tcp', '10.0.0.1', "
                   "'10.0.0.1', 1700000000.5, '3')")
        db.execute("INSERT INTO subscriptions VALUES ('dev', 'cmd/#', 2)")
        db.execute("INSERT INTO messages VALUES ('dev', 1, 'cmd/x', x'02', 1, 0, 5, 0)")
        db.executescript(then)
    return path


def file_schema(path: Path) -> tuple[int, list[str]]:
    """The file's user_version and its messages table's columns."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        columns = [row[1] for row in db.execute("PRAGMA table_info(messages)")]
    return version, columns


def contents(path: Path) -> tuple[int, list[str]]:
    """Everything the file holds: its user_version, its schema and its rows."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("PRAGMA user_version").fetchone()[0], list(db.iterdump())


async def test_what_mqtt5_adds_is_written_and_read_back_as_it_was(tmp_path: Path) -> None:
    forward = b"\x26\x00\x01k\x00\x01v"  # a User Property, encoded as it is carried
    batch = Batch(
        sessions=(SessionRow("v5", "app/", "key1", "tcp", "::1", "::1", 1.5, "", 5.0),
                  SessionRow("never", "app/", "key1", "tcp", "::1", "::1", 2.5, "",
                             float("inf")),
                  SessionRow("v3", "app/", "key1", "tcp", "::1", "::1", None, "1 2")),
        subscriptions=(SubscriptionRow("v5", "a/#", options(1, True, True, 2, 268435455)),
                       SubscriptionRow("v5", "$share/g/jobs/#", options(2, sub_id=9))),
        messages=(MessageRow("v5", 1, "a/b", b"x", 1, False, 7, False, forward,
                             1700000300.25, "268435455 9", GROUP),
                  MessageRow("v5", 2, "a/c", b"", 2, True, 0, False, b"", None, "", None),
                  MessageRow("v3", 1, "a/d", b"y", 2, False, 0, False)),
        retained=(RetainedRow("app/", "cfg/v5", b"z", 1, "d:v5", forward, 1700000600.0),
                  RetainedRow("app/", "cfg/v3", b"w", 0, "k:key1")),
        position=3)
    store = await SqliteStateStore.open(tmp_path / "state.db")
    try:
        await store.write(batch)
    finally:
        await store.close()

    store = await SqliteStateStore.open(tmp_path / "state.db")
    try:
        snapshot = await store.load()
    finally:
        await store.close()
    assert snapshot.retained == list(batch.retained)
    sessions = {stored.row.client_id: stored for stored in snapshot.sessions}
    assert [sessions[row.client_id].row for row in batch.sessions] == list(batch.sessions)
    assert sessions["v5"].subscriptions == {row.filter: row.options
                                            for row in batch.subscriptions}
    assert sessions["v5"].messages == list(batch.messages[:2])
    assert sessions["v3"].messages == [batch.messages[2]]
    assert snapshot.position == 3


async def test_a_file_of_schema_1_is_migrated_and_its_rows_load_as_mqtt_311(
        tmp_path: Path) -> None:
    path = schema_1_file(tmp_path / "state.db")
    store = await SqliteStateStore.open(path)
    try:
        snapshot = await store.load()
    finally:
        await store.close()
    assert file_schema(path) == (SCHEMA_VERSION, list(MessageRow._fields))
    assert snapshot.retained == [RetainedRow("app/", "cfg", b"\x01", 1, "k:key1")]
    (stored,) = snapshot.sessions
    assert stored.row == SessionRow("dev", "app/", "key1", "tcp", "10.0.0.1", "10.0.0.1",
                                    1700000000.5, "3")
    assert stored.row.expiry is None  # the server's session_expiry, as before
    assert stored.subscriptions == {"cmd/#": 2}
    assert stored.messages == [MessageRow("dev", 1, "cmd/x", b"\x02", 1, False, 5, False)]


async def test_a_migration_that_fails_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    """All or nothing: a step that cannot be applied (here a column already there) undoes
    the steps before it, and the start stops naming the file."""
    path = schema_1_file(tmp_path / "state.db",
                         "ALTER TABLE messages ADD COLUMN share TEXT;")
    before = contents(path)
    with pytest.raises(StateError, match="duplicate column name: share") as refused:
        await SqliteStateStore.open(path)
    assert str(path) in str(refused.value)
    assert contents(path) == before  # its first steps (retained, sessions) undone too
    assert file_schema(path) == (1, [*MessageRow._fields[:8], "share"])


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0])
async def test_a_file_of_a_newer_or_unknown_schema_is_refused_unchanged(
        tmp_path: Path, version: int) -> None:
    path = schema_1_file(tmp_path / "state.db", f"PRAGMA user_version = {version};")
    before = contents(path)
    with pytest.raises(StateError) as refused:
        await SqliteStateStore.open(path)
    message = str(refused.value)
    assert str(path) in message and "--reset-state" in message
    assert (f"newer keybroker (state schema {version}" in message if version
            else "unknown state schema 0" in message)
    assert contents(path) == before
