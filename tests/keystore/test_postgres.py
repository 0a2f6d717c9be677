"""What only the PostgreSQL keystore has (a real server): index-only CONNECT and scope
plans, migrations under concurrency, the pool and statement timeout from the settings,
locks that keep checks true across processes, and the change feed pushed by
LISTEN/NOTIFY, re-established after a lost connection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from keystore import KeybrokerError, KeyStore, LimitError
from keystore.errors import UnavailableError
from keystore.postgres import migrations
from keystore.postgres.dialect import POSTGRES
from keystore.postgres.listen import LISTENER_NAME
from keystore.postgres.migrations import SCHEMA_VERSION
from keystore.sql.statements import render
from tests.support.postgres import PostgresServer


@pytest.fixture
async def admin(pg_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test's database, outside the keystore."""
    conn = await asyncpg.connect(pg_url)
    try:
        yield conn
    finally:
        await conn.close()


def plan_nodes(plan: Any) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes += plan_nodes(child)
    return nodes


async def scans(conn: asyncpg.Connection, sql: str, *args: Any) -> dict[str, set[str]]:
    """relation -> the scan types the plan uses on it."""
    doc = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args))
    out: dict[str, set[str]] = {}
    for node in plan_nodes(doc[0]["Plan"]):
        if "Relation Name" in node:
            out.setdefault(node["Relation Name"], set()).add(node["Node Type"])
    return out


async def test_connect_and_scope_lookups_are_index_only(pg_url: str,
                                                        admin: asyncpg.Connection) -> None:
    async with KeyStore.open(pg_url) as ks:
        await ks.upsert_devices([(f"d{i}", None, [f"floor={i % 50}", f"n={i}"])
                                 for i in range(5000)])
        other = await ks.create_app("other")  # the same tag pair in another application
        ks.default_app = other.id
        await ks.upsert_devices([(f"o{i}", None, ["floor=7"]) for i in range(30)])
        ks.default_app = "default"
        await ks.create_keys([{"device_ids": [f"d{i}"], "device_tags": [f"n={i}"]}
                              for i in range(2000)])
        key, _ = await ks.create_key(device_ids=["d1", "d2"], device_tags=["floor=7"])
        await admin.execute("VACUUM ANALYZE")
        connect = await scans(admin, render(POSTGRES).connect, key.key)
        scope = await scans(admin, render(POSTGRES).scope, key.key, key.app_id)
        device = await scans(admin, "SELECT app_id FROM devices WHERE id = $1", "d3")
        assert len(await ks.resolve_scope(key) or ()) == 100 + 2
    # Never a scan of a table (the one-row meta table aside); the key's own row is read
    # by its primary key, and the side that grows with the fleet (the application's
    # devices carrying a tag pair) is one index range, with no lookup per device.
    for plan in (connect, scope, device):
        assert not [r for r, kinds in plan.items() if "Seq Scan" in kinds and r != "meta"], plan
    assert connect["access_keys"] == {"Index Scan"}, connect
    assert scope["device_tags"] == {"Index Only Scan"}, scope
    assert device["devices"] == {"Index Only Scan"}, device


async def test_a_fresh_database_is_migrated_once_by_concurrent_openers(
    postgres: PostgresServer,
) -> None:
    name = "fresh_concurrent"
    postgres.admin(f"CREATE DATABASE {name}")
    try:
        url = postgres.url(name)
        stores = await asyncio.gather(*(KeyStore.open(url) for _ in range(4)))
        await stores[0].add_device("d1")
        assert all([await s.device_exists("d1") for s in stores])
        for store in stores:
            await store.close()
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT version FROM keybroker_schema") == SCHEMA_VERSION
            assert await conn.fetchval("SELECT count(*) FROM applications") == 1
            await conn.execute("UPDATE keybroker_schema SET version = version + 1")
        finally:
            await conn.close()
        with pytest.raises(KeybrokerError, match="newer than this keybroker supports"):
            await KeyStore.open(url)
    finally:
        postgres.drop_database(name)


async def test_location_never_shows_the_password(pg_url: str) -> None:
    with_password = pg_url.replace("keybroker@", "keybroker:hunter2@")
    async with KeyStore.open(with_password) as ks:
        assert ks.location == pg_url and "hunter2" not in ks.location


async def test_the_pool_is_sized_from_the_settings(pg_url: str,
                                                   admin: asyncpg.Connection) -> None:
    async with KeyStore.open(pg_url, pool_size=3) as ks:
        await asyncio.gather(*(ks.add_device(f"d{i}", tags=["a=1"]) for i in range(40)))
        opened = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'keybroker'")
        assert 2 <= opened <= 3
        assert await ks.count_devices() == 40


