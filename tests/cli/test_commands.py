"""The `keybroker` CLI end to end on each backend (a real SQLite file in tmp_path, a real
PostgreSQL database): click's CliRunner, and one run of the real console entry point in a
subprocess."""

from __future__ import annotations

import itertools
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import broker.cli.common
import keystore.credentials
from broker.cli import main
from tests.support.cli_helpers import Invoke, cli_on, fails, no_keys_stored, ok
from tests.support.dbdump import dump_text


@pytest.fixture
def db(cli_db: str) -> str:
    return cli_db


@pytest.fixture
def cli(db: str, monkeypatch: pytest.MonkeyPatch) -> Invoke:
    monkeypatch.delenv("KEYBROKER_DB", raising=False)
    return cli_on(db)


def as_json(result: Result) -> Any:
    return json.loads(ok(result).stdout)


def db_bytes(db: str) -> bytes:
    return dump_text(db)


@pytest.fixture
def fleet(cli: Invoke) -> None:
    ok(cli("devices", "add", "gw-1", "--name", "Gateway", "--tag", "site=lyon", "--tag", "role=gw"))
    ok(cli("devices", "add", "s-1", "--tag", "site=lyon"))
    ok(cli("devices", "add", "s-2", "--tag", "site=paris"))


def create(cli: Invoke, *args: str) -> dict[str, Any]:
    doc: dict[str, Any] = as_json(cli("keys", "create", "--json", *args))
    return doc


# --- general ------------------------------------------------------------------------


def test_version(cli: Invoke) -> None:
    assert "keybroker" in ok(cli("--version")).output


