"""An application's device limit on each backend (a real SQLite file, a real PostgreSQL
database): the same shape as its key limit. ``[keystore] max_devices`` is the limit of
applications that set none, an application may set its own, 0 is no limit, and adding a
device past it, one at a time or in bulk, is refused whole with one line naming the
application and the limit."""

# The statements below are literal test fixtures.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import contextlib
import sqlite3

import asyncpg
import pytest

from keystore import KeyStore, LimitError, ValidationError
from keystore.location import is_url
from keystore.postgres import migrations as pg_migrations
from keystore.sqlite import migrations as sqlite_migrations
from tests.support.dbdump import dump
from tests.support.postgres import PostgresServer


async def test_the_configured_limit_applies_to_applications_that_set_none(
    keystore_target: str,
) -> None:
    async with KeyStore.open(keystore_target, max_devices=2) as ks:
        assert (await ks.app()).max_devices == 2
        await ks.add_device("d1")
        await ks.add_device("d2", tags=["floor=1"])
        before = dump(keystore_target)
        with pytest.raises(LimitError) as refused:
            await ks.add_device("d3", tags=["floor=1"])
        assert str(refused.value) == (
            "device limit of 2 reached in application 'default': it holds 2, cannot add 1 more")
        assert dump(keystore_target) == before  # not the device, not its tags
        assert await ks.count_devices() == 2


async def test_a_bulk_upsert_past_the_limit_writes_nothing(keystore_target: str) -> None:
    async with KeyStore.open(keystore_target, max_devices=3) as ks:
        await ks.upsert_devices([("d1", None, []), ("d2", None, [])])
        before = dump(keystore_target)
        with pytest.raises(LimitError, match=r"device limit of 3 reached in application "
                                             r"'default': it holds 2, cannot add 2 more"):
            # One of the four is new but renames d1: nothing of it may be written either.
            await ks.upsert_devices([("d1", "renamed", []), ("d2", None, []),
                                     ("d3", None, []), ("d4", None, [])])
        assert dump(keystore_target) == before
        # Changing devices that exist adds none: allowed at the limit, as is reaching it.
        assert await ks.upsert_devices([("d1", "renamed", ["a=1"]), ("d3", None, [])]) == 2
        assert await ks.upsert_devices([("d1", "renamed", ["a=2"]), ("d2", "x", [])]) == 2
        with pytest.raises(LimitError, match="device limit of 3"):
            await ks.upsert_devices([("d5", None, [])])
        assert sorted(d.id for d in await ks.list_devices()) == ["d1", "d2", "d3"]


async def test_an_application_sets_its_own_limit(keystore_target: str) -> None:
    async with KeyStore.open(keystore_target, max_devices=5) as ks:
        small = await ks.create_app("small", max_devices=1)
        free = await ks.create_app("free", max_devices=0)
        made = await ks.create_app("made")  # none given: the configured one, stored
        assert (small.max_devices, free.max_devices, made.max_devices) == (1, 0, 5)
        await ks.add_device("s1", app="small")
        with pytest.raises(LimitError, match="device limit of 1 reached in application "
                                             "'small'"):
            await ks.add_device("s2", app="small")
        await ks.upsert_devices([(f"f{i}", None, []) for i in range(7)], app="free")
        assert await ks.count_devices(app="free") == 7  # 0: no limit, whatever the config
        assert (await ks.update_app("small", max_devices=2)).max_devices == 2
        await ks.add_device("s2", app="small")
        assert (await ks.update_app("small", max_devices=0)).max_devices == 0
        await ks.add_device("s3", app="small")
        # The devices of one application do not count against another's limit.
        assert await ks.count_devices(app="made") == 0
        assert await ks.count_devices() == 0
    async with KeyStore.open(keystore_target, max_devices=0) as ks:
        # What an application was made with stays; "default" follows the configuration.
        limits = {a.name: a.max_devices for a in await ks.list_apps()}
        assert limits == {"default": 0, "small": 0, "free": 0, "made": 5}


@pytest.mark.parametrize("value", [-1, True, 1.5, "3", None])
async def test_a_limit_that_is_not_a_count_is_refused(keystore_target: str,
                                                       value: object) -> None:
    async with KeyStore.open(keystore_target) as ks:
        before = dump(keystore_target)
        with pytest.raises(ValidationError, match=f"invalid max_devices {value!r}: must be "
                                                  r"0 \(no limit\) or more"):
            await ks.create_app("x", max_devices=value)
        with pytest.raises(ValidationError, match="invalid max_devices"):
            await ks.update_app("default", max_devices=value)
        assert dump(keystore_target) == before
    with pytest.raises(ValidationError, match="invalid max_devices"):
        await KeyStore.open(keystore_target, max_devices=value)  # type: ignore[arg-type]


async def test_applications_older_than_the_limit_follow_the_configured_one(
    keystore_target: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A keystore at the schema before the device limit: its applications stored none,
    so after the migration each follows ``[keystore] max_devices``."""
    target = keystore_target
    if is_url(target):  # a database of its own, not the migrated template's clone
        server: PostgresServer = request.getfixturevalue("postgres")
        name = "before_device_limit"
        server.admin(f"CREATE DATABASE {name}")
        request.addfinalizer(lambda: server.drop_database(name))
        target = server.url(name)
    steps = pg_migrations if is_url(target) else sqlite_migrations
    with monkeypatch.context() as old:
        old.setattr(steps, "MIGRATIONS", steps.MIGRATIONS[:9])
        old.setattr(steps, "SCHEMA_VERSION", 9)
        await (await KeyStore.open(target)).close()  # the schema before the limit
    insert = ("INSERT INTO applications (id, name, description, max_keys, created_at, "
              "updated_at) VALUES ('0123456789abcdef01234567', 'old', NULL, 3, 0, 0)")
    if is_url(target):
        conn = await asyncpg.connect(target)
        await conn.execute(insert)
        await conn.close()
    else:
        with contextlib.closing(sqlite3.connect(target, isolation_level=None)) as file:
            file.execute(insert)
    async with KeyStore.open(target, max_devices=1) as ks:
        old_app = await ks.app("old")
        assert (old_app.max_keys, old_app.max_devices) == (3, 1)
        assert (await ks.app()).max_devices == 1
        await ks.add_device("o1", app="old")
        with pytest.raises(LimitError, match="device limit of 1 reached in application 'old'"):
            await ks.add_device("o2", app="old")


async def test_the_limit_holds_across_concurrent_processes(keystore_target: str) -> None:
    """Two keystores on one database (the daemon and a CLI) adding devices at once never
    pass the limit together (PostgreSQL: the application row is locked for the count;
    SQLite: one writer at a time)."""
    async with KeyStore.open(keystore_target, max_devices=5) as one, \
            KeyStore.open(keystore_target, max_devices=5) as two:
        results = await asyncio.gather(
            *(store.add_device(f"{name}{i}") for i in range(4)
              for name, store in (("a", one), ("b", two))),
            *(store.upsert_devices([(f"{name}-bulk", None, [])])
              for name, store in (("a", one), ("b", two))),
            return_exceptions=True)
        refused = [r for r in results if isinstance(r, BaseException)]
        assert all(isinstance(r, LimitError) for r in refused), refused
        assert len(refused) == 5 and await one.count_devices() == 5

