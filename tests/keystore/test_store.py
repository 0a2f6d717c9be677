"""KeyStore: SQLite file safety and migrations; devices and scope resolution on each backend
(a real SQLite file, a real PostgreSQL database)."""

# Table names below come from sqlite_master, not from input.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from keystore import (
    AccessKey,
    ConflictError,
    KeybrokerError,
    KeyStore,
    NotFoundError,
    ValidationError,
)
from keystore.sql.statements import render
from keystore.sqlite.dialect import SQLITE, qmarks
from keystore.sqlite.migrations import SCHEMA_VERSION
from tests.support.dbdump import dump


@pytest.fixture
async def ks(keystore_target: str) -> AsyncIterator[KeyStore]:
    async with KeyStore.open(keystore_target) as store:
        yield store


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# --- the file -----------------------------------------------------------------------------


async def test_database_file_and_sidecars_are_private(db_path: Path) -> None:
    with umask(0):  # a permissive umask must not make the keystore world-readable
        async with KeyStore.open(db_path) as store:
            await store.add_device("d1")
            for suffix in ("", "-wal", "-shm"):
                target = Path(f"{db_path}{suffix}")
                if target.exists():
                    assert stat.S_IMODE(target.stat().st_mode) == 0o600, suffix
            assert Path(f"{db_path}-wal").exists()  # WAL mode is on


async def test_fresh_file_is_migrated_and_reopening_is_idempotent(db_path: Path) -> None:
    db_path.touch()  # an existing empty file is a fresh database
    async with KeyStore.open(db_path) as store:
        await store.add_device("d1", tags=["a=1"])
    first = dump(db_path)
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "device_tags_by_app_pair" in indexes
    async with KeyStore.open(db_path) as store:
        assert (await store.get_device("d1")).tags == (("a", "1"),)
    assert dump(db_path) == first
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_newer_schema_is_refused(db_path: Path) -> None:
    async with KeyStore.open(db_path):
        pass
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.commit()
    with pytest.raises(KeybrokerError, match="newer than this keybroker supports"):
        async with KeyStore.open(db_path):
            pass


async def test_without_create_a_missing_or_empty_file_is_not_made_a_keystore(
    db_path: Path,
) -> None:
    with pytest.raises(NotFoundError, match="no keystore at .* \\(no file\\)"):
        async with KeyStore.open(db_path, create=False):
            pass
    assert not db_path.exists()
    db_path.touch()
    with pytest.raises(NotFoundError, match="no keystore at .* \\(an empty file\\)"):
        async with KeyStore.open(db_path, create=False):
            pass
    assert db_path.read_bytes() == b""
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        conn.executescript("CREATE TABLE t (x); DROP TABLE t")  # SQLite, holding nothing
    assert db_path.read_bytes().startswith(b"SQLite format 3")
    with pytest.raises(NotFoundError, match="an empty SQLite database"):
        async with KeyStore.open(db_path, create=False):
            pass
    async with KeyStore.open(db_path) as store:  # create (the default) makes it one
        await store.add_device("d1")
    async with KeyStore.open(db_path, create=False) as store:
        assert [d.id for d in await store.list_devices()] == ["d1"]


async def test_unopenable_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KeybrokerError, match="cannot open keystore"):
        async with KeyStore.open(tmp_path / "missing-dir" / "ks.db"):
            pass


async def test_open_can_be_awaited_and_closed(keystore_target: str) -> None:
    store = await KeyStore.open(keystore_target)
    try:
        await store.add_device("d1")
    finally:
        await store.close()
    async with KeyStore.open(keystore_target) as again:
        assert await again.device_exists("d1")


async def test_two_stores_share_the_file(db_path: Path) -> None:
    """The CLI and the daemon each hold a connection to the same file."""
    async with KeyStore.open(db_path) as daemon, KeyStore.open(db_path) as cli:
        before = await daemon.change_marker()
        await cli.add_device("d1")
        assert await daemon.device_exists("d1")
        assert await daemon.change_marker() != before


async def test_concurrent_operations_on_one_store_do_not_interleave(ks: KeyStore) -> None:
    await asyncio.gather(*(ks.add_device(f"d{i}", tags=[f"n={i}"]) for i in range(50)))
    assert await ks.count_devices() == 50


# --- devices ------------------------------------------------------------------------------


