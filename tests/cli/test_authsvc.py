"""`keybroker authsvc` as a command: what it refuses to start on, in one line."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from broker.cli import main
from keystore import KeyStore
from keystore.models import AccessKey
from tests.support.authsvc import Replica, ask, on_keystore
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


def test_authsvc_runs_on_a_postgresql_url_given_with_db(pg_url: str, tmp_path: Path) -> None:
    assert "--db PATH|URL" in CliRunner().invoke(main, ["authsvc", "--help"]).output

    async def key(ks: KeyStore) -> tuple[AccessKey, str]:
        await ks.add_device("pg-1")
        return await ks.create_key(device_ids=["pg-1"])

    made, secret = on_keystore(pg_url, key)
    # The test server trusts local connections: the password is never needed, so it
    # shows whether the URL is logged with it.
    with_password = pg_url.replace("keybroker@", "keybroker:pw-not-to-be-logged@")
    replica = Replica(tmp_path, "pg", "[authsvc]\nport = 0\n", ["--db", with_password])
    try:
        replica.start()
        answer = ask(replica.url, "/auth/user", {"username": made.key, "password": secret,
                                                 "vhost": "/", "client_id": "pg-1"})
        wrong = ask(replica.url, "/auth/user", {"username": made.key, "password": "x" + secret,
                                                "vhost": "/", "client_id": "pg-1"})
    finally:
        replica.stop()
    assert (answer, wrong) == ((200, "allow"), (200, "deny"))
    log = replica.log_text()
    assert f"keystore {pg_url}" in log
    assert "pw-not-to-be-logged" not in log and secret not in log