async def test_a_statement_over_the_timeout_is_unavailable_not_a_hang(
    pg_url: str, admin: asyncpg.Connection,
) -> None:
    async with KeyStore.open(pg_url, statement_timeout=0.3) as ks:
        await ks.add_device("d1")
        blocker = admin.transaction()
        await blocker.start()
        await admin.execute("LOCK TABLE devices IN ACCESS EXCLUSIVE MODE")
        started = asyncio.get_running_loop().time()
        with pytest.raises(UnavailableError, match=r"did not answer within 0\.3s"):
            await ks.count_devices()
        assert asyncio.get_running_loop().time() - started < 2
        await blocker.rollback()
        assert await ks.count_devices() == 1  # one slow statement is not an outage


async def test_the_key_limit_holds_across_concurrent_processes(pg_url: str) -> None:
    async with KeyStore.open(pg_url, max_keys=5) as one, \
            KeyStore.open(pg_url, max_keys=5) as two:
        results = await asyncio.gather(
            *(store.create_key() for _ in range(6) for store in (one, two)),
            return_exceptions=True)
        assert sum(not isinstance(r, BaseException) for r in results) == 5
        assert all(isinstance(r, LimitError) for r in results if isinstance(r, BaseException))
        assert await one.count_keys() == 5


async def wait_for(event: asyncio.Event, timeout: float = 5.0) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True


async def test_a_commit_elsewhere_wakes_the_watcher_at_once(pg_url: str) -> None:
    async with KeyStore.open(pg_url) as daemon, KeyStore.open(pg_url) as cli:
        await cli.add_device("d1")
        key, _ = await cli.create_key()
        start = await daemon.latest_change_id()
        woken = asyncio.Event()
        assert await daemon.watch_changes(woken.set) is True
        assert await wait_for(woken)  # listening: it wakes once to catch up
        woken.clear()
        await cli.add_device("d2")  # no change-feed row: no wake-up
        assert not await wait_for(woken, 0.5)
        await cli.set_status([key.key], "inactive")
        assert await wait_for(woken, 2.0)
        changes = await daemon.changes_since(start)
        assert [(c.kind, c.subject) for c in changes] == [("key_status", key.key)]
        assert await daemon.change_marker() == (changes[-1].id, 0)


async def test_a_lost_listen_connection_comes_back_and_catches_up(
    pg_url: str, admin: asyncpg.Connection,
) -> None:
    async with KeyStore.open(pg_url) as daemon, KeyStore.open(pg_url) as cli:
        woken = asyncio.Event()
        await daemon.watch_changes(woken.set)
        assert await wait_for(woken)
        woken.clear()
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = $1", LISTENER_NAME)
        assert killed == 1
        await cli.request_kick("d1")  # committed while nobody listens
        assert await wait_for(woken, 5.0)  # re-listening wakes the reader to catch up
        assert [c.kind for c in await daemon.changes_since(0)] == ["kick"]


async def test_pruning_keeps_ids_increasing(pg_url: str) -> None:
    async with KeyStore.open(pg_url) as ks:
        for device in ("a", "b", "c"):
            await ks.request_kick(device)
        first = (await ks.changes_since(0))[0].id
        later = datetime.now(UTC) + timedelta(minutes=1)
        assert await ks.prune_changes(later, up_to=first + 1, batch=10) == 2
        assert [c.subject for c in await ks.changes_since(0)] == ["c"]
        await ks.request_kick("d")
        assert (await ks.changes_since(first + 2))[0].id == first + 3


async def test_a_long_migration_step_is_not_cut_by_the_statement_timeout(
    postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A step that rewrites a million rows takes longer than statement_timeout."""
    name = "fresh_slow_step"
    postgres.admin(f"CREATE DATABASE {name}")
    try:
        slow = [*migrations.MIGRATIONS, ["SELECT pg_sleep(0.6)"]]
        monkeypatch.setattr(migrations, "MIGRATIONS", slow)
        monkeypatch.setattr(migrations, "SCHEMA_VERSION", len(slow))
        async with KeyStore.open(postgres.url(name), statement_timeout=0.2) as ks:
            await ks.add_device("d1")
        conn = await asyncpg.connect(postgres.url(name))
        try:
            assert await conn.fetchval("SELECT version FROM keybroker_schema") == len(slow)
        finally:
            await conn.close()
    finally:
        postgres.drop_database(name)
