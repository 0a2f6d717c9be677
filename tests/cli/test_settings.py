"""Settings: defaults in code, the optional config file, its checks, `keybroker config`."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from broker.cli import main
from broker.core.settings import (
    ANY_HOST,
    DEFAULT_LISTENERS,
    Settings,
    config_keys,
    example_config,
    load_settings,
    place,
    settings_from_toml,
)
from broker.policy.guard import GuardSettings
from keystore.errors import ConfigError
from tests.support.cli_helpers import fails, ok

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "keybroker.toml"


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYBROKER_CONFIG", raising=False)
    monkeypatch.delenv("KEYBROKER_DB", raising=False)


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def config_error(result: Result, *needles: str) -> str:
    """A config error: one line on stderr naming the problem, exit code 2."""
    line = fails(result, *needles)
    assert result.exit_code == 2, result.output
    return line


# --- the documented example is the defaults --------------------------------------------


def default_of(section: str, key: str) -> Any:
    if section == "security":
        return getattr(GuardSettings(), key)
    name = next(f.name for f in fields(Settings) if place(f.name) == (section, key))
    return getattr(Settings(), name)


def test_example_config_documents_every_setting_at_its_default() -> None:
    raw = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    present = {(section, key) for section, table in raw.items() if section != "listeners"
               for key in table}
    missing = sorted(config_keys() - present)
    assert not missing, "document in config/keybroker.toml: " + ", ".join(
        f"[{section}] {key} = {default_of(section, key)!r}" for section, key in missing)
    assert present == config_keys(), f"not settings: {sorted(present - config_keys())}"
    assert settings_from_toml(raw) == Settings()  # every value is the default
    assert settings_from_toml({"listeners": raw["listeners"]}).listeners == DEFAULT_LISTENERS


def test_example_config_is_package_data_and_printed_by_the_cli() -> None:
    assert example_config() == EXAMPLE.read_text(encoding="utf-8")
    assert ok(run("config", "example")).stdout == EXAMPLE.read_text(encoding="utf-8")


# --- where settings come from ----------------------------------------------------------


def test_without_a_config_file_the_defaults_apply(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no config/keybroker.toml to stumble upon
    assert load_settings() == Settings()
    assert Settings().listeners == DEFAULT_LISTENERS
    assert [(item.type, item.port) for item in DEFAULT_LISTENERS] == [("tcp", 1883), ("ws", 8083)]


def test_a_named_config_file_that_does_not_exist_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match="missing.toml.*not found"):
        load_settings(missing)
    monkeypatch.setenv("KEYBROKER_CONFIG", str(missing))
    config_error(run("keys", "list"), "missing.toml", "not found")
    config_error(run("--config", str(missing), "devices", "list"), "missing.toml")


def test_config_values_override_defaults_and_keep_the_rest(tmp_path: Path) -> None:
    config = tmp_path / "kb.toml"
    config.write_text('[limits]\nmax_packet_size = 1024\n[security]\nban = 5\n'
                      '[mqtt]\ndenied_publish = "disconnect"\n')
    settings = load_settings(config)
    assert settings.max_packet_size == 1024 and settings.denied_publish == "disconnect"
    assert settings.guard == GuardSettings(ban=5.0)
    assert settings.max_connections == Settings().max_connections
    assert settings.listeners == DEFAULT_LISTENERS  # no [listeners]: the defaults


def test_listeners_in_the_file_replace_the_defaults(tmp_path: Path) -> None:
    config = tmp_path / "kb.toml"
    config.write_text('[listeners.only]\nport = 1999\n[listeners.off]\ntype = "ws"\n'
                      'enabled = false\n')
    (listener,) = load_settings(config).listeners
    assert (listener.name, listener.type, listener.host, listener.port) == (
        "only", "tcp", ANY_HOST, 1999)


def test_relative_paths_resolve_against_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "kb.toml").write_text('[keystore]\npath = "db/kb.db"\n[audit]\npath = "audit.log"\n'
                                 '[listeners.tls]\nport = 0\ncertfile = "c.pem"\n'
                                 'keyfile = "/abs/k.pem"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(Path("../etc/kb.toml"))
    assert settings.db_path.resolve() == etc / "db" / "kb.db"
    assert settings.audit_path is not None and settings.audit_path.resolve() == etc / "audit.log"
    assert Path(settings.listeners[0].certfile or "").resolve() == etc / "c.pem"
    assert settings.listeners[0].keyfile == "/abs/k.pem"
    # The CLI uses that keystore from any directory.
    ok(run("--config", str(etc / "kb.toml"), "devices", "add", "d1"))
    assert (etc / "db" / "kb.db").exists() and not (elsewhere / "db").exists()
    assert "d1" in ok(run("--config", "../etc/kb.toml", "devices", "list")).stdout


# --- bad config files --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ("[limits]\nmax_packet_sise = 10\n",
         ["max_packet_sise", "unknown key", "(did you mean 'max_packet_size'?)"]),
        ("[limits]\ndevice_prefix = \"x\"\n",
         ["[limits]: unknown key 'device_prefix' (did you mean [mqtt] device_prefix?)"]),
        ("[limit]\nmax_packet_size = 10\n",
         ["[limit]", "unknown section", "(did you mean [limits]?)"]),
        ("[listeners.tcp]\nprot = 1883\n",
         ["[listeners.tcp]", "'prot'", "(did you mean 'port'?)"]),
        ("[limits]\nmax_packet_size = \"big\"\n", ["max_packet_size", "'big'", "integer"]),
        ("[limits]\nmax_packet_size = 1.5\n", ["max_packet_size", "1.5", "integer"]),
        ("[limits]\nconnect_timeout = true\n", ["connect_timeout", "True", "number"]),
        ("[limits]\nmax_connections = -1\n", ["max_connections", "-1", "0 or more"]),
        ("[limits]\nchange_poll_interval = 0\n", ["change_poll_interval", "more than 0"]),
        ("[mqtt]\ndenied_publish = \"ignore\"\n", ["denied_publish", "'ignore'"]),
        ("[network]\ntrusted_proxies = [\"10.0.0.0/33\"]\n", ["trusted_proxies", "10.0.0.0/33"]),
        ("[network]\ntrusted_proxies = \"10.0.0.0/8\"\n", ["trusted_proxies", "list"]),
        ("[keystore]\npath = 3\n", ["[keystore] path", "3"]),
        ("[keystore]\nurl = \"mysql://u:pw@db/ks\"\n",
         ["[keystore] url", "'mysql://u@db/ks'", "unsupported scheme 'mysql'"]),
        ("[keystore]\nurl = \"postgresql://db:5432\"\n", ["[keystore] url", "no database name"]),
        ("[keystore]\npool_size = 0\n", ["[keystore] pool_size", "more than 0"]),
        ("[keystore]\nstatement_timeout = -1\n", ["statement_timeout", "more than 0"]),
        ("[security]\nmax_ban = \"1h\"\n", ["max_ban", "'1h'"]),
        ("[listeners.tcp]\nport = 70000\n", ["port", "70000"]),
        ("[listeners.tcp]\ntype = \"udp\"\n", ["type", "'udp'"]),
        ("[listeners.tls]\ncertfile = \"c.pem\"\n", ["[listeners.tls]", "keyfile"]),
        ("[listeners]\ntcp = 1883\n", ["[listeners.tcp]", "table"]),
        ("[api]\nport = 70000\n", ["[api] port", "70000"]),
        ("[api]\ncertfile = \"c.pem\"\n", ["[api]", "keyfile"]),
        ("[api]\ndevice_token_ttl = 0\n", ["device_token_ttl", "more than 0"]),
        ("[api]\ndevice_token_ttl = 99999999\n", ["device_token_ttl", "max_device_token_ttl"]),
        ("[api]\ncors_origins = [\"evil.example\"]\n", ["cors_origins", "'evil.example'"]),
        ("[api]\nenabled = \"yes\"\n", ["[api] enabled", "true or false"]),
        ("[authsvc]\nport = 70000\n", ["[authsvc] port", "70000"]),
        ("[authsvc]\nallowed_peers = [\"10.0.0.0/33\"]\n", ["allowed_peers", "10.0.0.0/33"]),
        ("[rabbitmq]\napi = [\"ftp://x\"]\n", ["[rabbitmq] api", "'ftp://x'"]),
        ("[rabbitmq]\napi = [\"http://x:15672\"]\n", ["[rabbitmq] api", "password_file"]),
        ("[emqx]\napi = [\"http://x:18083\"]\n", ["[emqx] api", "api_secret_file"]),
        ("[limits\n", ["invalid TOML"]),
    ],
)
def test_a_bad_config_is_one_line_and_exit_code_2(
    tmp_path: Path, content: str, needles: list[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(content)
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert "\n" not in str(caught.value)
    shown = run("--config", str(config), "config", "show")
    config_error(shown, "bad.toml", *needles)
    assert shown.stdout == ""  # the error alone, no header before it
    config_error(run("serve", "--config", str(config)), "bad.toml", *needles)


def test_an_unreadable_config_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    config_error(run("--config", str(tmp_path), "keys", "list"), str(tmp_path))  # a directory
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[limits]\n")
    config_error(run("--config", str(binary), "keys", "list"), "binary.toml", "UTF-8")


def test_serve_without_any_listener_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "kb.toml"
    config.write_text('[listeners.tcp]\nenabled = false\n')
    config_error(run("--db", str(tmp_path / "k.db"), "serve", "--config", str(config)),
                 "no listener enabled")
    assert not (tmp_path / "k.db").exists()


def test_config_errors_in_a_real_process_have_no_traceback(tmp_path: Path) -> None:
    config = tmp_path / "kb.toml"
    config.write_text("[limits]\nkeepalive_factor = \"fast\"\n")
    proc = subprocess.run([sys.executable, "-m", "broker.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"Error: config file {str(config)!r}: [limits] keepalive_factor: "
        "expected a number, not 'fast'"
    ]


# --- config show -------------------------------------------------------------------------


def test_config_show_prints_the_effective_settings_as_a_loadable_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "kb.toml"
    config.write_text('[keystore]\npath = "k.db"\n[limits]\nmax_topic_levels = 9\n'
                      '[listeners.tcp]\nhost = "127.0.0.1"\nport = 0\n'
                      '[audit]\npath = "/var/log/kb-audit.jsonl"\n')
    shown = ok(run("--config", str(config), "config", "show")).stdout
    assert shown.startswith(f"# keybroker settings in effect: config file {config}")
    assert f'path = "{tmp_path / "k.db"}"' in shown and "max_topic_levels = 9" in shown
    copy = tmp_path / "shown.toml"
    copy.write_text(shown)
    assert load_settings(copy) == load_settings(config)

    monkeypatch.chdir(tmp_path)
    defaults = ok(run("--db", "other.db", "config", "show")).stdout
    assert "built-in defaults (no config file)" in defaults
    assert f'path = "{tmp_path / "other.db"}"' in defaults  # --db applies, made absolute
    assert 'path = ""' in defaults  # audit off
    copy.write_text(defaults)
    assert load_settings(copy) == Settings(db_path=tmp_path / "other.db")


def test_config_show_holds_no_secret(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    created = ok(run("--db", str(db), "keys", "create", "--json")).stdout
    secret = created.split('"secret": "')[1].split('"')[0]
    assert secret not in ok(run("--db", str(db), "config", "show")).stdout


def test_config_show_never_prints_the_keystore_password(tmp_path: Path) -> None:
    url = "postgresql://keybroker:hunter2@db.example.com:5432/keys"
    shown = ok(run("--db", url, "config", "show")).stdout
    assert 'url = "postgresql://keybroker@db.example.com:5432/keys"' in shown
    assert "hunter2" not in shown
    config = tmp_path / "pg.toml"
    config.write_text(f'[keystore]\nurl = "{url}"\npool_size = 4\n')
    loaded = load_settings(config)
    assert (loaded.db_url, loaded.db_pool_size, loaded.keystore_target) == (url, 4, url)
    assert loaded.keystore_shown == "postgresql://keybroker@db.example.com:5432/keys"
    assert loaded.with_db(str(tmp_path / "k.db")).keystore_target == str(tmp_path / "k.db")
