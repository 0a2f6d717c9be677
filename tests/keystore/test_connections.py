"""Connection snapshots (keystore.connections): what an external engine's connection was
granted at CONNECT, written by one replica and read back by another; on an SQLite file
and on a PostgreSQL database (``keystore_target``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from keystore import KeyStore, NotFoundError, ValidationError
from keystore.connections import scope_digest

NOW = datetime(2026, 1, 1, tzinfo=UTC)


async def test_a_snapshot_written_by_one_replica_is_read_by_another(keystore_target: str) -> None:
    path = keystore_target
    async with KeyStore.open(path) as first, KeyStore.open(path) as second:
        await first.add_device("a", tags=[("site", "n")])
        await first.add_device("b", tags=[("site", "n")])
        key, secret = await first.create_key(device_tags=[("site", "n")])
        facts = await first.connect_lookup(key.key, secret, "a")
        snapshot, previous = await first.record_connection("a", key.key, facts.scope, "p1",
                                                           "10.0.0.7", NOW)
        assert previous is None
        assert snapshot.scope == scope_digest(frozenset({"a", "b"}))
        row = await second.connection("a")
        assert row is not None
        assert (row.snapshot, row.key.key, row.device_app) == (snapshot, key.key, key.app_id)
        assert await second.connection_scope(row.snapshot) == {"a", "b"}
        # A tag change after CONNECT does not move the recorded scope.
        await second.untag_device("b", ["site"])
        assert await second.connection_scope((await second.connection("a")).snapshot) == \
            {"a", "b"}  # type: ignore[union-attr]


async def test_the_replaced_snapshot_is_returned(keystore_target: str) -> None:
    async with KeyStore.open(keystore_target) as ks:
        await ks.add_device("a")
        one, _ = await ks.create_key(device_ids=["a"])
        two, _ = await ks.create_key()
        first, _ = await ks.record_connection("a", one.key, frozenset({"a"}), "p", "1.1.1.1", NOW)
        again, previous = await ks.record_connection("a", one.key, frozenset({"a"}), "p",
                                                     "2.2.2.2", NOW)
        assert previous == first and previous.same_grant(again)
        other, previous = await ks.record_connection("a", two.key, None, "p", "2.2.2.2", NOW)
        assert previous == again and not previous.same_grant(other)
        changed, previous = await ks.record_connection("a", two.key, None, "q", "2.2.2.2", NOW)
        assert not previous.same_grant(changed)  # type: ignore[union-attr]


async def test_snapshots_go_with_their_key_and_their_device(keystore_target: str) -> None:
    async with KeyStore.open(keystore_target) as ks:
        await ks.add_device("a")
        await ks.add_device("b")
        key, _ = await ks.create_key()
        for device in ("a", "b"):
            await ks.record_connection(device, key.key, None, "p", "1.1.1.1", NOW)
        assert [s.client_id for s in await ks.connections_of_key(key.key)] == ["a", "b"]
        await ks.remove_devices(["a"])
        assert await ks.connection("a") is None
        await ks.delete_keys([key.key])
        assert await ks.connection("b") is None
        assert await ks.connections_of_key(key.key) == []


async def test_a_snapshot_needs_a_device_and_a_policy(keystore_target: str) -> None:
    async with KeyStore.open(keystore_target) as ks:
        key, _ = await ks.create_key()
        with pytest.raises(ValidationError, match="invalid device id 'a/b'"):
            await ks.record_connection("a/b", key.key, None, "p", "1.1.1.1", NOW)
        with pytest.raises(ValidationError, match="invalid policy digest"):
            await ks.record_connection("a", key.key, None, "", "1.1.1.1", NOW)
        with pytest.raises(NotFoundError, match="no device 'ghost'"):
            await ks.record_connection("ghost", key.key, None, "p", "1.1.1.1", NOW)
        with pytest.raises(NotFoundError, match="no device 'ghost'"):  # with a scope too
            await ks.record_connection("ghost", key.key, frozenset({"a"}), "p", "1.1.1.1", NOW)
        assert await ks.connection("ghost") is None


async def test_verified_lookup_reads_the_key_without_its_secret(keystore_target: str) -> None:
    async with KeyStore.open(keystore_target) as ks:
        await ks.add_device("a")
        await ks.add_device("b")
        key, _ = await ks.create_key(device_ids=["a"])
        found = await ks.verified_lookup(key.key, "a")
        assert found.key is not None and (found.device_in_scope, found.scope) == (True, {"a"})
        assert (await ks.verified_lookup(key.key, "b")).device_in_scope is False
        assert (await ks.verified_lookup("0" * 32, "a")).key is None


async def test_keys_are_found_by_expiry(keystore_target: str) -> None:
    async with KeyStore.open(keystore_target) as ks:
        soon, _ = await ks.create_key(expires_at=NOW + timedelta(seconds=10))
        await ks.create_key(expires_at=NOW + timedelta(hours=1))
        await ks.create_key()
        assert await ks.keys_expiring(NOW, NOW + timedelta(seconds=10)) == [soon.key]
        assert await ks.keys_expiring(NOW + timedelta(seconds=10), NOW + timedelta(minutes=1)) \
            == []


async def test_pruning_keeps_the_scopes_connections_refer_to(keystore_target: str) -> None:
    async with KeyStore.open(keystore_target) as ks:
        await ks.add_device("a")
        await ks.add_device("b")
        key, _ = await ks.create_key(device_ids=["a", "b"])
        await ks.record_connection("a", key.key, frozenset({"a"}), "p", "1.1.1.1", NOW)
        await ks.record_connection("b", key.key, frozenset({"a", "b"}), "p", "1.1.1.1", NOW)
        await ks.record_connection("b", key.key, frozenset({"b"}), "p", "1.1.1.1", NOW)
        assert await ks.prune_connections(NOW) == 0  # not older than the cut-off
        assert await ks.prune_connections(NOW + timedelta(days=1)) == 1  # {"a", "b"}
        assert await ks.backend.scope_devices(scope_digest(frozenset({"a", "b"}))) is None
        assert await ks.backend.scope_devices(scope_digest(frozenset({"b"}))) == {"b"}


async def test_reconnecting_under_the_same_grant_writes_nothing(keystore_target: str) -> None:
    async with KeyStore.open(keystore_target) as ks:
        await ks.add_device("a")
        key, _ = await ks.create_key(device_ids=["a"])
        first, _ = await ks.record_connection("a", key.key, frozenset({"a"}), "p", "1.1.1.1", NOW)
        marker = await ks.change_marker()
        later = NOW + timedelta(hours=1)
        same, previous = await ks.record_connection("a", key.key, frozenset({"a"}), "p",
                                                    "1.1.1.1", later)
        assert same == previous == first and same.created_at == NOW
        assert await ks.change_marker() == marker  # no commit at all


async def test_a_scope_pruned_meanwhile_is_stored_again(keystore_target: str) -> None:
    path = keystore_target
    async with KeyStore.open(path) as ks, KeyStore.open(path) as other:
        await ks.add_device("a")
        await ks.add_device("b")
        key, _ = await ks.create_key(device_ids=["a", "b"])
        scope = frozenset({"a", "b"})
        await ks.record_connection("a", key.key, scope, "p", "1.1.1.1", NOW)
        await other.record_connection("a", key.key, frozenset({"a"}), "p", "1.1.1.1", NOW)
        assert await other.prune_connections(NOW + timedelta(days=2)) == 1  # {"a", "b"}
        # This process saw {"a", "b"} stored: it sends the list again only when told.
        snapshot, _ = await ks.record_connection("b", key.key, scope, "p", "1.1.1.1", NOW)
        assert await other.connection_scope(snapshot) == scope


async def test_a_credential_check_written_by_one_replica_is_read_by_another(
    keystore_target: str,
) -> None:
    async with KeyStore.open(keystore_target) as first, \
            KeyStore.open(keystore_target) as second:
        await first.add_device("a")
        one, _ = await first.create_key()
        two, _ = await first.create_key()
        assert await second.credential_check("a") is None
        await first.record_credential_check("a", one.key, NOW)
        check = await second.credential_check("a")
        assert check is not None and (check.key, check.checked_at) == (one.key, NOW)
        later = NOW + timedelta(seconds=3)
        await first.record_credential_check("a", two.key, later)  # one row per client id
        check = await second.credential_check("a")
        assert check is not None and (check.key, check.checked_at) == (two.key, later)


async def test_credential_checks_go_with_their_key_and_their_device(
    keystore_target: str,
) -> None:
    async with KeyStore.open(keystore_target) as ks:
        for device in ("a", "b"):
            await ks.add_device(device)
        key, _ = await ks.create_key()
        await ks.record_credential_check("ghost", key.key, NOW)  # no device: not kept
        assert await ks.credential_check("ghost") is None
        for device in ("a", "b"):
            await ks.record_credential_check(device, key.key, NOW)
        await ks.remove_devices(["a"])
        assert await ks.credential_check("a") is None
        await ks.delete_keys([key.key])
        assert await ks.credential_check("b") is None
