"""`keybroker apps ...` and `--app` on devices and keys: the CLI contract of applications."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from broker.cli import main
from tests.support.cli_helpers import Invoke, cli_on, fails, ok


@pytest.fixture
def cli(cli_db: str) -> Invoke:
    return cli_on(cli_db)


def as_json(result: object) -> object:
    return json.loads(ok(result).stdout)  # type: ignore[arg-type]


def test_create_list_show_update_delete(cli: Invoke, monkeypatch: pytest.MonkeyPatch) -> None:
    created = as_json(cli("apps", "create", "acme", "--description", "lab", "--max-keys", "5",
                          "--json"))
    assert isinstance(created, dict)
    assert len(created["id"]) == 24 and created["name"] == "acme"
    assert created["maxKeys"] == 5 and created["description"] == "lab"
    listed = as_json(cli("apps", "list", "--json"))
    assert isinstance(listed, list)
    assert {a["name"] for a in listed} == {"default", "acme"}
    ok(cli("devices", "add", "d1", "--app", "acme"))
    ok(cli("keys", "create", "--app", created["id"], "--name", "k"))  # by id works too
    shown = as_json(cli("apps", "show", "acme", "--json"))
    assert isinstance(shown, dict) and (shown["devices"], shown["keys"]) == (1, 1)
    ok(cli("apps", "update", "acme", "--name", "acme2", "--max-keys", "0"))
    renamed = as_json(cli("apps", "show", created["id"], "--json"))
    assert isinstance(renamed, dict) and renamed["name"] == "acme2" and renamed["maxKeys"] == 0
    fails(cli("apps", "delete", "acme2"), "confirmation needed")  # stdin is not a terminal
    assert "deleted application acme2" in ok(cli("apps", "delete", "acme2", "--yes")).stdout
    fails(cli("apps", "show", "acme2"), "no application 'acme2'")


def test_devices_and_keys_live_in_the_chosen_application(
    cli: Invoke, monkeypatch: pytest.MonkeyPatch,
) -> None:
    ok(cli("apps", "create", "acme"))
    device = as_json(cli("devices", "add", "d1", "--app", "acme", "--json"))
    key = as_json(cli("keys", "create", "--app", "acme", "--device", "d1", "--json"))
    assert isinstance(device, dict) and isinstance(key, dict)
    acme = as_json(cli("apps", "show", "acme", "--json"))
    assert isinstance(acme, dict)
    assert device["applicationId"] == key["applicationId"] == acme["id"]
    # Not visible from the default application ...
    assert as_json(cli("devices", "list", "--json")) == []
    assert as_json(cli("keys", "list", "--json")) == []
    fails(cli("devices", "show", "d1"), "no device 'd1'")
    fails(cli("keys", "show", key["key"]), "no access key")
    # ... and the id is taken across applications.
    fails(cli("devices", "add", "d1"), "'d1' already exists in another application")
    # KEYBROKER_APP picks the application as --app does.
    monkeypatch.setenv("KEYBROKER_APP", "acme")
    listed = as_json(cli("keys", "list", "--json"))
    assert isinstance(listed, list) and [k["key"] for k in listed] == [key["key"]]


def test_key_limit_and_name_errors_are_one_line(cli: Invoke) -> None:
    ok(cli("apps", "create", "small", "--max-keys", "1"))
    ok(cli("keys", "create", "--app", "small"))
    fails(cli("keys", "create", "--app", "small"), "key limit of 1 reached")
    fails(cli("apps", "create", "small"), "application name 'small' is already used")
    fails(cli("keys", "list", "--app", "nope"), "no application 'nope'")


def test_seed_places_devices_and_keys_in_applications(cli: Invoke, tmp_path: Path) -> None:
    seed = tmp_path / "s.toml"
    seed.write_text(
        '[[applications]]\nname = "plant"\nmax_keys = 3\n\n'
        '[[devices]]\napplication = "plant"\nid = "p1"\n\n'
        '[[devices]]\nid = "d1"\n\n'
        '[[keys]]\napplication = "plant"\nname = "pk"\ndevices = ["p1"]\n\n'
        '[[keys]]\nname = "pk"\n')  # the same name in another application is fine
    ok(cli("seed", str(seed)))
    plant = as_json(cli("keys", "list", "--app", "plant", "--json"))
    default = as_json(cli("keys", "list", "--json"))
    assert isinstance(plant, list) and isinstance(default, list)
    assert [k["name"] for k in plant] == ["pk"] and [k["name"] for k in default] == ["pk"]
    assert plant[0]["deviceIds"] == ["p1"]
    assert "keys created: 0" in ok(cli("seed", str(seed))).stderr  # re-running is safe


def cli_with_config(cli_db: str, config: Path, text: str) -> Invoke:
    """`keybroker --db DB --config CONFIG ARGS...`, the config file holding ``text``."""
    config.write_text(text)

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(main, ["--db", cli_db, "--config", str(config), *args],
                                  catch_exceptions=False)

    return invoke


def test_every_application_shows_its_key_limit_as_one_integer(
    cli_db: str, tmp_path: Path
) -> None:
    """`default` (stored without a limit: it follows the config) and an application made
    here show the limit in force the same way: an integer, 0 for no limit."""
    with_config = cli_with_config(cli_db, tmp_path / "kb.toml", "[keystore]\nmax_keys = 5\n")
    ok(with_config("apps", "create", "plant"))
    ok(with_config("apps", "create", "open", "--max-keys", "0"))
    limits = {a["name"]: a["maxKeys"] for a in as_json(with_config("apps", "list", "--json"))}
    assert limits == {"default": 5, "plant": 5, "open": 0}
    plain = cli_on(cli_db)  # no config: [keystore] max_keys = 0, no limit
    limits = {a["name"]: a["maxKeys"] for a in as_json(plain("apps", "list", "--json"))}
    assert limits == {"default": 0, "plant": 5, "open": 0}
    assert as_json(plain("apps", "show", "default", "--json"))["maxKeys"] == 0
    listing = ok(plain("apps", "list")).stdout
    assert "from config" not in listing
    max_keys = {row.split()[1]: row.split()[-1] for row in listing.splitlines()[2:]}
    assert max_keys == {"default": "none", "plant": "5", "open": "none"}


def test_device_limit_of_an_application(cli: Invoke, tmp_path: Path) -> None:
    """--max-devices on create and update, shown by show and list; a device past it is
    refused in one line, whichever command adds it."""
    created = as_json(cli("apps", "create", "small", "--max-devices", "1", "--json"))
    assert isinstance(created, dict) and created["maxDevices"] == 1
    ok(cli("devices", "add", "s1", "--app", "small"))
    fails(cli("devices", "add", "s2", "--app", "small"),
          "device limit of 1 reached in application 'small'")
    seed = tmp_path / "s.toml"
    seed.write_text('[[devices]]\napplication = "small"\nid = "s2"\n\n'
                    '[[devices]]\napplication = "small"\nid = "s3"\n')
    fails(cli("seed", str(seed)), "device limit of 1 reached in application 'small'")
    refused = cli("apps", "create", "neg", "--max-devices", "-1")  # click's usage error
    assert refused.exit_code == 2 and "-1 is not in the range x>=0" in refused.stderr
    ok(cli("apps", "update", "small", "--max-devices", "3"))
    shown = as_json(cli("apps", "show", "small", "--json"))
    assert isinstance(shown, dict) and (shown["maxDevices"], shown["devices"]) == (3, 1)
    ok(cli("seed", str(seed)))
    text = ok(cli("apps", "show", "small")).stdout
    assert "max devices: 3" in text and "devices:     3" in text
    ok(cli("apps", "update", "small", "--max-devices", "0"))
    listing = ok(cli("apps", "list")).stdout.splitlines()
    assert listing[1].split()[-4:] == ["MAX", "DEVICES", "MAX", "KEYS"]
    rows = {line.split()[1]: line.split()[-2:] for line in listing[2:]}
    assert rows == {"default": ["none", "none"], "small": ["none", "none"]}
    assert "--max-keys or --max-devices" in cli("apps", "update", "small").stderr


def test_the_configured_device_limit_is_the_default_of_new_applications(
    cli_db: str, tmp_path: Path
) -> None:
    with_config = cli_with_config(cli_db, tmp_path / "kb.toml",
                                  "[keystore]\nmax_devices = 2\n")
    ok(with_config("apps", "create", "plant"))
    ok(with_config("apps", "create", "open", "--max-devices", "0"))
    limits = {a["name"]: a["maxDevices"] for a in as_json(with_config("apps", "list", "--json"))}
    assert limits == {"default": 2, "plant": 2, "open": 0}
    ok(with_config("devices", "add", "d1"))
    ok(with_config("devices", "add", "d2"))
    fails(with_config("devices", "add", "d3"), "device limit of 2 reached in application "
          "'default': it holds 2, cannot add 1 more")
    plain = cli_on(cli_db)  # no config: [keystore] max_devices = 0, no limit
    limits = {a["name"]: a["maxDevices"] for a in as_json(plain("apps", "list", "--json"))}
    assert limits == {"default": 0, "plant": 2, "open": 0}
    ok(plain("devices", "add", "d3"))