def test_db_parent_is_created_and_env_var_is_honoured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "nested" / "dir" / "env.db"
    monkeypatch.setenv("KEYBROKER_DB", str(target))
    ok(CliRunner().invoke(main, ["devices", "add", "d1"]))
    assert target.exists()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_subprocess_console_entry_point(db: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KEYBROKER_DB"}
    cmd = [sys.executable, "-m", "broker.cli", "--db", str(db)]
    run = subprocess.run(  # noqa: S603 - our own interpreter and arguments
        [*cmd, "keys", "create", "--json", "--name", "sub"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    doc = json.loads(run.stdout)
    assert doc["name"] == "sub" and len(doc["secret"]) >= 43
    bad = subprocess.run(  # noqa: S603 - our own interpreter and arguments
        [*cmd, "keys", "show", "0000000000"], capture_output=True, text=True, env=env, timeout=60
    )
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr
    assert bad.stderr.startswith("Error: ") and len(bad.stderr.strip().splitlines()) == 1


# --- devices ------------------------------------------------------------------------


def test_devices_lifecycle(cli: Invoke, fleet: None) -> None:
    fails(cli("devices", "add", "gw-1"), "gw-1")
    listing = ok(cli("devices", "list")).output
    assert "gw-1" in listing and "Gateway" in listing and "site=paris" in listing
    docs = as_json(cli("devices", "list", "--json"))
    assert [d["deviceId"] for d in docs] == ["gw-1", "s-1", "s-2"]

    doc = as_json(cli("devices", "tag", "s-1", "line=a", "line=b", "--json"))
    assert {(t["key"], t["value"]) for t in doc["tags"]} == {
        ("site", "lyon"),
        ("line", "a"),
        ("line", "b"),
    }
    doc = as_json(cli("devices", "untag", "s-1", "line", "--json"))
    assert doc["tags"] == [{"key": "site", "value": "lyon"}]
    doc = as_json(cli("devices", "untag", "gw-1", "role=gw", "--json"))
    assert doc["tags"] == [{"key": "site", "value": "lyon"}]
    shown = ok(cli("devices", "show", "gw-1")).output
    assert "Gateway" in shown and "site=lyon" in shown

    ok(cli("devices", "remove", "s-2", "--yes"))
    fails(cli("devices", "show", "s-2"), "s-2")
    fails(cli("devices", "remove", "nope", "--yes"), "nope")


def test_devices_remove_needs_confirmation(cli: Invoke, fleet: None) -> None:
    fails(cli("devices", "remove", "s-1"), "--yes")
    ok(cli("devices", "show", "s-1"))


def test_device_key_is_scoped_to_that_device(cli: Invoke, fleet: None) -> None:
    doc = as_json(cli("devices", "key", "s-1", "--name", "k-s1", "--json"))
    assert doc["deviceIds"] == ["s-1"] and doc["deviceTags"] == [] and not doc["allDevices"]
    assert doc["filterType"] == "none" and doc["secret"]
    fails(cli("devices", "key", "ghost"), "ghost")


# --- keys create / secrets ----------------------------------------------------------


def test_create_with_every_option(cli: Invoke, fleet: None) -> None:
    doc = create(
        cli,
        "--name",
        "fleet",
        "--description",
        "Lyon fleet",
        "--device",
        "s-2",
        "--tag",
        "site=lyon",
        "--allow-ip",
        "10.0.0.0/8",
        "--allow-ip",
        "2001:db8::1",
        "--topics",
        "only",
        "--pub",
        "plant/+/telemetry",
        "--sub",
        "plant/#",
        "--expires",
        "2031-05-01T12:00:00+02:00",
    )
    assert len(doc["key"]) >= 32 and len(doc["secret"]) >= 43
    assert doc["name"] == "fleet" and doc["description"] == "Lyon fleet"
    assert doc["status"] == "active"
    assert doc["deviceIds"] == ["s-2"]
    assert doc["deviceTags"] == [{"key": "site", "value": "lyon"}]
    assert doc["addressFilterType"] == "whitelist"
    assert set(doc["addresses"]) == {"10.0.0.0/8", "2001:db8::1/128"}
    assert doc["filterType"] == "whitelist"
    assert doc["pubTopics"] == ["plant/+/telemetry"] and doc["subTopics"] == ["plant/#"]
    assert doc["expirationDate"] == "2031-05-01T10:00:00.000Z"

    deny = create(cli, "--deny-ip", "192.0.2.0/24", "--pub", "x/y")
    assert deny["addressFilterType"] == "blacklist" and deny["filterType"] == "whitelist"
    plain = create(cli, "--expires", "2031-01-02")
    assert plain["allDevices"] and plain["filterType"] == "none"
    assert plain["addressFilterType"] == "all"
    assert plain["expirationDate"] == "2031-01-02T00:00:00.000Z"  # a date, naive = UTC


def test_expired_expiry_is_accepted_with_a_warning(cli: Invoke) -> None:
    result = ok(cli("keys", "create", "--json", "--expires", "2001-01-01T00:00"))
    assert "warning" in result.stderr and "expired" in result.stderr
    key = json.loads(result.stdout)["key"]
    assert "expired" in ok(cli("keys", "show", key)).output
    assert "warning" not in ok(cli("keys", "update", key, "--expires", "2999-01-01")).stderr


def test_secret_is_shown_once_and_stored_nowhere(cli: Invoke, db: str, fleet: None) -> None:
    text = ok(cli("keys", "create", "--name", "once", "--device", "s-1")).output
    secret = text.split("secret:")[1].split()[0]
    key = text.split("key:")[1].split()[0]
    assert "shown only this once" in text and "cannot be recovered" in text
    for args in (
        ("keys", "list"),
        ("keys", "list", "--full"),
        ("keys", "list", "--json"),
        ("keys", "show", key),
        ("keys", "show", key, "--json"),
        ("keys", "update", key, "--description", "x"),
        ("keys", "deactivate", key),
    ):
        out = ok(cli(*args)).output
        assert secret not in out
    assert key in ok(cli("keys", "list", "--full")).output
    assert secret.encode() not in db_bytes(db)
    assert key.encode() in db_bytes(db)  # the check above looks at the right files


def test_list_table_shows_short_keys_unless_full(cli: Invoke, db: str, fleet: None) -> None:
    key = create(cli, "--name", "tbl", "--tag", "site=lyon", "--deny-ip", "10.0.0.1")["key"]
    table = ok(cli("keys", "list")).output
    assert table.splitlines()[0] == f"keystore: {db}"
    header = table.splitlines()[1]
    for column in ("KEY", "NAME", "STATUS", "DEVICES", "TOPICS", "IP", "EXPIRES", "LAST USED"):
        assert column in header
    assert key[:8] in table and key not in table
    assert "site=lyon" in table and "except" in table and "never" in table
    assert key in ok(cli("keys", "list", "--full")).output
    shown = ok(cli("keys", "show", key[:8])).output
    assert "key:" in shown and key in shown and "10.0.0.1" in shown


def test_output_file_is_private_and_never_overwritten(
    cli: Invoke, tmp_path: Path, fleet: None
) -> None:
    out = tmp_path / "k.json"
    result = ok(cli("keys", "create", "--name", "filed", "--output", str(out)))
    saved = json.loads(out.read_text())
    assert set(saved) == {"key", "secret"}
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert saved["secret"] not in result.output and saved["key"] in result.output

    before = out.read_text()
    fails(cli("keys", "create", "--name", "again", "--output", str(out)), str(out))
    assert out.read_text() == before
    assert [k["name"] for k in as_json(cli("keys", "list", "--json"))] == ["filed"]

    doc = as_json(cli("keys", "create", "--json", "--output", str(tmp_path / "j.json")))
    assert "secret" not in doc
    assert json.loads((tmp_path / "j.json").read_text())["key"] == doc["key"]


def test_output_file_is_removed_when_creation_fails(cli: Invoke, tmp_path: Path) -> None:
    out = tmp_path / "k.json"
    fails(cli("keys", "create", "--allow-ip", "10.0.0.0/33", "--output", str(out)), "10.0.0.0/33")
    assert not out.exists()


# --- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("keys", "create", "--allow-ip", "10.0.0.0/33"), "10.0.0.0/33"),
        (("keys", "create", "--deny-ip", "not-an-ip"), "not-an-ip"),
        (("keys", "create", "--pub", "a/#/b"), "a/#/b"),
        (("keys", "create", "--sub", "losant/x/state"), "losant/x/state"),
        (("keys", "create", "--pub", "$SYS/x"), "$SYS/x"),
        (("keys", "create", "--tag", "no-equals"), "no-equals"),
        (("keys", "create", "--device", "ghost"), "ghost"),
        (("keys", "create", "--expires", "next tuesday"), "next tuesday"),
        (("keys", "create", "--topics", "all", "--pub", "a/b"), "a/b"),
        (("keys", "create", "--allow-ip", "10.0.0.1", "--deny-ip", "10.0.0.2"), "--deny-ip"),
        (("keys", "list", "--query", "{not json"), "{not json"),
        (("keys", "list", "--query", '{"colour": "red"}'), "colour"),
        (("keys", "list", "--query", '{"name": {"$near": 1}}'), "$near"),
        (("keys", "show", "0123456789abcdef"), "0123456789abcdef"),
        (("devices", "add", "bad/id"), "bad/id"),
        (("devices", "add", "d", "--tag", "=v"), "=v"),
        (("devices", "tag", "ghost", "a=b"), "ghost"),
    ],
)
def test_bad_input_is_one_clear_line(
    cli: Invoke, db: str, args: tuple[str, ...], needle: str
) -> None:
    ok(cli("devices", "add", "present"))  # a keystore to look into
    fails(cli(*args), needle)
    assert no_keys_stored(cli, db)


def test_unreadable_config_is_a_clean_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KEYBROKER_DB", raising=False)
    monkeypatch.setenv("KEYBROKER_CONFIG", str(tmp_path / "missing.toml"))
    fails(CliRunner().invoke(main, ["keys", "list"]), "missing.toml")


# --- update -------------------------------------------------------------------------


def test_update_each_field(cli: Invoke, fleet: None) -> None:
    key = create(cli, "--name", "upd", "--device", "s-1")["key"]
    prefix = key[:8]

    def update(*args: str) -> dict[str, Any]:
        doc: dict[str, Any] = as_json(cli("keys", "update", prefix, "--json", *args))
        return doc

    assert update("--name", "renamed")["name"] == "renamed"
    assert update("--description", "desc")["description"] == "desc"
    doc = update("--allow-ip", "10.1.0.0/16")
    assert (doc["addressFilterType"], doc["addresses"]) == ("whitelist", ["10.1.0.0/16"])
    doc = update("--deny-ip", "10.2.0.0/16")
    assert (doc["addressFilterType"], doc["addresses"]) == ("blacklist", ["10.2.0.0/16"])
    doc = update("--any-ip")
    assert (doc["addressFilterType"], doc["addresses"]) == ("all", [])
    doc = update("--topics", "except", "--pub", "a/#", "--sub", "b/+")
    assert (doc["filterType"], doc["pubTopics"], doc["subTopics"]) == (
        "blacklist",
        ["a/#"],
        ["b/+"],
    )
    doc = update("--sub", "c/d")
    assert (doc["filterType"], doc["pubTopics"], doc["subTopics"]) == (
        "blacklist",
        ["a/#"],
        ["c/d"],
    )
    doc = update("--topics", "all")
    assert (doc["filterType"], doc["pubTopics"], doc["subTopics"]) == ("all", [], [])
    assert (
        update("--expires", "2032-02-03T04:05:06Z")["expirationDate"] == "2032-02-03T04:05:06.000Z"
    )
    assert update("--no-expiry")["expirationDate"] is None
    doc = update("--name", "", "--description", "")
    assert doc["name"] is None and doc["description"] is None
    assert doc["deviceIds"] == ["s-1"]

    fails(cli("keys", "update", prefix, "--allow-ip", "300.1.1.1"), "300.1.1.1")
    fails(cli("keys", "update", prefix, "--expires", "2030-13-01"), "2030-13-01")
    fails(cli("keys", "update", prefix, "--expires", "2030-01-01", "--no-expiry"), "--no-expiry")
    assert cli("keys", "update", prefix).exit_code != 0  # nothing to update


def test_update_refuses_device_restriction_changes(cli: Invoke, fleet: None) -> None:
    key = create(cli, "--device", "s-1")["key"]
    fails(cli("keys", "update", key, "--device", "s-2"), "cannot be changed")
    fails(cli("keys", "update", key, "--tag", "site=lyon"), "cannot be changed")
    assert as_json(cli("keys", "show", key, "--json"))["deviceIds"] == ["s-1"]


def test_name_is_unique(cli: Invoke) -> None:
    create(cli, "--name", "dup")
    fails(cli("keys", "create", "--name", "dup"), "dup")


# --- status, delete, prefixes -------------------------------------------------------


def test_activate_deactivate_delete_by_prefix(cli: Invoke) -> None:
    a, b = create(cli, "--name", "a")["key"], create(cli, "--name", "b")["key"]
    assert a[:8] in ok(cli("keys", "deactivate", a[:8], b[:8])).output
    assert {k["status"] for k in as_json(cli("keys", "list", "--json"))} == {"inactive"}
    ok(cli("keys", "activate", a[:8]))
    assert as_json(cli("keys", "show", a, "--json"))["status"] == "active"
    assert as_json(cli("keys", "show", b, "--json"))["status"] == "inactive"
    inactive = as_json(cli("keys", "list", "--json", "--query", '{"status": "inactive"}'))
    assert [k["key"] for k in inactive] == [b]

    fails(cli("keys", "show", a[:7]), a[:7])  # too short a prefix
    ok(cli("keys", "delete", a[:8], "--yes"))
    fails(cli("keys", "show", a[:8]), a[:8])
    assert [k["key"] for k in as_json(cli("keys", "list", "--json"))] == [b]


def test_ambiguous_prefix_is_refused(cli: Invoke, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = itertools.count()
    monkeypatch.setattr(keystore.credentials, "new_key", lambda: f"abcdef01{next(counter):024x}")
    create(cli, "--name", "x")
    create(cli, "--name", "y")
    fails(cli("keys", "delete", "abcdef01", "--yes"), "abcdef01")
    fails(cli("keys", "deactivate", "abcdef01"), "abcdef01")
    assert len(as_json(cli("keys", "list", "--json"))) == 2


def test_every_key_command_takes_a_key_name_or_id(cli: Invoke) -> None:
    gateway = create(cli, "--name", "lyon-gw", "--allow-ip", "10.0.0.0/8")
    create(cli, "--name", "all-topics", "--topics", "all")
    assert ok(cli("keys", "update", "lyon-gw", "--any-ip", "--json")).stdout
    assert as_json(cli("keys", "show", "lyon-gw", "--json"))["addressFilterType"] == "all"
    assert "inactive" in ok(cli("keys", "deactivate", "all-topics")).output
    assert as_json(cli("keys", "show", "all-topics", "--json"))["status"] == "inactive"
    ok(cli("keys", "activate", "all-topics"))
    assert as_json(cli("keys", "show", gateway["id"], "--json"))["key"] == gateway["key"]
    ok(cli("keys", "delete", "lyon-gw", "--yes"))
    fails(cli("keys", "show", "lyon-gw"), "'lyon-gw'")
    assert [k["name"] for k in as_json(cli("keys", "list", "--json"))] == ["all-topics"]


def test_an_ambiguous_key_name_lists_the_candidates(cli: Invoke,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    counter = itertools.count()
    monkeypatch.setattr(keystore.credentials, "new_key", lambda: f"cafebabe{next(counter):024x}")
    by_prefix = create(cli)["key"]
    by_name = create(cli, "--name", "cafebabe")["key"]
    line = fails(cli("keys", "deactivate", "cafebabe"), "ambiguous", by_prefix,
                 f"{by_name} (cafebabe)")
    assert "'cafebabe'" in line
    assert {k["status"] for k in as_json(cli("keys", "list", "--json"))} == {"active"}


def test_delete_confirmation(cli: Invoke, monkeypatch: pytest.MonkeyPatch) -> None:
    key = create(cli, "--name", "keep")["key"]
    fails(cli("keys", "delete", key), "--yes")  # stdin is not a terminal
    monkeypatch.setattr(broker.cli.common, "stdin_is_interactive", lambda: True)
    assert cli("keys", "delete", key, input="n\n").exit_code != 0
    assert cli("keys", "delete", key, input="").exit_code != 0
    ok(cli("keys", "show", key))
    result = ok(cli("keys", "delete", key, input="y\n"))
    assert "keep" in result.output and key[:8] in result.output
    assert as_json(cli("keys", "list", "--json")) == []


# --- query --------------------------------------------------------------------------


def test_list_query_operators(cli: Invoke, fleet: None) -> None:
    create(cli, "--name", "gw-a", "--device", "gw-1")
    create(cli, "--name", "gw-b", "--tag", "site=lyon", "--topics", "all")
    create(cli, "--name", "ops", "--deny-ip", "10.0.0.0/8")
    ok(
        cli(
            "keys",
            "deactivate",
            as_json(cli("keys", "list", "--json", "--query", '{"name": "ops"}'))[0]["key"],
        )
    )

    def names(query: dict[str, Any]) -> list[str]:
        docs = as_json(cli("keys", "list", "--json", "--query", json.dumps(query)))
        return sorted(d["name"] for d in docs)

    assert names({"name": {"$like": "gw-*"}}) == ["gw-a", "gw-b"]
    assert names({"name": {"$startsWith": "gw"}, "filterType": "all"}) == ["gw-b"]
    assert names({"status": {"$ne": "active"}}) == ["ops"]
    assert names({"name": {"$in": ["ops", "gw-a"]}}) == ["gw-a", "ops"]
    assert names({"$or": [{"deviceIds": "gw-1"}, {"addressFilterType": "blacklist"}]}) == [
        "gw-a",
        "ops",
    ]
    assert names({"$nor": [{"name": "ops"}]}) == ["gw-a", "gw-b"]
    assert "gw-b" in ok(cli("keys", "list", "--query", '{"name": "gw-b"}')).output
