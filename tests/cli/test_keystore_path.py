"""Which keystore file a command uses: only commands that add something create one, the
others say where they looked; listings and --verbose name the file."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from broker.cli import main
from tests.support.cli_helpers import fails, ok


@pytest.fixture(autouse=True)
def in_empty_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory, no config file, no KEYBROKER_* environment."""
    monkeypatch.delenv("KEYBROKER_CONFIG", raising=False)
    monkeypatch.delenv("KEYBROKER_DB", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize(
    "args",
    [
        ("devices", "list"),
        ("devices", "list", "--json"),
        ("devices", "show", "d1"),
        ("keys", "list"),
        ("keys", "show", "0123456789abcdef"),
        ("backup", "copy.db"),
        ("devices", "kick", "d1"),
        ("keys", "deactivate", "0123456789abcdef"),
    ],
)
def test_commands_that_add_nothing_never_create_a_keystore(
    in_empty_dir: Path, args: tuple[str, ...]
) -> None:
    default = in_empty_dir / "data" / "keybroker.db"
    line = fails(run(*args), f"no keystore at '{default}'", "keybroker devices add")
    assert "create one with" in line
    assert not (in_empty_dir / "data").exists() and not (in_empty_dir / "copy.db").exists()
    elsewhere = in_empty_dir / "typo.db"
    fails(run("--db", str(elsewhere), *args), f"no keystore at '{elsewhere}'")
    assert not elsewhere.exists()


@pytest.mark.parametrize(
    "args",
    [("devices", "add", "d1"), ("keys", "create", "--json"), ("seed", "seed.toml")],
)
def test_commands_that_add_something_create_the_keystore(
    in_empty_dir: Path, args: tuple[str, ...]
) -> None:
    (in_empty_dir / "seed.toml").write_text('[[devices]]\nid = "d1"\n')
    ok(run(*args))
    assert (in_empty_dir / "data" / "keybroker.db").exists()
    assert ok(run("backup", "copy.db")).stdout.startswith("backed up")


def test_listings_name_the_keystore_in_text_mode(in_empty_dir: Path) -> None:
    db = in_empty_dir / "data" / "keybroker.db"
    ok(run("devices", "add", "d1"))
    devices = ok(run("devices", "list")).stdout.splitlines()
    assert devices[0] == f"keystore: {db}" and devices[1].startswith("ID")
    assert ok(run("keys", "list")).stdout.splitlines() == [f"keystore: {db}", "no keys"]
    assert json.loads(ok(run("devices", "list", "--json")).stdout)[0]["deviceId"] == "d1"


def test_verbose_names_the_keystore_on_stderr(in_empty_dir: Path) -> None:
    db = in_empty_dir / "data" / "keybroker.db"
    result = ok(run("-v", "devices", "add", "d1", "--json"))
    assert result.stderr.splitlines() == [f"keystore: {db}"]
    assert json.loads(result.stdout)["deviceId"] == "d1"  # stdout stays clean JSON
    assert f"keystore: {db}" in ok(run("--verbose", "devices", "show", "d1")).stderr
    assert "keystore:" not in ok(run("devices", "show", "d1")).stderr


def test_secret_sent_to_a_file_is_not_said_to_be_shown(in_empty_dir: Path) -> None:
    ok(run("devices", "add", "d1"))
    for args in (("keys", "create"), ("devices", "key", "d1")):
        out = in_empty_dir / f"{args[0]}.json"
        text = ok(run(*args, "--output", str(out))).stdout
        secret = json.loads(out.read_text())["secret"]
        assert secret not in text
        assert f"written to {out} (mode 0600), not shown" in text
        assert "shown only this once" not in text and "only copy" in text


READ_ONLY = [("devices", "list"), ("keys", "list", "--json"), ("apps", "list"),
             ("tokens", "list"), ("backup", "copy.db")]


def another_programs_database(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.execute("INSERT INTO notes VALUES ('keep me')")
        conn.commit()


@pytest.mark.parametrize("args", [*READ_ONLY, ("devices", "add", "d1"), ("keys", "create")])
def test_a_file_that_is_not_a_keystore_is_named_and_left_unchanged(
    in_empty_dir: Path, args: tuple[str, ...]
) -> None:
    """A mistyped --db: one line naming the file and why, and the file keeps its bytes
    and its mode (a command never tightens, migrates or extends someone else's file)."""
    notes = in_empty_dir / "notes.txt"
    notes.write_text("shopping: milk, eggs\n")
    other = in_empty_dir / "other.sqlite"
    another_programs_database(other)
    for path, why in ((notes, "not an SQLite database"),
                      (other, "an SQLite database with other tables (notes)")):
        path.chmod(0o644)
        before = path.read_bytes()
        fails(run("--db", str(path), *args), f"'{path}' is not a keybroker keystore: {why}")
        assert path.read_bytes() == before
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        assert not Path(f"{path}-wal").exists() and not Path(f"{path}-shm").exists()
    assert not (in_empty_dir / "copy.db").exists()


@pytest.mark.parametrize("args", READ_ONLY)
def test_an_empty_file_is_no_keystore_to_a_command_that_adds_nothing(
    in_empty_dir: Path, args: tuple[str, ...]
) -> None:
    empty = in_empty_dir / "empty.db"
    empty.touch(mode=0o644)
    empty.chmod(0o644)
    fails(run("--db", str(empty), *args), f"no keystore at '{empty}'")
    assert empty.read_bytes() == b"" and stat.S_IMODE(empty.stat().st_mode) == 0o644
    ok(run("--db", str(empty), "devices", "add", "d1"))  # a command that adds makes one
    assert "d1" in ok(run("--db", str(empty), "devices", "list")).stdout
