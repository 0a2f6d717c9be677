"""Tokens in the keystore: admin tokens and device tokens are found by id and checked like
secrets (salted HMAC), bound to what they were made for, and gone with it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from keystore import KeyStore, ValidationError
from keystore.scopes import grants, validate_scopes
from tests.support.dbdump import dump


async def test_an_admin_token_is_checked_like_a_secret(keystore_target: str) -> None:
    now = datetime.now(UTC)
    async with KeyStore.open(keystore_target) as ks:
        row, token = await ks.create_token("ops", scopes=["devices.*", "devices.*"])
        assert row.scopes == ("devices.*",) and row.app_id is None
        kind, token_id, secret = token.split(".")
        assert kind == "kba" and token_id == row.id
        assert await ks.check_token(token, now) == row
        for wrong in (f"kba.{token_id}.{secret[:-1]}x", f"kbd.{token_id}.{secret}",
                      f"kba.{'0' * 24}.{secret}", "kba..", "", secret):
            assert await ks.check_token(wrong, now) is None
        (revoked,) = await ks.revoke_tokens(["ops"])
        assert revoked.status == "revoked" and await ks.check_token(token, now) is None
        later, soon = await ks.create_token("soon", expires_at=now + timedelta(hours=1))
        assert await ks.check_token(soon, now) == later
        assert await ks.check_token(soon, now + timedelta(hours=2)) is None
    stored = repr(dump(keystore_target)["api_tokens"]).encode()
    assert token_id.encode() in stored and secret.encode() not in stored


async def test_tokens_of_an_application_go_with_it(keystore_target: str) -> None:
    now = datetime.now(UTC)
    async with KeyStore.open(keystore_target) as ks:
        app = await ks.create_app("acme")
        row, token = await ks.create_token("acme-ops", app="acme")
        assert row.app_id == app.id
        await ks.delete_apps(["acme"])
        assert await ks.check_token(token, now) is None
        assert await ks.list_tokens() == []


async def test_device_tokens_follow_their_key_and_device(keystore_target: str) -> None:
    now = datetime.now(UTC)
    async with KeyStore.open(keystore_target) as ks:
        await ks.add_device("d1", tags=["site=a"])
        await ks.add_device("d2", tags=["site=a"])
        key, _ = await ks.create_key(device_tags=["site=a"])
        token, expires = await ks.create_device_token(key, "d1", 60)
        assert abs((expires - now).total_seconds() - 60) < 5
        found = await ks.device_token_lookup(token, now)
        assert found is not None and found.facts.device_in_scope
        assert found.facts.scope == {"d1", "d2"}
        await ks.untag_device("d1", ["site"])  # the scope is read as of now
        found = await ks.device_token_lookup(token, now)
        assert found is not None and not found.facts.device_in_scope
        assert await ks.device_token_lookup(token, now + timedelta(seconds=61)) is None
        assert await ks.prune_device_tokens(now + timedelta(seconds=61)) == 1
        assert await ks.device_token_lookup(token, now) is None
        with pytest.raises(ValidationError, match="TTL"):
            await ks.create_device_token(key, "d2", 0)


async def test_a_device_keeps_only_its_newest_tokens(keystore_target: str) -> None:
    now = datetime.now(UTC)
    async with KeyStore.open(keystore_target) as ks:
        await ks.add_device("d1")
        key, _ = await ks.create_key(device_ids=["d1"])
        tokens = [(await ks.create_device_token(key, "d1", 60))[0] for _ in range(20)]
        alive = [t for t in tokens if await ks.device_token_lookup(t, now) is not None]
        assert alive == tokens[-16:]


def test_scope_grammar() -> None:
    assert validate_scopes(["all.Application.read", "device.sendCommand"])
    for bad in (["all"], ["applicationKeys.put"], [], "all.Application"):
        with pytest.raises(ValidationError):
            validate_scopes(bad)
    assert grants(["all.Application"], "applications", "post")
    assert grants(["all.Application.read"], "device", "get")
    assert not grants(["all.Application.read"], "device", "patch")
    assert grants(["device.*"], "device", "sendState")
    assert grants(["device.sendState"], "device", "sendState")
    assert not grants(["device.sendState"], "device", "sendCommand")
    assert not grants(["devices.*"], "device", "get")
