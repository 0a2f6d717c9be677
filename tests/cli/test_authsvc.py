"""`keybroker authsvc` as a command: what it refuses to start on, in one line."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from broker.cli import main
from tests.support.cli_helpers import fails


def test_authsvc_never_creates_a_keystore(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["authsvc", "--db", str(tmp_path / "none.db"),
                                       "--port", "0"], catch_exceptions=False)
    fails(result, "no keystore at", "none.db")
    assert not (tmp_path / "none.db").exists()


def test_an_unreadable_engine_password_file_is_one_line(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    assert CliRunner().invoke(main, ["--db", str(db), "devices", "add", "d1"]).exit_code == 0
    config = tmp_path / "kb.toml"
    config.write_text('[rabbitmq]\napi = ["http://127.0.0.1:15672"]\nuser = "admin"\n'
                      f'password_file = "{tmp_path / "missing"}"\n')
    result = CliRunner().invoke(main, ["--db", str(db), "authsvc", "--config", str(config),
                                       "--port", "0"], catch_exceptions=False)
    fails(result, "[rabbitmq] password_file", "missing")
