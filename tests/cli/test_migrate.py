"""`keybroker migrate --from SQLITE --to postgresql://...` against a real server: the whole
keystore arrives (applications, devices, keys with their hashes, tokens), secrets keep
working, counts are verified, and a non-empty target is refused untouched. And the
backup of a PostgreSQL keystore: pg_dump, as `keybroker backup` says."""

from __future__ import annotations

import asyncio
import json
import shlex
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from keystore import KeyStore
from tests.support.cli_helpers import Invoke, cli_on, fails, ok
from tests.support.postgres import DEBIAN_BINDIR, PostgresServer
from tests.support.services import require_binary

LISTINGS = (
    ("apps", "list", "--json"),
    ("devices", "list", "--json"),
    ("devices", "list", "--json", "--app", "acme"),
    ("keys", "list", "--json"),
    ("keys", "list", "--json", "--app", "acme"),
    ("tokens", "list", "--json"),
)


def listings(cli: Invoke) -> list[Any]:
    return [json.loads(ok(cli(*args)).stdout) for args in LISTINGS]


def make_keystore(cli: Invoke) -> dict[str, str]:
    ok(cli("apps", "create", "acme", "--max-keys", "10"))
    ok(cli("devices", "add", "gw-1", "--name", "Gateway", "--tag", "site=lyon", "--tag", "r=gw"))
    ok(cli("devices", "add", "s-1", "--tag", "site=paris"))
    ok(cli("devices", "add", "a-1", "--app", "acme", "--tag", "site=x"))
    tagged = json.loads(ok(cli("keys", "create", "--json", "--name", "lyon", "--tag",
                               "site=lyon", "--pub", "alerts/#", "--allow-ip",
                               "10.0.0.0/8")).stdout)
    listed = json.loads(ok(cli("keys", "create", "--json", "--device", "s-1",
                               "--expires", "2099-01-01")).stdout)
    acme = json.loads(ok(cli("keys", "create", "--json", "--app", "acme")).stdout)
    ok(cli("keys", "deactivate", listed["key"]))
    token = json.loads(ok(cli("tokens", "create", "--name", "ops", "--json")).stdout)
    return {"key": tagged["key"], "secret": tagged["secret"], "acme": acme["key"],
            "acme_secret": acme["secret"], "token": token["token"]}


async def still_works(url: str, made: dict[str, str]) -> None:
    async with KeyStore.open(url) as ks:
        found = await ks.connect_lookup(made["key"], made["secret"], "gw-1")
        assert found.key is not None and found.device_in_scope and found.scope == {"gw-1"}
        assert (await ks.connect_lookup(made["key"], "wrong", "gw-1")).key is None
        ks.default_app = "acme"
        assert (await ks.connect_lookup(made["acme"], made["acme_secret"], "a-1")).key
        assert await ks.check_token(made["token"], datetime.now(UTC)) is not None
        token, _ = await ks.create_device_token(found.key, "gw-1", 60)
        assert await ks.device_token_lookup(token, datetime.now(UTC)) is not None


def test_migrate_copies_everything_and_secrets_keep_working(tmp_path: Path,
                                                            pg_url: str) -> None:
    source = tmp_path / "old.db"
    sqlite_cli, pg_cli = cli_on(source), cli_on(pg_url)
    made = make_keystore(sqlite_cli)
    before = listings(sqlite_cli)
    result = ok(cli_on(tmp_path / "unused.db")("migrate", "--from", str(source),
                                                "--to", pg_url))
    assert result.stdout.strip() == (
        f"migrated {source} to {pg_url}: 2 applications, 3 devices, 3 keys, 1 API tokens, "
        "0 device tokens (row counts verified)")
    assert listings(pg_cli) == before  # ids, names, tags, restrictions, statuses, dates
    asyncio.run(still_works(pg_url, made))
    assert listings(sqlite_cli) == before  # the source is left as it was


def test_migrate_refuses_a_target_that_is_not_empty(tmp_path: Path, pg_url: str) -> None:
    source = tmp_path / "old.db"
    make_keystore(cli_on(source))
    target = cli_on(pg_url)
    ok(target("devices", "add", "already-here"))
    before = [ok(target(*args)).stdout for args in LISTINGS[:2]]
    line = fails(cli_on(source)("migrate", "--from", str(source), "--to", pg_url),
                 "is not empty", "1 devices")
    assert pg_url in line
    assert [ok(target(*args)).stdout for args in LISTINGS[:2]] == before


def test_migrate_needs_an_existing_source_and_a_postgresql_url(tmp_path: Path,
                                                               pg_url: str) -> None:
    cli = cli_on(tmp_path / "x.db")
    fails(cli("migrate", "--from", str(tmp_path / "missing.db"), "--to", pg_url),
          "no keystore at", "missing.db")
    fails(cli("migrate", "--from", str(tmp_path / "x.db"), "--to", "sqlite:///y.db"),
          "unsupported scheme 'sqlite'")


def test_backup_of_a_postgresql_keystore_is_pg_dump_as_the_error_says(
    tmp_path: Path, pg_url: str, postgres: PostgresServer
) -> None:
    cli = cli_on(pg_url)
    make_keystore(cli)
    before = listings(cli)
    dump = tmp_path / "ks.dump"
    line = fails(cli("backup", str(dump)), "pg_dump --format=custom", pg_url)
    assert not dump.exists()
    # The advice works: dump, restore into a new database, the same keystore comes back.
    pg_dump = require_binary("pg_dump", "the documented PostgreSQL backup", [DEBIAN_BINDIR])
    pg_restore = require_binary("pg_restore", "the documented restore", [DEBIAN_BINDIR])
    command = shlex.split(line.split("with pg_dump: ")[1].split(" (restore")[0])
    subprocess.run([str(pg_dump), *command[1:]], check=True, timeout=60)
    restored = "restored_from_dump"
    postgres.admin(f"CREATE DATABASE {restored}")  # empty, as pg_restore wants it
    try:
        subprocess.run([str(pg_restore), "--dbname", postgres.url(restored), str(dump)],
                       check=True, timeout=60)
        assert listings(cli_on(postgres.url(restored))) == before
    finally:
        postgres.drop_database(restored)
