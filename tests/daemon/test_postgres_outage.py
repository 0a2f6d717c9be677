"""The daemon on PostgreSQL when the server goes away (a real server, stopped and started
during the test): new CONNECTs are refused with CONNACK 3 and never let in unchecked,
live sessions keep their grants, the outage and the recovery are logged once each, and
on recovery the change feed catches up, so a key revoked while the daemon could not
reach the database still kicks its session. Also: an unreachable server at start-up is
one clear error, without the URL's password."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from broker.cli import main
from keystore import KeyStore
from tests.support.harness import Client, RunningBroker, broker_settings
from tests.support.postgres import PostgresServer, free_port, run_sync
from tests.support.waiting import wait_until

ACCEPTED, SERVER_UNAVAILABLE, NOT_AUTHORIZED = 0, 3, 5
STATE = "losant/dev-a/state"


@pytest.fixture
def own_server(postgres: PostgresServer) -> Iterator[PostgresServer]:
    """A server of this test's own (it is stopped and started; the session's one is
    shared). Requesting ``postgres`` first skips or fails the same way without binaries."""
    server = PostgresServer()
    try:
        server.init()
        server.start()
        server.admin("CREATE DATABASE ks")
        yield server
    finally:
        server.destroy()


def connack(port: int, device: str, key: str, secret: str) -> int:
    with Client(port, device, key, secret) as client:
        return client.connect()


async def deactivate(url: str, key: str) -> None:
    async with KeyStore.open(url) as ks:
        await ks.set_status([key], "inactive")


def test_outage_refuses_new_connects_keeps_sessions_and_catches_up_on_return(
    own_server: PostgresServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="keystore.postgres.db")
    daemon = RunningBroker(broker_settings(tmp_path, db_url=own_server.url("ks"))).start()
    try:
        for device in ("dev-a", "dev-b", "dev-c"):
            daemon.ks("add_device", device, tags=[("site", "north")])
        doomed, doomed_secret = daemon.ks("create_key", device_tags=["site=north"])
        kept, kept_secret = daemon.ks("create_key", device_tags=["site=north"])
        _row, token = daemon.ks("create_token", "ops")
        api = daemon.server.api.url + "/applications"

        def api_status() -> int:
            headers = {"Authorization": f"Bearer {token}"}
            return requests.get(api, headers=headers, timeout=10).status_code

        assert api_status() == 200
        port = daemon.port()
        with Client(port, "dev-a", doomed.key, doomed_secret) as victim, \
                Client(port, "dev-b", kept.key, kept_secret) as reader:
            assert victim.connect() == ACCEPTED and reader.connect() == ACCEPTED
            assert reader.subscribe(STATE) == 0

            own_server.stop()
            # Refused as "server unavailable", a good secret and a wrong one alike.
            assert connack(port, "dev-c", kept.key, kept_secret) == SERVER_UNAVAILABLE
            assert connack(port, "dev-c", kept.key, "wrong") == SERVER_UNAVAILABLE
            assert api_status() == 503  # the HTTP API says so too
            # Live sessions keep their grants: messages still flow between them.
            victim.publish(STATE, b'{"data":{"t":1}}')
            message = reader.get()
            assert message is not None and message.topic == STATE

            # The key is revoked while the daemon cannot reach the database: the server
            # runs on another port for a moment, then stops again.
            elsewhere = free_port()
            own_server.start(port=elsewhere)
            run_sync(lambda: deactivate(own_server.url("ks", port=elsewhere), doomed.key))
            own_server.stop()
            # Time under test: nobody could tell the daemon yet, so nothing happens.
            assert not victim.disconnected.wait(0.5)
            assert connack(port, "dev-c", kept.key, kept_secret) == SERVER_UNAVAILABLE

            own_server.start()
            # The daemon reconnects (backoff at most 5 s) and catches up from the last row
            # it applied: the revoked key's session is kicked, the other one stays.
            assert victim.disconnected.wait(15), "revoked session was not kicked"
            assert not reader.disconnected.is_set()
            wait_until(lambda: connack(port, "dev-c", kept.key, kept_secret) == ACCEPTED, 15,
                       "a CONNECT accepted after recovery", poll=0.2)
            assert connack(port, "dev-c", doomed.key, doomed_secret) == NOT_AUTHORIZED
            assert api_status() == 200
        kicks = [e for e in daemon.audit_events() if e["event"] == "kick"]
        assert [(e["key"], e["reason"]) for e in kicks] == [(doomed.key, "key_inactive")]
        refused = [e for e in daemon.audit_events() if e.get("reason") == "keystore_unavailable"]
        assert len(refused) == 3
    finally:
        daemon.stop()
    messages = [r.getMessage() for r in caplog.records if r.name == "keystore.postgres.db"]
    assert sum("unreachable" in m for m in messages) == 1, messages
    assert sum("reachable again" in m for m in messages) == 1, messages


def test_an_unreachable_server_at_start_is_one_clear_line_without_the_password(
    tmp_path: Path,
) -> None:
    url = f"postgresql://keybroker:s3cret-pw@127.0.0.1:{free_port()}/ks"
    runner = CliRunner()
    for args in (["devices", "list"], ["serve", "--port", "0", "--no-api"]):
        result = runner.invoke(main, ["--db", url, *args])
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.output, result.output
        assert lines[0].startswith("Error: cannot reach the PostgreSQL keystore "
                                   f"postgresql://keybroker@127.0.0.1:{url.split(':')[3]}")
        assert "s3cret-pw" not in result.output


def test_a_bad_keystore_url_is_one_line_naming_it() -> None:
    result = CliRunner().invoke(main, ["--db", "mysql://root:pw@db/ks", "devices", "list"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "Error: invalid keystore URL 'mysql://root@db/ks': unsupported scheme 'mysql' "
        "(use postgresql://user@host:port/dbname, or a plain path for an SQLite file)")
