"""KeyStore.connect_lookup on each backend: one round trip per CONNECT, cached scopes that
never go stale."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from keystore import KeyStore, credentials
from keystore.sqlite.dialect import SqliteDialect


async def generation(ks: KeyStore) -> int:
    return (await ks.backend.connect_row("nobody")).generation


async def test_lookup_answers_every_connect_fact(keystore_target: str) -> None:
    async with KeyStore.open(keystore_target) as ks:
        await ks.add_device("a", tags=[("site", "n")])
        await ks.add_device("b", tags=[("site", "s")])
        key, secret = await ks.create_key(device_tags=[("site", "n")])
        ok = await ks.connect_lookup(key.key, secret, "a")
        assert ok.key is not None and ok.key.key == key.key
        assert (ok.device_registered, ok.device_in_scope, ok.scope) == (True, True, frozenset("a"))
        out = await ks.connect_lookup(key.key, secret, "b")
        assert (out.device_registered, out.device_in_scope) == (True, False)
        ghost = await ks.connect_lookup(key.key, secret, "ghost")
        assert (ghost.device_registered, ghost.device_in_scope) == (False, False)
        assert (await ks.connect_lookup(key.key, secret + "x", "a")).key is None
        assert (await ks.connect_lookup("f" * 32, secret, "a")).key is None
        everything, everything_secret = await ks.create_key()
        anywhere = await ks.connect_lookup(everything.key, everything_secret, "b")
        assert (anywhere.device_in_scope, anywhere.scope) == (True, None)


async def test_unknown_key_and_wrong_secret_cost_one_hash_each(keystore_target: str,
                                                               monkeypatch: object) -> None:
    calls: list[str] = []
    real = credentials._digest

    def counting(salt: bytes, secret: str) -> bytes:
        calls.append(secret)
        return real(salt, secret)

    monkeypatch.setattr(credentials, "_digest", counting)  # type: ignore[attr-defined]
    async with KeyStore.open(keystore_target) as ks:
        await ks.add_device("a")
        key, _ = await ks.create_key()
        for name in (key.key, "0" * 32):
            calls.clear()
            assert (await ks.connect_lookup(name, "wrong", "a")).key is None
            assert calls == ["wrong"]


async def test_tag_and_device_changes_are_seen_at_the_next_lookup(keystore_target: str) -> None:
    path = keystore_target
    async with KeyStore.open(path) as daemon, KeyStore.open(path) as cli:
        await daemon.add_device("a", tags=[("site", "n")])
        key, secret = await daemon.create_key(device_tags=[("site", "n")])
        assert (await daemon.connect_lookup(key.key, secret, "a")).scope == {"a"}
        # Another connection (the CLI in another process) adds a device to the scope ...
        await cli.add_device("c", tags=[("site", "n")])
        assert (await daemon.connect_lookup(key.key, secret, "a")).scope == {"a", "c"}
        # ... untags one ...
        await cli.untag_device("a", ["site"])
        found = await daemon.connect_lookup(key.key, secret, "a")
        assert found.scope == {"c"} and not found.device_in_scope
        # ... and removes one.
        await cli.remove_devices(["c"])
        assert (await daemon.connect_lookup(key.key, secret, "c")).device_registered is False


async def test_status_writes_do_not_invalidate_the_cache(keystore_target: str) -> None:
    async with KeyStore.open(keystore_target) as ks:
        await ks.add_device("a")
        key, _ = await ks.create_key(device_ids=["a"])
        before = await generation(ks)
        await ks.set_devices_connected(["a"], True, datetime.now(UTC))
        await ks.mark_keys_used([key.key], datetime.now(UTC))
        await ks.set_status([key.key], "inactive")
        assert await generation(ks) == before
        await ks.tag_device("a", [("x", "y")])
        assert await generation(ks) > before


async def test_key_status_is_read_fresh_on_every_lookup(keystore_target: str) -> None:
    path = keystore_target
    async with KeyStore.open(path) as daemon, KeyStore.open(path) as cli:
        await daemon.add_device("a")
        key, secret = await daemon.create_key(device_ids=["a"])
        assert (await daemon.connect_lookup(key.key, secret, "a")).key.status.value == "active"
        await cli.set_status([key.key], "inactive")
        found = await daemon.connect_lookup(key.key, secret, "a")
        assert found.key is not None and found.key.status.value == "inactive"
        await cli.delete_keys([key.key])
        assert (await daemon.connect_lookup(key.key, secret, "a")).key is None


async def test_lookup_uses_the_read_only_connection_and_sees_fresh_commits(tmp_path: Path) -> None:
    async with KeyStore.open(tmp_path / "k.db") as ks:
        await ks.add_device("a")
        key, secret = await ks.create_key(device_ids=["a"])
        assert (await ks.connect_lookup(key.key, secret, "a")).key is not None
        db = ks.backend.db  # type: ignore[attr-defined]
        assert isinstance(db, SqliteDialect) and db._ro is not None  # fast path
        await ks.set_status([key.key], "inactive")  # committed on the shared connection
        found = await ks.connect_lookup(key.key, secret, "a")
        assert found.key is not None and found.key.status.value == "inactive"


async def test_a_result_read_before_a_change_is_not_cached_after_it(keystore_target: str) -> None:
    """Lookup A resolves a scope; meanwhile a tag change lands and lookup B resets the
    caches for the new generation. A's older result must not be stored in the new cache."""
    path = keystore_target
    async with KeyStore.open(path) as daemon, KeyStore.open(path) as cli:
        await daemon.add_device("a", tags=[("site", "n")])
        key, secret = await daemon.create_key(device_tags=[("site", "n")])
        backend = daemon.backend
        real = backend.scope_of
        raced = False

        async def resolve_then_race(access_key):  # type: ignore[no-untyped-def]
            nonlocal raced
            scope = await real(access_key)  # A's read: still contains "a"
            if not raced:
                raced = True
                await cli.untag_device("a", ["site"])  # the change ...
                await daemon.connect_lookup(key.key, secret, "a")  # ... and lookup B
            return scope

        backend.scope_of = resolve_then_race  # type: ignore[method-assign]
        first = await daemon.connect_lookup(key.key, secret, "a")
        assert first.device_in_scope  # A answers with what it read
        backend.scope_of = real  # type: ignore[method-assign]
        after = await daemon.connect_lookup(key.key, secret, "a")
        assert not after.device_in_scope and after.scope == frozenset()


async def test_an_id_only_keys_scope_comes_with_its_row(tmp_path: Path) -> None:
    """One read for the whole CONNECT of an id-restricted key: the listed devices that
    exist in its application come back with the key; tag keys still resolve apart."""
    async with KeyStore.open(tmp_path / "k.db") as ks:
        await ks.add_device("a")
        await ks.add_device("b", tags=["t=1"])
        await ks.create_app("other")
        await ks.add_device("c", app="other")
        ids, _ = await ks.create_key(device_ids=["a", "b"])
        tags, _ = await ks.create_key(device_tags=["t=1"])
        every, _ = await ks.create_key()
        assert (await ks.backend.connect_row(ids.key)).listed_scope == {"a", "b"}
        assert (await ks.backend.connect_row(tags.key)).listed_scope is None
        assert (await ks.backend.connect_row(every.key)).listed_scope is None
        await ks.remove_devices(["b"])
        assert (await ks.backend.connect_row(ids.key)).listed_scope == {"a"}