async def test_add_get_list_devices(ks: KeyStore) -> None:
    added = await ks.add_device("gw-1", name="Gateway", tags=["floor=1", ("floor", "2"), "kind=gw"])
    assert added.tags == (("floor", "1"), ("floor", "2"), ("kind", "gw"))
    assert added.created_at.tzinfo is UTC
    assert await ks.get_device("gw-1") == added
    await ks.add_device("a")
    assert [d.id for d in await ks.list_devices()] == ["a", "gw-1"]
    assert await ks.count_devices() == 2
    assert await ks.device_exists("a") and not await ks.device_exists("b")


async def test_duplicate_device_is_a_conflict(ks: KeyStore) -> None:
    await ks.add_device("d1", name="first")
    with pytest.raises(ConflictError, match="device 'd1' already exists"):
        await ks.add_device("d1", name="second")
    assert (await ks.get_device("d1")).name == "first"


@pytest.mark.parametrize(
    ("device_id", "tags", "message"),
    [
        ("bad/id", (), "invalid device id 'bad/id'"),
        ("d1", ["floor"], "invalid tag 'floor': must be key=value"),
        ("d1", ["=x"], "invalid tag key ''"),
        ("d1", [("a=b", "c")], "must not contain '='"),
    ],
)
async def test_invalid_device_writes_nothing(
    ks: KeyStore, keystore_target: str, device_id: str, tags: Any, message: str
) -> None:
    before = dump(keystore_target)
    with pytest.raises(ValidationError, match=message):
        await ks.add_device(device_id, tags=tags)
    assert dump(keystore_target) == before


async def test_get_unknown_device(ks: KeyStore) -> None:
    with pytest.raises(NotFoundError, match="no device 'ghost'"):
        await ks.get_device("ghost")


async def test_tag_and_untag(ks: KeyStore) -> None:
    await ks.add_device("d1", tags=["floor=1"])
    tagged = await ks.tag_device("d1", ["floor=2", "room=a", "floor=1"])
    assert tagged.tags == (("floor", "1"), ("floor", "2"), ("room", "a"))
    assert (await ks.untag_device("d1", ["floor=1"])).tags == (("floor", "2"), ("room", "a"))
    assert (await ks.untag_device("d1", ["floor"])).tags == (("room", "a"),)


async def test_untag_spec_matching_nothing_removes_nothing(ks: KeyStore) -> None:
    await ks.add_device("d1", tags=["floor=1", "room=a"])
    with pytest.raises(NotFoundError, match="device 'd1' has no tag matching 'floor=9'"):
        await ks.untag_device("d1", ["room", "floor=9"])
    with pytest.raises(NotFoundError, match="no tag matching 'color'"):
        await ks.untag_device("d1", ["color"])
    assert (await ks.get_device("d1")).tags == (("floor", "1"), ("room", "a"))


async def test_remove_devices_all_or_nothing(ks: KeyStore) -> None:
    for d in ("a", "b", "c"):
        await ks.add_device(d, tags=["t=1"])
    with pytest.raises(NotFoundError, match="no device 'zz'"):
        await ks.remove_devices(["a", "zz"])
    assert await ks.count_devices() == 3
    assert await ks.remove_devices(["a", "b", "a"]) == ["a", "b"]
    assert [d.id for d in await ks.list_devices()] == ["c"]


async def test_upsert_devices_inserts_updates_and_is_idempotent(ks: KeyStore) -> None:
    await ks.add_device("old", name="Old", tags=["keep=1", "drop=1"])
    items = [("old", "Renamed", ["keep=1", "new=1"]), ("fresh", None, [("floor", "3")])]
    assert await ks.upsert_devices(items) == 2
    old = await ks.get_device("old")
    assert old.name == "Renamed" and old.tags == (("keep", "1"), ("new", "1"))
    assert (await ks.get_device("fresh")).tags == (("floor", "3"),)
    assert await ks.upsert_devices(items) == 0  # nothing left to change
    assert (await ks.get_device("old")).updated_at == old.updated_at


async def test_upsert_validates_everything_first(ks: KeyStore, keystore_target: str) -> None:
    before = dump(keystore_target)
    with pytest.raises(ValidationError, match="invalid device id 'b#'"):
        await ks.upsert_devices([("a", None, ()), ("b#", None, ())])
    with pytest.raises(ValidationError, match="device 'a' appears more than once"):
        await ks.upsert_devices([("a", None, ()), ("a", "x", ())])
    assert dump(keystore_target) == before


