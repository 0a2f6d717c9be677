"""`keybroker seed FILE`: bulk devices and keys from TOML or JSON, idempotent on re-run."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli_helpers import Invoke, cli_on, fails, no_keys_stored, ok

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "seed.example.toml"

SEED_TOML = """
[[devices]]
id = "gw-1"
name = "Gateway"
tags = { site = "lyon", line = ["a", "b"] }

[[devices]]
id = "s-1"
tags = ["site=paris"]

[[keys]]
name = "gw"
devices = ["gw-1"]
allow_ips = ["10.0.0.0/8"]
expires = 2031-01-01T00:00:00Z

[[keys]]
name = "lyon"
tags = { site = "lyon" }
pub = ["plant/+/telemetry"]
sub = ["plant/#"]

[[keys]]
description = "unnamed: created on every run"
deny_ips = ["192.0.2.1"]
topics = "all"
expires = "2031-06-01"
"""

SEED_JSON = {
    "devices": [
        {"id": "gw-1", "name": "Gateway", "tags": {"site": "lyon", "line": ["a", "b"]}},
        {"id": "s-1", "tags": ["site=paris"]},
    ],
    "keys": [
        {
            "name": "gw",
            "devices": ["gw-1"],
            "allow_ips": ["10.0.0.0/8"],
            "expires": "2031-01-01T00:00:00Z",
        },
        {"name": "lyon", "tags": ["site=lyon"], "pub": ["plant/+/telemetry"], "sub": ["plant/#"]},
        {"description": "unnamed", "deny_ips": ["192.0.2.1"], "topics": "all"},
    ],
}


@pytest.fixture
def cli(cli_db: str, monkeypatch: pytest.MonkeyPatch) -> Invoke:
    monkeypatch.delenv("KEYBROKER_DB", raising=False)
    return cli_on(cli_db)


def listing(cli: Invoke, what: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = json.loads(ok(cli(what, "list", "--json")).stdout)
    return docs


def secrets_in(path: Path) -> list[dict[str, Any]]:
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_seeded(cli: Invoke) -> None:
    devices = {d["deviceId"]: d for d in listing(cli, "devices")}
    assert set(devices) == {"gw-1", "s-1"}
    assert {(t["key"], t["value"]) for t in devices["gw-1"]["tags"]} == {
        ("site", "lyon"),
        ("line", "a"),
        ("line", "b"),
    }
    keys = {k["name"]: k for k in listing(cli, "keys")}
    assert keys["gw"]["deviceIds"] == ["gw-1"] and keys["gw"]["addresses"] == ["10.0.0.0/8"]
    assert keys["gw"]["expirationDate"] == "2031-01-01T00:00:00.000Z"
    assert keys["lyon"]["deviceTags"] == [{"key": "site", "value": "lyon"}]
    assert keys["lyon"]["filterType"] == "whitelist"  # pub/sub without topics: "only"
    assert keys[None]["addressFilterType"] == "blacklist" and keys[None]["filterType"] == "all"


@pytest.mark.parametrize("fmt", ["toml", "json", "json-no-extension", "toml-no-extension"])
def test_seed_and_reseed_is_idempotent(cli: Invoke, tmp_path: Path, fmt: str) -> None:
    text = SEED_TOML if fmt.startswith("toml") else json.dumps(SEED_JSON)
    seed = tmp_path / ("seed" if "no-extension" in fmt else f"seed.{fmt}")
    seed.write_text(text)

    first = ok(cli("seed", str(seed), "--output", str(tmp_path / "s1.jsonl")))
    check_seeded(cli)
    created = secrets_in(tmp_path / "s1.jsonl")
    assert sorted(str(c["name"]) for c in created) == ["None", "gw", "lyon"]
    assert all(len(c["key"]) >= 32 and len(c["secret"]) >= 43 for c in created)
    assert not any(c["secret"] in first.output for c in created)

    second = ok(cli("seed", str(seed), "--output", str(tmp_path / "s2.jsonl")))
    assert len(listing(cli, "devices")) == 2
    names = [k["name"] for k in listing(cli, "keys")]
    assert sorted(str(n) for n in names) == ["None", "None", "gw", "lyon"]  # unnamed: again
    assert [c["name"] for c in secrets_in(tmp_path / "s2.jsonl")] == [None]
    assert "skipped" in second.stderr and "'gw'" in second.stderr and "'lyon'" in second.stderr


def test_seed_without_output_prints_secrets_once_on_stdout(cli: Invoke, tmp_path: Path) -> None:
    seed = tmp_path / "seed.toml"
    seed.write_text(SEED_TOML)
    result = ok(cli("seed", str(seed)))
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(str(d["name"]) for d in lines) == ["None", "gw", "lyon"]
    assert all(set(d) == {"key", "name", "secret"} for d in lines)
    assert "cannot be recovered" in result.stderr
    for doc in lines:
        assert doc["secret"] not in ok(cli("keys", "list", "--json")).output


def test_seed_output_file_is_never_overwritten(cli: Invoke, tmp_path: Path,
                                              cli_db: str) -> None:
    seed, out = tmp_path / "seed.toml", tmp_path / "out.jsonl"
    seed.write_text(SEED_TOML)
    out.write_text("keep me\n")
    fails(cli("seed", str(seed), "--output", str(out)), str(out))
    assert out.read_text() == "keep me\n"
    assert no_keys_stored(cli, cli_db)


def test_example_seed_file_is_valid(cli: Invoke, tmp_path: Path) -> None:
    ok(cli("seed", str(EXAMPLE), "--output", str(tmp_path / "s.jsonl")))
    assert len(listing(cli, "devices")) == 3
    assert {k["name"] for k in listing(cli, "keys")} == {"gw-lyon-01", "lyon-fleet", "ops-console"}


def test_seed_example_prints_the_documented_file_and_needs_no_keystore(
    cli: Invoke, cli_db: str
) -> None:
    assert ok(cli("seed", "--example")).stdout == EXAMPLE.read_text(encoding="utf-8")
    assert no_keys_stored(cli, cli_db)
    line = fails(cli("seed"), "missing FILE")
    assert "keybroker seed --example" in line


def test_large_seed_shows_progress_on_stderr(cli: Invoke, tmp_path: Path) -> None:
    doc = {
        "devices": [{"id": f"dev-{i:05d}", "tags": {"batch": str(i % 7)}} for i in range(3000)],
        "keys": [{"name": f"k-{i}", "tags": [f"batch={i}"]} for i in range(7)],
    }
    seed = tmp_path / "big.json"
    seed.write_text(json.dumps(doc))
    result = ok(cli("seed", str(seed), "--output", str(tmp_path / "s.jsonl")))
    assert "seeding 3000 devices, 7 keys" in result.stderr
    assert "3007/3007" in result.stderr
    assert "devices: 3000, of which created or changed: 3000" in result.stderr
    assert len(listing(cli, "devices")) == 3000
    assert len(secrets_in(tmp_path / "s.jsonl")) == 7

    again = ok(cli("seed", str(seed), "--output", str(tmp_path / "s2.jsonl")))
    assert "devices: 3000, of which created or changed: 0" in again.stderr
    assert "keys created: 0" in again.stderr
    assert len(listing(cli, "devices")) == 3000 and len(listing(cli, "keys")) == 7
    assert not (tmp_path / "s2.jsonl").exists()  # nothing new to write: no empty file left


@pytest.mark.parametrize(
    ("content", "suffix", "needle"),
    [
        ("[[devices]]\nid = ", ".toml", "invalid TOML"),
        ('{"devices": [', ".json", "invalid JSON"),
        ('[[gadgets]]\nid = "x"', ".toml", "gadgets"),
        ('[[devices]]\nid = "x"\ncolour = "red"', ".toml", "colour"),
        ('[[devices]]\nname = "no id"', ".toml", "devices[0]"),
        ('[[devices]]\nid = "bad/id"', ".toml", "bad/id"),
        ('[[keys]]\ndevices = ["ghost"]', ".toml", "ghost"),
        ('[[keys]]\nallow_ips = ["10.0.0.0/99"]', ".toml", "10.0.0.0/99"),
        ('[[keys]]\npub = ["a/#/b"]', ".toml", "a/#/b"),
        ('[[keys]]\nexpires = "soon"', ".toml", "soon"),
        ('[[keys]]\ntags = ["nope"]', ".toml", "nope"),
        ('[[keys]]\nname = "a"\n[[keys]]\nname = "a"', ".toml", "'a'"),
        ('[[keys]]\nallow_ips = ["10.0.0.1"]\ndeny_ips = ["10.0.0.2"]', ".toml", "deny"),
    ],
)
def test_bad_seed_is_one_clear_line(
    cli: Invoke, tmp_path: Path, cli_db: str, content: str, suffix: str, needle: str
) -> None:
    seed = tmp_path / f"bad{suffix}"
    seed.write_text(content)
    fails(cli("seed", str(seed)), needle)
    assert no_keys_stored(cli, cli_db)


def test_missing_seed_file(cli: Invoke, tmp_path: Path) -> None:
    fails(cli("seed", str(tmp_path / "nope.toml")), "nope.toml")
