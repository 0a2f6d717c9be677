"""The change feed stays bounded: the daemon deletes rows its watcher has applied once they
are older than change_retention, in bounded batches, and live revocation keeps working."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.services.prune import ChangePruner
from keystore import KeyStore
from keystore.rows import to_micros
from tests.support.harness import Client, StartDaemon, broker_settings, revocation_bound, seed
from tests.support.waiting import async_wait_until

DAY = 86_400.0


def add_changes(db: Path, count: int, age: float) -> None:
    """``count`` change rows written ``age`` seconds ago (a long-running deployment's feed)."""
    at = to_micros(datetime.now(UTC) - timedelta(seconds=age))
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.executemany("INSERT INTO changes (kind, subject, at) VALUES ('kick', ?, ?)",
                         ((f"gone-{i}", at) for i in range(count)))


def change_ids(db: Path) -> list[int]:
    with closing(sqlite3.connect(db)) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM changes ORDER BY id")]


async def new_keystore(db: Path) -> None:
    async with KeyStore.open(db) as ks:
        await ks.add_device("dev-a")


async def test_only_applied_rows_older_than_the_window_are_deleted(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    await new_keystore(db)
    add_changes(db, 30, age=2 * DAY)
    async with KeyStore.open(db) as ks:
        for _ in range(3):
            await ks.request_kick("dev-a")  # recent rows, through the real API
        ids = change_ids(db)
        assert len(ids) == 33
        applied = ids[9]  # the watcher has applied the first 10 rows only
        pruner = ChangePruner(ks, retention=DAY, consumed=lambda: applied)
        assert await pruner.prune() == 10
        assert change_ids(db) == ids[10:]

        applied = ids[-1]  # everything applied: the old rows go, the recent ones stay
        assert await pruner.prune() == 20
        assert change_ids(db) == ids[30:]
        assert await pruner.prune() == 0
        assert await ChangePruner(ks, retention=0, consumed=lambda: applied).prune() == 3
        assert change_ids(db) == []
        await ks.request_kick("dev-a")  # ids keep increasing after the table emptied
        assert change_ids(db)[0] > ids[-1]


async def test_a_backlog_is_deleted_in_bounded_batches(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "k.db"
    await new_keystore(db)
    add_changes(db, 5_500, age=2 * DAY)
    async with KeyStore.open(db) as ks:
        batches: list[int] = []
        prune_changes = ks.prune_changes

        async def recording(*args: object, **kwargs: object) -> int:
            deleted = await prune_changes(*args, **kwargs)  # type: ignore[arg-type]
            batches.append(deleted)
            return deleted

        monkeypatch.setattr(ks, "prune_changes", recording)
        pruner = ChangePruner(ks, retention=DAY, consumed=lambda: 10**9, batch=1_000)
        assert await pruner.prune() == 5_500
        assert batches == [1_000] * 5 + [500, 0]  # one transaction each
        assert change_ids(db) == []


async def test_the_pruner_runs_on_its_own_every_interval(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    await new_keystore(db)
    add_changes(db, 100, age=2 * DAY)
    async with KeyStore.open(db) as ks:
        pruner = ChangePruner(ks, retention=DAY, consumed=lambda: 10**9, interval=0.05)
        await pruner.start()
        try:
            await async_wait_until(lambda: change_ids(db) == [], what="the rows pruned")
        finally:
            await pruner.stop()


def test_the_daemon_prunes_100k_changes_and_revocation_still_works(
        tmp_path: Path, daemon_with: StartDaemon) -> None:
    settings = broker_settings(tmp_path)
    seed(settings.db_path, lambda ks: ks.add_device("dev-a"))
    add_changes(settings.db_path, 100_000, age=2 * DAY)
    before = len(change_ids(settings.db_path))
    daemon = daemon_with(settings)
    assert daemon.server.pruner is not None
    assert daemon.server.pruner.retention == timedelta(seconds=settings.change_retention)
    deleted = daemon.call(daemon.server.pruner.prune)
    after = len(change_ids(settings.db_path))
    print(f"changes rows before pruning: {before}, after: {after}")
    assert before == 100_000 and deleted == 100_000 and after == 0

    key, secret = daemon.ks("create_key", device_ids=["dev-a"])
    with Client(daemon.port(), "dev-a", key.key, secret) as client:
        assert client.connect() == 0
        daemon.ks("set_status", [key.key], "inactive")
        assert client.disconnected.wait(revocation_bound(daemon.settings)), \
            "session was not disconnected"
    assert len(change_ids(settings.db_path)) == 1  # the new change, within the window
    assert daemon.call(daemon.server.pruner.prune) == 0


async def test_the_pruner_deletes_expired_device_tokens_in_batches(tmp_path: Path) -> None:
    async with KeyStore.open(tmp_path / "k.db") as ks:
        await ks.add_device("d")
        key, _ = await ks.create_key(device_ids=["d"])
        await ks.add_device("e")
        other, _ = await ks.create_key(device_ids=["e"])
        for _ in range(5):
            await ks.create_device_token(key, "d", 1)
        kept, _ = await ks.create_device_token(other, "e", 3600)
        pruner = ChangePruner(ks, DAY, consumed=lambda: 0, batch=2)
        soon = datetime.now(UTC) + timedelta(seconds=5)
        assert await pruner.prune_device_tokens(soon) == 5
        assert await ks.device_token_lookup(kept, soon) is not None
