"""An existing keystore (schema 4, made by keybroker before applications existed, in
tests/data) is upgraded in place: everything moves into the application "default", the
keys' secrets still work, names become unique per application, live changes still feed."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from keystore import ConflictError, KeyStore
from keystore.sqlite.migrations import MIGRATIONS, SCHEMA_VERSION

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture
def old_file(tmp_path: Path) -> Path:
    path = tmp_path / "keybroker.db"
    shutil.copy(DATA / "keystore-v4.db", path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 4
    return path


async def test_a_pre_application_keystore_moves_into_default(old_file: Path) -> None:
    secrets = json.loads((DATA / "keystore-v4.secrets.json").read_text())
    async with KeyStore.open(old_file, max_keys=7) as ks:
        (default,) = await ks.list_apps()
        assert default.name == "default" and len(default.id) == 24
        assert default.max_keys == 7  # the configured limit applies, as before
        devices = await ks.list_devices()
        assert [(d.id, d.app_id) for d in devices] == [
            ("gw-1", default.id), ("s-1", default.id), ("s-2", default.id)]
        keys = {k.name: k for k in await ks.list_keys()}
        assert set(keys) == {"site-lyon", "all", "s2"}
        assert all(k.app_id == default.id for k in keys.values())
        assert keys["site-lyon"].pub_topics == ("alerts/#",)
        assert keys["all"].status.value == "inactive"
        assert keys["s2"].addresses == ("10.0.0.0/8",)
        # The secrets made before the upgrade still authenticate, scopes still resolve.
        site = secrets["site-lyon"]
        found = await ks.connect_lookup(site["key"], site["secret"], "s-1")
        assert found.key is not None and found.scope == {"gw-1", "s-1"}
        assert (await ks.connect_lookup(site["key"], "wrong", "s-1")).key is None
        # Key names are unique per application now, not across them.
        await ks.create_app("other")
        await ks.create_key(name="all", app="other")
        with pytest.raises(ConflictError):
            await ks.create_key(name="all")
        # The rebuilt table's triggers still feed the daemon.
        before = await ks.latest_change_id()
        await ks.set_status([keys["s2"].key], "inactive")
        changes = await ks.changes_since(before)
        assert [(c.kind, c.subject) for c in changes] == [("key_status", keys["s2"].key)]
    with sqlite3.connect(old_file) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []


async def test_deleting_a_migrated_key_still_cascades(old_file: Path) -> None:
    async with KeyStore.open(old_file) as ks:
        key = (await ks.list_keys({"name": "site-lyon"}))[0]
        await ks.delete_keys([key.key])
    with sqlite3.connect(old_file) as conn:
        conn.execute("PRAGMA foreign_keys = ON")
        assert conn.execute("SELECT count(*) FROM key_tags WHERE key = ?",
                            (key.key,)).fetchone()[0] == 0


async def test_existing_keys_get_api_ids_and_the_token_tables_work(old_file: Path) -> None:
    async with KeyStore.open(old_file) as ks:
        keys = await ks.list_keys()
        ids = [k.id for k in keys]
        assert len(set(ids)) == len(keys) == 3
        assert all(len(i) == 24 and int(i, 16) >= 0 for i in ids)
        assert (await ks.get_key_by_id(ids[0])).key == keys[0].key  # findable by id
        row, token = await ks.create_token("ops")
        assert (await ks.check_token(token, row.created_at)) == row
        s1 = next(k for k in keys if k.name == "site-lyon")
        device_token, _ = await ks.create_device_token(s1, "s-1", 60)
        found = await ks.device_token_lookup(device_token, row.created_at)
        assert found is not None and found.device_id == "s-1"


async def test_a_keystore_of_the_authsvc_preview_schema_7_is_migrated(old_file: Path) -> None:
    """keybroker authsvc first numbered its connection snapshots 7; today's 7 is the tag
    rows' application. Such a file gets today's 7 and is then at 8, snapshots kept (and
    then at today's version)."""
    with sqlite3.connect(old_file, isolation_level=None) as conn:
        for statement in [*MIGRATIONS[4], *MIGRATIONS[5], *MIGRATIONS[7]]:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 7")
    secrets = json.loads((DATA / "keystore-v4.secrets.json").read_text())
    site = secrets["site-lyon"]
    async with KeyStore.open(old_file) as ks:
        found = await ks.connect_lookup(site["key"], site["secret"], "s-1")
        assert found.key is not None and found.scope == {"gw-1", "s-1"}
        await ks.record_connection("s-1", site["key"], found.scope, "p", "10.0.0.1",
                                   found.key.created_at)
        row = await ks.connection("s-1")
        assert row is not None and await ks.connection_scope(row.snapshot) == {"gw-1", "s-1"}
    with sqlite3.connect(old_file) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 10
        assert conn.execute("SELECT count(*) FROM device_tags WHERE app_id = ''").fetchone() \
            == (0,)
