"""`keybroker tokens ...`: admin tokens of the HTTP API, shown once and stored hashed."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest

from keystore import KeyStore
from tests.support.cli_helpers import Invoke, cli_on, fails, ok
from tests.support.dbdump import dump_text


@pytest.fixture
def cli(cli_db: str) -> Invoke:
    return cli_on(cli_db)


def _check(db: str, token: str) -> object:
    async def go() -> object:
        async with KeyStore.open(db) as ks:
            return await ks.check_token(token, datetime.now(UTC))

    return asyncio.run(go())


def test_create_prints_the_token_once_and_stores_only_a_hash(cli: Invoke,
                                                             cli_db: str) -> None:
    out = ok(cli("tokens", "create", "--name", "ops")).stdout
    token = next(line.split("token: ")[1] for line in out.splitlines()
                 if line.startswith("token: "))
    assert token.startswith("kba.") and "shown this once" in out
    row = _check(cli_db, token)
    assert row is not None and row.name == "ops" and row.scopes == ("all.Application",)
    for listing in (cli("tokens", "list"), cli("tokens", "list", "--json"),
                    cli("tokens", "show", "ops"), cli("tokens", "show", "ops", "--json")):
        assert token.split(".")[2] not in ok(listing).stdout
    raw = dump_text(cli_db)
    assert token.split(".")[2].encode() not in raw  # not in the database in clear


def test_scopes_application_expiry_and_revoke(cli: Invoke, cli_db: str) -> None:
    ok(cli("apps", "create", "acme"))
    made = json.loads(ok(cli("tokens", "create", "--name", "reader", "--app", "acme",
                             "--scope", "all.Application.read", "--scope", "devices.*",
                             "--expires", "2099-01-01", "--json")).stdout)
    assert made["scope"] == ["all.Application.read", "devices.*"]
    assert made["expirationDate"] == "2099-01-01T00:00:00.000Z"
    assert made["applicationId"] == json.loads(ok(cli("apps", "show", "acme",
                                                       "--json")).stdout)["id"]
    assert _check(cli_db, made["token"]) is not None
    fails(cli("tokens", "create", "--name", "reader"), "'reader'", "already used")
    fails(cli("tokens", "create", "--name", "x", "--scope", "everything"), "'everything'")
    fails(cli("tokens", "create", "--name", "x", "--expires", "2001-01-01"), "in the past")
    fails(cli("tokens", "create", "--name", "x", "--app", "nope"), "'nope'")
    assert "revoked token reader" in ok(cli("tokens", "revoke", "reader")).stdout
    assert _check(cli_db, made["token"]) is None
    shown = json.loads(ok(cli("tokens", "show", made["id"], "--json")).stdout)
    assert shown["status"] == "revoked"
    fails(cli("tokens", "revoke", "reader", "ghost"), "'ghost'")


def test_tokens_name_their_application(cli: Invoke) -> None:
    ok(cli("apps", "create", "acme"))
    app_id = json.loads(ok(cli("apps", "show", "acme", "--json")).stdout)["id"]
    made = json.loads(ok(cli("tokens", "create", "--name", "reader", "--app", "acme",
                             "--json")).stdout)
    assert (made["applicationId"], made["applicationName"]) == (app_id, "acme")
    ok(cli("tokens", "create", "--name", "ops"))
    rows = ok(cli("tokens", "list")).stdout.splitlines()[2:]  # keystore line, header
    by_name = {row.split()[1]: row.split()[2] for row in rows}
    assert by_name == {"reader": "acme", "ops": "all"}
    assert app_id not in ok(cli("tokens", "list")).stdout
    listed = {t["name"]: t for t in json.loads(ok(cli("tokens", "list", "--json")).stdout)}
    assert (listed["reader"]["applicationId"], listed["reader"]["applicationName"]) == (
        app_id, "acme")
    assert (listed["ops"]["applicationId"], listed["ops"]["applicationName"]) == (None, None)
    shown = ok(cli("tokens", "show", "reader")).stdout
    assert "application: acme" in shown and app_id not in shown
    created = ok(cli("tokens", "create", "--name", "writer", "--app", "acme")).stdout
    assert "for application(s) acme," in created and app_id not in created