async def test_connection_status_is_recorded(ks: KeyStore) -> None:
    await ks.add_device("d1")
    when = datetime(2030, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    await ks.set_devices_connected(["d1", "unknown"], True, when)
    device = await ks.get_device("d1")
    assert device.connected and device.last_seen == when
    await ks.set_devices_connected(["d1"], False, when)
    assert not (await ks.get_device("d1")).connected


# --- scope resolution -----------------------------------------------------------------


@pytest.fixture
async def fleet(ks: KeyStore) -> KeyStore:
    await ks.upsert_devices(
        [
            ("d1", None, ["floor=1"]),
            ("d2", None, ["floor=1", "kind=sensor"]),
            ("d3", None, ["floor=2"]),
            ("d4", None, ["kind=gw"]),
            ("d5", None, []),
        ]
    )
    return ks


async def in_scope(store: KeyStore, key: AccessKey, secret: str, device: str) -> bool:
    """What CONNECT learns about one device (the daemon's path: connect_lookup)."""
    return (await store.connect_lookup(key.key, secret, device)).device_in_scope


async def test_unrestricted_key_has_no_scope_set(fleet: KeyStore) -> None:
    key, secret = await fleet.create_key()
    assert key.all_devices
    assert await fleet.resolve_scope(key) is None
    assert await in_scope(fleet, key, secret, "d5")
    assert not await in_scope(fleet, key, secret, "ghost")


async def test_scope_by_ids(fleet: KeyStore) -> None:
    key, secret = await fleet.create_key(device_ids=["d1", "d5"])
    assert await fleet.resolve_scope(key) == {"d1", "d5"}
    assert await in_scope(fleet, key, secret, "d5")
    assert not await in_scope(fleet, key, secret, "d2")


async def test_scope_by_tags_is_any_listed_pair(fleet: KeyStore) -> None:
    key, secret = await fleet.create_key(device_tags=["floor=1", "kind=gw"])
    assert await fleet.resolve_scope(key) == {"d1", "d2", "d4"}
    assert await in_scope(fleet, key, secret, "d4")
    assert not await in_scope(fleet, key, secret, "d3")


async def test_scope_by_ids_and_tags(fleet: KeyStore) -> None:
    key, _ = await fleet.create_key(device_ids=["d3"], device_tags=[("kind", "sensor")])
    assert await fleet.resolve_scope(key) == {"d2", "d3"}


async def test_scope_follows_tag_changes_and_deletions(fleet: KeyStore) -> None:
    key, secret = await fleet.create_key(device_ids=["d5"], device_tags=["floor=2"])
    assert await fleet.resolve_scope(key) == {"d3", "d5"}
    assert await in_scope(fleet, key, secret, "d3")
    await fleet.tag_device("d1", ["floor=2"])
    await fleet.untag_device("d3", ["floor"])
    assert await fleet.resolve_scope(key) == {"d1", "d5"}
    assert await in_scope(fleet, key, secret, "d1")
    assert not await in_scope(fleet, key, secret, "d3")
    await fleet.remove_devices(["d5"])
    assert await fleet.resolve_scope(key) == {"d1"}
    assert not await in_scope(fleet, key, secret, "d5")
    # The restriction itself is immutable: a re-created d5 is in scope again.
    await fleet.add_device("d5")
    assert await fleet.resolve_scope(key) == {"d1", "d5"}
    assert (await fleet.get_key(key.key)).device_ids == ("d5",)


async def test_scope_lookups_use_indexes(db_path: Path) -> None:
    """No full scan of devices or device_tags when resolving a scope (SQLite; the
    PostgreSQL plans: tests/keystore/test_postgres.py)."""
    async with KeyStore.open(db_path) as store:
        await store.upsert_devices([("d1", None, ["floor=1"]), ("d2", None, ["floor=1"])])
        key, _ = await store.create_key(device_ids=["d1"], device_tags=["floor=1"])
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        plan = conn.execute(f"EXPLAIN QUERY PLAN {qmarks(render(SQLITE).scope)}",
                            (key.key, key.app_id)).fetchall()
        plan += conn.execute(f"EXPLAIN QUERY PLAN {qmarks(render(SQLITE).connect)}",
                             (key.key,)).fetchall()
    details = [row[3] for row in plan]
    # The CONNECT read is a LEFT JOIN on a one-row constant: "SCAN (subquery-N)" is that.
    scans = [d for d in details if d.startswith("SCAN") and d != "SCAN CONSTANT ROW"
             and not d.startswith("SCAN (subquery")]
    assert not scans, details
    assert any("device_tags_by_app_pair" in d for d in details), details


@pytest.mark.parametrize("prefix", ["", "a/b", "+", "#", "$dev"])
async def test_bad_device_prefix_is_refused(db_path: Path, prefix: str) -> None:
    with pytest.raises(ValidationError, match="invalid device prefix"):
        async with KeyStore.open(db_path, device_prefix=prefix):
            pass
    assert not db_path.exists()  # refused before the file is created
