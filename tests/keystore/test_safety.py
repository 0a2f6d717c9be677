"""Keystore safety: CLI processes writing while the
daemon serves, restart on the same file, SIGKILL during a bulk seed, and `keybroker backup`
(online copy, mode 0600, no secrets in it, never overwrites) plus the documented restore."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from keystore import KeyStore
from keystore.errors import KeybrokerError
from keystore.seed import BATCH as SEED_BATCH  # one transaction per batch
from keystore.sqlite.backup import backup
from keystore.sqlite.migrations import SCHEMA_VERSION
from tests.support.harness import Client, RunningBroker, StartDaemon, broker_settings

REPO = Path(__file__).resolve().parents[2]
ACCEPTED, BAD_CREDENTIALS, NOT_AUTHORIZED = 0, 4, 5


def cli(db: Path, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """The real `keybroker` CLI in its own process, as an operator runs it next to the daemon."""
    env = {**os.environ, "KEYBROKER_DB": str(db)}
    return subprocess.run(  # noqa: S603 - our own interpreter and module, fixed argv
        [sys.executable, "-m", "broker.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def daemon(daemon_with: StartDaemon) -> RunningBroker:
    """A real daemon on 127.0.0.1 port 0 over tmp_path/keybroker.db."""
    return daemon_with()


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    return result


def connect(daemon: RunningBroker, client_id: str, key: str, secret: str) -> int:
    with Client(daemon.port(), client_id, key, secret) as client:
        return client.connect()


@contextlib.contextmanager
def sqlite(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def scalar(conn: sqlite3.Connection, sql: str) -> Any:
    return conn.execute(sql).fetchone()[0]


@contextlib.contextmanager
def running(fn: Callable[[threading.Event], None]) -> Iterator[None]:
    """Run ``fn(stop)`` in a thread for the duration of the block; re-raise its failure."""
    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(fn, stop)
        try:
            yield
        finally:
            stop.set()
            future.result(timeout=20)


def keep_connecting(
    daemon: RunningBroker, client_id: str, key: str, secret: str, codes: list[int]
) -> Callable[[threading.Event], None]:
    """Paho clients connecting one after another: the daemon authenticates and writes
    connection status / last-used the whole time."""

    def loop(stop: threading.Event) -> None:
        while not stop.is_set():
            codes.append(connect(daemon, client_id, key, secret))

    return loop


# --- 2. CLI processes writing while the daemon serves --------------------------------------


def test_concurrent_cli_writers_next_to_a_serving_daemon_never_hit_a_locked_database(
    daemon: RunningBroker,
) -> None:
    db = daemon.settings.db_path
    for worker in range(3):
        daemon.ks("add_device", f"dev-{worker}")
    daemon.ks("add_device", "probe")
    probe, probe_secret = daemon.ks("create_key", device_ids=["probe"])

    def create_keys(worker: int) -> list[subprocess.CompletedProcess[str]]:
        return [
            cli(
                db,
                "keys",
                "create",
                "--json",
                "--device",
                f"dev-{worker}",
                "--name",
                f"w{worker}-{i}",
            )
            for i in range(20)
        ]

    codes: list[int] = []
    with running(keep_connecting(daemon, "probe", probe.key, probe_secret, codes)):
        with ThreadPoolExecutor(3) as pool:
            per_worker = list(pool.map(create_keys, range(3)))

    for results in per_worker:
        for result in results:
            assert "locked" not in result.stderr
            ok(result)
    assert codes and set(codes) == {ACCEPTED}
    assert daemon.ks("count_keys") == 1 + 3 * 20
    for worker, results in enumerate(per_worker):
        for result in results:
            doc = json.loads(result.stdout)
            assert connect(daemon, f"dev-{worker}", doc["key"], doc["secret"]) == ACCEPTED


# --- 3. restart on the same file ---------------------------------------------------------------


def test_restart_on_the_same_file_keeps_devices_keys_and_statuses(tmp_path: Path) -> None:
    settings = broker_settings(tmp_path)
    first = RunningBroker(settings).start()
    try:
        first.ks("add_device", "dev-a", name="Gateway", tags=[("site", "north")])
        first.ks("add_device", "dev-b", tags=[("site", "south")])
        north, north_secret = first.ks("create_key", name="north", device_tags=[("site", "north")])
        off, off_secret = first.ks("create_key", name="off")
        first.ks("set_status", [off.key], "inactive")
        by_cli = json.loads(
            ok(cli(settings.db_path, "keys", "create", "--json", "--device", "dev-b")).stdout
        )
        assert connect(first, "dev-a", north.key, north_secret) == ACCEPTED
        devices_before = first.ks("list_devices")
    finally:
        first.stop()

    second = RunningBroker(settings).start()
    try:
        devices_after = second.ks("list_devices")
        assert [(d.id, d.name, d.tags) for d in devices_after] == [
            (d.id, d.name, d.tags) for d in devices_before
        ]
        assert not any(d.connected for d in devices_after)
        assert devices_after[0].last_seen is not None  # dev-a's session was recorded
        keys_after = {k.name or k.key: k for k in second.ks("list_keys")}
        assert set(keys_after) == {"north", "off", by_cli["key"]}
        assert keys_after["north"].device_tags == (("site", "north"),)
        assert keys_after["north"].last_used is not None
        assert keys_after["off"].status.value == "inactive"
        assert keys_after[by_cli["key"]].device_ids == ("dev-b",)
        assert connect(second, "dev-a", north.key, north_secret) == ACCEPTED
        assert connect(second, "dev-b", by_cli["key"], by_cli["secret"]) == ACCEPTED
        assert connect(second, "dev-a", off.key, off_secret) == NOT_AUTHORIZED
    finally:
        second.stop()


# --- 4. SIGKILL during a bulk seed ---------------------------------------------------------

SEED_SIZE = 20_000


def write_seed(path: Path) -> None:
    devices = [{"id": f"d{i}", "tags": {"rack": f"r{i % 50}"}} for i in range(SEED_SIZE)]
    keys = [
        {"name": f"k{i}", "devices": [f"d{i}"], "tags": {"rack": f"r{i % 50}"}}
        for i in range(SEED_SIZE)
    ]
    path.write_text(json.dumps({"devices": devices, "keys": keys}))


def seed_until(db: Path, seed_file: Path, progress_line: str) -> int:
    """Run `keybroker seed` and SIGKILL it as soon as it reports ``progress_line`` (a
    committed batch); the next batch's transaction is then usually half written."""
    env = {**os.environ, "KEYBROKER_DB": str(db)}
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module, fixed argv
        [sys.executable, "-m", "broker.cli", "seed", str(seed_file)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    timer = threading.Timer(20, proc.kill)  # bound the test even if the line never comes
    timer.start()
    try:
        for line in proc.stderr:
            if line.strip() == progress_line:
                proc.send_signal(signal.SIGKILL)
                break
        proc.stderr.read()
        return proc.wait(timeout=20)
    finally:
        timer.cancel()
        proc.stderr.close()


@pytest.mark.parametrize(
    "kill_after",
    [f"{SEED_BATCH}/{2 * SEED_SIZE}", f"{SEED_SIZE + SEED_BATCH}/{2 * SEED_SIZE}"],
    ids=["during-devices", "during-keys"],
)
def test_sigkill_during_bulk_seed_leaves_whole_batches_and_the_rerun_completes(
    tmp_path: Path, kill_after: str
) -> None:
    db, seed_file = tmp_path / "keys.db", tmp_path / "seed.json"
    write_seed(seed_file)

    assert seed_until(db, seed_file, kill_after) == -signal.SIGKILL
    assert Path(f"{db}-wal").stat().st_size > 0  # died with a WAL to recover, no clean close

    with sqlite(db) as conn:
        assert scalar(conn, "PRAGMA integrity_check") == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        devices = scalar(conn, "SELECT count(*) FROM devices")
        keys = scalar(conn, "SELECT count(*) FROM access_keys")
        assert devices + keys < 2 * SEED_SIZE, "the seed finished before it was killed"
        # Every committed batch is whole, and batches commit in file order.
        assert devices % SEED_BATCH == 0 and devices >= SEED_BATCH
        assert scalar(conn, "SELECT count(*) FROM device_tags") == devices
        assert keys % SEED_BATCH == 0
        assert keys == 0 or devices == SEED_SIZE
        names = {r[0] for r in conn.execute("SELECT name FROM access_keys")}
        assert names == {f"k{i}" for i in range(keys)}
        # No key without its restriction rows.
        assert scalar(conn, "SELECT count(*) FROM key_devices") == keys
        assert scalar(conn, "SELECT count(*) FROM key_tags") == keys
        assert (
            scalar(
                conn,
                "SELECT count(*) FROM access_keys k WHERE NOT EXISTS "
                "(SELECT 1 FROM key_devices d WHERE d.key = k.key)",
            )
            == 0
        )

    rerun = ok(cli(db, "seed", str(seed_file), "--output", str(tmp_path / "secrets.jsonl")))
    assert f"devices: {SEED_SIZE}, of which created or changed: {SEED_SIZE - devices}" in (
        rerun.stderr
    )
    assert f"keys created: {SEED_SIZE - keys}" in rerun.stderr
    with sqlite(db) as conn:
        assert scalar(conn, "PRAGMA integrity_check") == "ok"
        assert scalar(conn, "SELECT count(*) FROM devices") == SEED_SIZE
        assert scalar(conn, "SELECT count(DISTINCT name) FROM access_keys") == SEED_SIZE
        assert scalar(conn, "SELECT count(*) FROM access_keys") == SEED_SIZE
        assert scalar(conn, "SELECT count(*) FROM key_devices") == SEED_SIZE

    again = ok(cli(db, "seed", str(seed_file), "--output", str(tmp_path / "none.jsonl")))
    assert "of which created or changed: 0" in again.stderr
    assert "keys created: 0" in again.stderr


# --- 5. backup --------------------------------------------------------------------------


def test_backup_while_the_daemon_serves_and_writes_is_a_consistent_private_secret_free_copy(
    daemon: RunningBroker, tmp_path: Path
) -> None:
    db = daemon.settings.db_path
    daemon.ks("add_device", "dev-0")
    first, first_secret = daemon.ks("create_key", device_ids=["dev-0"])
    secrets = [first_secret]
    key_ids = [first.key]

    def write(stop: threading.Event) -> None:
        # Device then its key, two transactions: any consistent snapshot that holds the
        # key also holds the device.
        n = 1
        while not stop.is_set():
            daemon.ks("add_device", f"dev-{n}", tags=[("n", str(n))])
            key, secret = daemon.ks("create_key", device_ids=[f"dev-{n}"])
            secrets.append(secret)
            key_ids.append(key.key)
            n += 1

    dest = tmp_path / "backups" / "kb.bak"
    dest.parent.mkdir()
    codes: list[int] = []
    with running(write), running(keep_connecting(daemon, "dev-0", first.key, first_secret, codes)):
        while len(secrets) < 20:
            threading.Event().wait(0.01)
        result = ok(cli(db, "backup", str(dest), "--json"))
    report = json.loads(result.stdout)
    assert set(codes) == {ACCEPTED}

    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert sorted(p.name for p in dest.parent.iterdir()) == ["kb.bak"]  # no -wal/-shm
    raw = dest.read_bytes()
    assert first.key.encode() in raw  # stored strings are findable in the raw bytes...
    for secret in secrets:
        assert secret.encode() not in raw  # ...and no secret is stored at all

    with sqlite(dest) as conn:
        assert scalar(conn, "PRAGMA integrity_check") == "ok"
        assert scalar(conn, "PRAGMA user_version") == SCHEMA_VERSION
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert scalar(conn, "SELECT count(*) FROM devices") == report["devices"]
        assert scalar(conn, "SELECT count(*) FROM access_keys") == report["keys"]
        assert (
            scalar(
                conn,
                "SELECT count(*) FROM key_devices kd WHERE NOT EXISTS "
                "(SELECT 1 FROM devices d WHERE d.id = kd.device_id)",
            )
            == 0
        )
    assert 20 <= report["keys"] <= len(secrets)
    assert report["devices"] in (report["keys"], report["keys"] + 1)
    assert report["schema_version"] == SCHEMA_VERSION

    async def check_backup() -> None:
        async with KeyStore.open(dest) as ks:
            assert await ks.count_devices() == report["devices"]
            assert await ks.count_keys() == report["keys"]
            assert (await ks.connect_lookup(first.key, first_secret, "x")).key is not None

    asyncio.run(check_backup())

    # Once writes stop, a backup has exactly the live counts.
    quiet = tmp_path / "quiet.bak"
    line = ok(cli(db, "backup", str(quiet))).stdout.strip()
    devices, keys = daemon.ks("count_devices"), daemon.ks("count_keys")
    assert f": {devices} devices, {keys} keys " in line
    assert keys == len(secrets)


def test_backup_refuses_an_existing_file_and_leaves_it_alone(
    daemon: RunningBroker, tmp_path: Path
) -> None:
    daemon.ks("add_device", "dev-a")
    dest = tmp_path / "exists.bak"
    dest.write_bytes(b"precious")
    result = cli(daemon.settings.db_path, "backup", str(dest))
    assert result.returncode != 0
    assert result.stderr.strip() == (
        f"Error: backup file {str(dest)!r} already exists; refusing to overwrite it"
    )
    assert dest.read_bytes() == b"precious"


def test_backup_of_a_missing_keystore_fails_without_creating_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.db"
    result = cli(missing, "backup", str(tmp_path / "out.bak"))
    assert result.returncode != 0
    assert "no keystore at" in result.stderr
    assert not missing.exists()
    assert not (tmp_path / "out.bak").exists()


async def test_backup_of_a_file_that_is_not_a_keystore_removes_its_partial_copy(
    tmp_path: Path,
) -> None:
    src, dest = tmp_path / "notes.txt", tmp_path / "out.bak"
    src.write_text("not a database at all, just some text " * 100)
    with pytest.raises(KeybrokerError, match="not a keybroker keystore: not an SQLite database"):
        await backup(src, dest)
    assert not dest.exists()

    empty = tmp_path / "empty.db"
    with sqlite(empty) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(KeybrokerError, match="not a keybroker keystore"):
        await backup(empty, dest)
    assert not dest.exists()


def test_documented_restore_brings_back_the_backed_up_keystore(tmp_path: Path) -> None:
    """README "Backup and restore": stop, copy the backup over the database, remove the
    stale -wal/-shm, start."""
    settings = broker_settings(tmp_path)
    db = settings.db_path
    daemon = RunningBroker(settings).start()
    try:
        daemon.ks("add_device", "dev-a")
        kept, kept_secret = daemon.ks("create_key", name="kept")
        ok(cli(db, "backup", str(tmp_path / "kb.bak")))
        daemon.ks("delete_keys", [kept.key])
        later, later_secret = daemon.ks("create_key", name="later")
    finally:
        daemon.stop()

    shutil.copyfile(tmp_path / "kb.bak", db)
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)

    restored = RunningBroker(settings).start()
    try:
        assert connect(restored, "dev-a", kept.key, kept_secret) == ACCEPTED
        assert connect(restored, "dev-a", later.key, later_secret) == BAD_CREDENTIALS
    finally:
        restored.stop()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


async def test_a_writer_cancelled_while_its_transaction_begins_leaves_none_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A service stopping cancels its tick mid-write: the BEGIN it was waiting for still
    runs on aiosqlite's thread, and must not leave the next writer inside it."""
    async with KeyStore.open(tmp_path / "k.db") as ks:
        conn = ks.backend.db._conn  # type: ignore[attr-defined]
        real = conn.execute

        async def slow_begin(sql: str, *args: Any) -> Any:
            result = await real(sql, *args)
            if sql.startswith("BEGIN"):  # the BEGIN ran; its caller is still waiting
                await asyncio.sleep(0.2)  # (time under test: the window for the cancel)
            return result

        monkeypatch.setattr(conn, "execute", slow_begin)
        task = asyncio.create_task(ks.add_device("cancelled"))
        await asyncio.sleep(0.1)  # inside that window: cancelled after BEGIN, before its end
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        monkeypatch.setattr(conn, "execute", real)
        await ks.add_device("after")  # raised "within a transaction" before
        assert {d.id for d in await ks.list_devices()} == {"after"}
