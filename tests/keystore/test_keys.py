"""Access keys on each backend (a real SQLite file, a real PostgreSQL database): creation
rules, secrets, authentication, updates."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keystore import (
    UNSET,
    AccessKey,
    AddressMode,
    ConflictError,
    KeyStatus,
    KeyStore,
    LimitError,
    NotFoundError,
    TopicMode,
    ValidationError,
    credentials,
)
from tests.support.dbdump import dump, dump_text


@pytest.fixture
async def ks(keystore_target: str) -> AsyncIterator[KeyStore]:
    async with KeyStore.open(keystore_target) as store:
        await store.upsert_devices([("d1", None, ["floor=1"]), ("d2", None, ["floor=2"])])
        yield store


# --- creation -----------------------------------------------------------------------------


async def test_create_key_defaults(ks: KeyStore) -> None:
    key, secret = await ks.create_key(name="k", description="desc")
    assert len(key.key) == 32 and set(key.key) <= set("0123456789abcdef")
    assert len(secret) >= 43  # token_urlsafe(32): 256 bits
    assert key.status is KeyStatus.ACTIVE and key.all_devices
    assert key.address_mode is AddressMode.ALL and key.topic_mode is TopicMode.NONE
    assert key.created_at == key.updated_at and key.created_at.tzinfo is UTC
    assert await ks.get_key(key.key) == key
    assert await ks.list_keys({"name": "k"}) == [key]
    assert await ks.list_keys({"name": "nope"}) == []
    assert secret not in repr(key) and "secret" not in repr(key)


async def test_create_key_normalises_and_accepts_mode_strings(ks: KeyStore) -> None:
    key, _ = await ks.create_key(
        device_tags=["floor=1", ("floor", "1")],
        address_mode="whitelist",
        addresses=["10.0.0.1", "2001:db8::/32"],
        topic_mode="only",
        pub_topics=["a/b", "a/b"],
        sub_topics=["#"],
        expires_at="2030-01-01T00:00:00+02:00",
    )
    assert not key.all_devices and key.device_tags == (("floor", "1"),)
    assert key.addresses == ("10.0.0.1/32", "2001:db8::/32")
    assert key.address_mode is AddressMode.ONLY
    assert key.pub_topics == ("a/b",) and key.sub_topics == ("#",)
    assert key.expires_at == datetime(2029, 12, 31, 22, tzinfo=UTC)


async def test_secret_is_never_stored(ks: KeyStore, keystore_target: str) -> None:
    created = [await ks.create_key(name=f"k{i}") for i in range(5)]
    created += await ks.create_keys([{"device_ids": ["d1"]} for _ in range(20)])
    raw = dump_text(keystore_target)
    for key, secret in created:
        assert key.key.encode() in raw  # sanity: we are reading the right bytes
        assert secret.encode() not in raw
        assert secret[:16].encode() not in raw


async def test_connect_lookup_checks_the_secret(ks: KeyStore) -> None:
    key, secret = await ks.create_key(name="k", device_ids=["d1"])

    async def found(key_id: object, given: object) -> AccessKey | None:
        return (await ks.connect_lookup(key_id, given, "d1")).key  # type: ignore[arg-type]

    assert await found(key.key, secret) == key
    assert await found(key.key, secret + "x") is None
    assert await found(key.key, "") is None
    assert await found("0" * 32, secret) is None
    assert await found(key.key[:8], secret) is None  # no prefix matching here
    assert await found(key.key, "\udcff") is None  # malformed text never raises
    assert await found(None, secret) is None


async def test_connect_lookup_returns_inactive_and_expired_keys(ks: KeyStore) -> None:
    """Status and expiry are the broker's checks (they give a different CONNACK code)."""
    key, secret = await ks.create_key(expires_at=datetime.now(UTC) - timedelta(days=1))
    await ks.set_status([key.key], "inactive")
    found = (await ks.connect_lookup(key.key, secret, "nobody")).key
    assert found is not None and found.status is KeyStatus.INACTIVE
    assert found.is_expired(datetime.now(UTC))


async def test_unknown_key_costs_one_hash_like_a_wrong_secret(
    ks: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, _ = await ks.create_key()
    calls: list[bytes] = []
    real = credentials._digest

    def counting(salt: bytes, secret: str) -> bytes:
        calls.append(salt)
        return real(salt, secret)

    monkeypatch.setattr(credentials, "_digest", counting)
    assert (await ks.connect_lookup(key.key, "wrong", "d1")).key is None
    assert (await ks.connect_lookup("f" * 32, "wrong", "d1")).key is None
    assert len(calls) == 2 and calls[1] == credentials._DUMMY_SALT


async def test_unknown_device_id_in_restriction(ks: KeyStore, keystore_target: str) -> None:
    before = dump(keystore_target)
    with pytest.raises(ValidationError, match="unknown device id 'ghost'"):
        await ks.create_key(device_ids=["d1", "ghost"])
    assert dump(keystore_target) == before


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"device_ids": ["bad/id"]}, "invalid device id 'bad/id'"),
        ({"device_tags": ["floor"]}, "invalid tag 'floor'"),
        ({"address_mode": "only", "addresses": ["10.0.0.0/33"]}, "invalid CIDR '10.0.0.0/33'"),
        ({"address_mode": "only", "addresses": ["nope"]}, "invalid address 'nope'"),
        ({"address_mode": "only", "addresses": "10.0.0.1"}, "expected a list"),
        ({"topic_mode": "only", "pub_topics": ["a/#/b"]}, "invalid topic filter 'a/#/b'"),
        ({"topic_mode": "only", "sub_topics": ["a+"]}, "invalid topic filter 'a\\+'"),
        ({"topic_mode": "only", "pub_topics": ["a\x00"]}, "contains NUL"),
        ({"topic_mode": "only", "pub_topics": ["a" * 65536]}, "longer than 65535 bytes"),
        ({"topic_mode": "only", "sub_topics": ["$SYS/x"]}, "'\\$SYS/x'.*reserved"),
        ({"topic_mode": "only", "pub_topics": ["losant/x"]}, "'losant/x'.*device prefix"),
        ({"address_mode": "sometimes"}, "invalid address mode 'sometimes'"),
        ({"addresses": ["10.0.0.1"]}, "address mode is 'all'"),
        ({"address_mode": "only"}, "needs at least one address"),
        ({"pub_topics": ["a"]}, "topic mode is 'none'"),
        ({"topic_mode": "except"}, "needs at least one publish or subscribe filter"),
        ({"all_devices": True, "device_ids": ["d1"]}, "cannot also list device ids"),
        ({"all_devices": False}, "needs at least one device id or tag"),
        ({"name": " padded"}, "invalid key name ' padded'"),
        ({"expires_at": datetime(2030, 1, 1)}, "needs a timezone"),
    ],
)
async def test_invalid_key_writes_nothing(
    ks: KeyStore, keystore_target: str, fields: dict[str, Any], message: str
) -> None:
    before = dump(keystore_target)
    with pytest.raises(ValidationError, match=message) as info:
        await ks.create_key(**fields)
    assert "\n" not in str(info.value)
    assert dump(keystore_target) == before


async def test_custom_device_prefix_is_protected(tmp_path: Path) -> None:
    async with KeyStore.open(tmp_path / "p.db", device_prefix="dev") as store:
        with pytest.raises(ValidationError, match="device prefix 'dev/'"):
            await store.create_key(topic_mode="only", pub_topics=["dev/x"])
        key, _ = await store.create_key(topic_mode="only", pub_topics=["losant/x"])
        assert key.pub_topics == ("losant/x",)


async def test_duplicate_name_is_a_conflict(ks: KeyStore, keystore_target: str) -> None:
    await ks.create_key(name="gateway")
    before = dump(keystore_target)
    with pytest.raises(ConflictError, match="key name 'gateway' is already used"):
        await ks.create_key(name="gateway")
    with pytest.raises(ConflictError, match="key name 'twin' is given to more than one"):
        await ks.create_keys([{"name": "twin"}, {"name": "twin"}])
    with pytest.raises(ConflictError, match="'gateway'"):
        await ks.create_keys([{"name": "new"}, {"name": "gateway"}])
    assert dump(keystore_target) == before


async def test_max_keys(keystore_target: str) -> None:
    path = keystore_target
    async with KeyStore.open(path, max_keys=2) as store:
        await store.create_key()
        before = dump(path)
        with pytest.raises(LimitError, match="key limit of 2 reached"):
            await store.create_keys([{}, {}])
        assert dump(path) == before
        await store.create_key()
        with pytest.raises(LimitError, match="key limit of 2"):
            await store.create_key()
        assert await store.count_keys() == 2


async def test_create_keys_is_all_or_nothing(ks: KeyStore, keystore_target: str) -> None:
    before = dump(keystore_target)
    with pytest.raises(ValidationError, match="unknown access key field 'colour'"):
        await ks.create_keys([{"name": "a"}, {"colour": "red"}])
    with pytest.raises(ValidationError, match="unknown device id 'd9'"):
        await ks.create_keys([{"name": "a"}, {"device_ids": ["d9"]}])
    assert dump(keystore_target) == before
    made = await ks.create_keys([{"name": f"k{i}", "device_ids": ["d1"]} for i in range(30)])
    assert [k.name for k, _ in made] == [f"k{i}" for i in range(30)]
    assert len({s for _, s in made}) == 30
    assert await ks.count_keys() == 30


# --- lookup by prefix ---------------------------------------------------------------------


async def test_get_key_by_prefix(ks: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    fixed = iter(["abcdef0111111111111111111111111a", "abcdef0122222222222222222222222b"])
    monkeypatch.setattr(credentials, "new_key", lambda: next(fixed))
    first, _ = await ks.create_key()
    second, _ = await ks.create_key()
    assert (await ks.get_key("abcdef011")).key == first.key
    assert (await ks.get_key("ABCDEF012")).key == second.key  # hex is case-insensitive
    assert (await ks.get_key(first.key)).key == first.key
    with pytest.raises(NotFoundError, match="ambiguous"):
        await ks.get_key("abcdef01")
    with pytest.raises(NotFoundError, match="'abcdef0' .*at least 8 characters"):
        await ks.get_key("abcdef0")  # too short for a prefix, and no key is named so
    with pytest.raises(NotFoundError, match="no access key 'ffffffff'"):
        await ks.get_key("ffffffff")
    with pytest.raises(NotFoundError, match="no access key"):
        await ks.get_key("abcdef01%")  # not hex: exact match only, never a pattern


# --- lookup by name, id or prefix -----------------------------------------------------------


async def test_every_operation_names_a_key_by_key_id_prefix_or_name(ks: KeyStore) -> None:
    gateway, _ = await ks.create_key(name="lyon-gw")
    ci, _ = await ks.create_key(name="ci")  # shorter than a prefix may be: still a name
    assert (await ks.get_key("lyon-gw")).key == gateway.key
    assert (await ks.get_key(gateway.id)).key == gateway.key
    assert (await ks.get_key(gateway.key.upper())).key == gateway.key
    assert (await ks.get_key(gateway.key[:9])).key == gateway.key
    assert (await ks.get_key("ci")).key == ci.key
    assert (await ks.update_key("lyon-gw", description="Lyon")).description == "Lyon"
    (changed,) = await ks.set_status(["lyon-gw", gateway.id], KeyStatus.INACTIVE)
    assert changed.key == gateway.key and changed.status is KeyStatus.INACTIVE
    assert await ks.delete_keys(["ci"]) == [ci.key]
    with pytest.raises(NotFoundError, match="no access key 'ci'"):
        await ks.get_key("ci")
    with pytest.raises(NotFoundError, match="no access key 'Lyon-gw'"):
        await ks.get_key("Lyon-gw")  # names are exact


async def test_key_names_are_looked_up_in_their_application(ks: KeyStore) -> None:
    await ks.create_app("plant-2")
    here, _ = await ks.create_key(name="gw")
    there, _ = await ks.create_key(name="gw", app="plant-2")
    assert (await ks.get_key("gw")).key == here.key
    assert (await ks.get_key("gw", app="plant-2")).key == there.key
    with pytest.raises(NotFoundError, match="no access key"):
        await ks.get_key(there.id)  # another application's key by id
    with pytest.raises(NotFoundError, match="no access key"):
        await ks.set_status([there.key[:10]], KeyStatus.INACTIVE)
    assert (await ks.get_key("gw", app="plant-2")).status is KeyStatus.ACTIVE


async def test_an_ambiguous_key_reference_is_refused_listing_the_candidates(
        ks: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    fixed = iter(["abcdef0111111111111111111111111a", "abcdef0122222222222222222222222b",
                  "0123456789abcdef0123456789abcdef"])
    monkeypatch.setattr(credentials, "new_key", lambda: next(fixed))
    first, _ = await ks.create_key(name="north")
    second, _ = await ks.create_key()
    named_like_a_prefix, _ = await ks.create_key(name="abcdef01")
    with pytest.raises(NotFoundError) as refused:
        await ks.delete_keys(["abcdef01"])  # a name, and the prefix of two other keys
    message = str(refused.value)
    assert "\n" not in message and "ambiguous" in message
    for candidate in (f"{first.key} (north)", second.key,
                      f"{named_like_a_prefix.key} (abcdef01)"):
        assert candidate in message
    assert await ks.count_keys() == 3  # nothing deleted
    assert (await ks.get_key(named_like_a_prefix.key)).name == "abcdef01"  # whole: no doubt


async def test_a_whole_id_wins_over_a_name(ks: KeyStore) -> None:
    target, _ = await ks.create_key()
    impostor, _ = await ks.create_key(name=target.id)
    assert (await ks.get_key(target.id)).key == target.key
    assert (await ks.get_key(impostor.key)).key == impostor.key
    other = await ks.create_app("other")
    await ks.create_app(other.id)  # an application named like another's id
    assert (await ks.app(other.id)).name == "other"


# --- updates ----------------------------------------------------------------------------


async def test_update_key_changes_only_given_fields(ks: KeyStore) -> None:
    key, secret = await ks.create_key(
        name="n", description="d", device_ids=["d1"], expires_at="2030-01-01T00:00:00Z"
    )
    updated = await ks.update_key(
        key.key[:10],
        description=None,
        address_mode="except",
        addresses=["10.0.0.0/8"],
        topic_mode=TopicMode.ONLY,
        sub_topics=["status/#"],
    )
    assert updated.name == "n" and updated.description is None
    assert updated.expires_at == key.expires_at
    assert updated.address_mode is AddressMode.EXCEPT and updated.addresses == ("10.0.0.0/8",)
    assert updated.sub_topics == ("status/#",) and updated.pub_topics == ()
    assert updated.updated_at > key.updated_at and updated.created_at == key.created_at
    assert updated.device_ids == ("d1",)
    cleared = await ks.update_key(key.key, name=None, expires_at=None, description=UNSET)
    assert cleared.name is None and cleared.expires_at is None
    assert (await ks.connect_lookup(key.key, secret, "d1")).key == cleared  # secret unchanged


@pytest.mark.parametrize(
    "restriction",
    [
        {"device_ids": ["d2"]},
        {"device_tags": ["floor=2"]},
        {"all_devices": True},
        {"device_ids": ["d1"]},
    ],
)
async def test_device_restriction_is_immutable(
    ks: KeyStore, keystore_target: str, restriction: dict[str, Any]
) -> None:
    key, _ = await ks.create_key(device_ids=["d1"])
    before = dump(keystore_target)
    with pytest.raises(ConflictError) as info:
        await ks.update_key(key.key, name="x", **restriction)
    assert str(info.value) == (
        f"device restriction of key {key.key[:8]} cannot be changed after creation; "
        "create a new key"
    )
    assert dump(keystore_target) == before


async def test_invalid_update_writes_nothing(ks: KeyStore, keystore_target: str) -> None:
    await ks.create_key(name="taken")
    key, _ = await ks.create_key(name="mine", topic_mode="only", pub_topics=["a"])
    before = dump(keystore_target)
    with pytest.raises(ConflictError, match="key name 'taken' is already used"):
        await ks.update_key(key.key, name="taken", description="new")
    with pytest.raises(ValidationError, match="'losant/x'"):
        await ks.update_key(key.key, description="new", pub_topics=["losant/x"])
    with pytest.raises(ValidationError, match="topic mode is 'all'"):
        await ks.update_key(key.key, topic_mode="all")  # lists would be silently ignored
    with pytest.raises(NotFoundError):
        await ks.update_key("0" * 32, description="new")
    assert dump(keystore_target) == before
    assert (await ks.update_key(key.key, name="mine")).name == "mine"  # own name is fine
    switched = await ks.update_key(key.key, topic_mode="all", pub_topics=[])
    assert switched.topic_mode is TopicMode.ALL and switched.pub_topics == ()


# --- status and deletion -----------------------------------------------------------------


async def test_set_status(ks: KeyStore) -> None:
    a, _ = await ks.create_key()
    b, _ = await ks.create_key()
    changed = await ks.set_status([a.key, b.key[:12]], KeyStatus.INACTIVE)
    assert [k.key for k in changed] == [a.key, b.key]
    assert all(k.status is KeyStatus.INACTIVE for k in changed)
    with pytest.raises(NotFoundError):
        await ks.set_status([a.key, "0" * 32], "active")
    assert (await ks.get_key(a.key)).status is KeyStatus.INACTIVE
    with pytest.raises(ValidationError, match="invalid status 'paused'"):
        await ks.set_status([a.key], "paused")
    assert (await ks.set_status([a.key], "active"))[0].status is KeyStatus.ACTIVE


async def test_delete_keys_all_or_nothing(ks: KeyStore, keystore_target: str) -> None:
    a, _ = await ks.create_key(device_ids=["d1"], device_tags=["floor=1"])
    b, _ = await ks.create_key()
    with pytest.raises(NotFoundError, match="no access key"):
        await ks.delete_keys([a.key, "0" * 32])
    assert await ks.count_keys() == 2
    assert await ks.delete_keys([a.key[:8], b.key]) == [a.key, b.key]
    assert await ks.count_keys() == 0
    tables = dump(keystore_target)
    assert tables["key_devices"] == [] and tables["key_tags"] == []  # restriction rows cascade
    assert (await ks.connect_lookup(a.key, "x", "d1")).key is None


async def test_mark_keys_used(ks: KeyStore) -> None:
    key, _ = await ks.create_key()
    when = datetime(2031, 2, 3, 4, 5, 6, 7000, tzinfo=UTC)
    await ks.mark_keys_used([key.key, "0" * 32], when)
    assert (await ks.get_key(key.key)).last_used == when


async def test_keys_by_id_for_polling(ks: KeyStore) -> None:
    a, _ = await ks.create_key()
    found = await ks.keys_by_id([a.key, "0" * 32])
    assert list(found) == [a.key] and found[a.key] == a


def test_keys_are_unique_enough() -> None:
    keys = {credentials.new_key() for _ in range(1000)}
    secrets_ = {credentials.new_secret() for _ in range(1000)}
    assert len(keys) == 1000 and len(secrets_) == 1000
    assert all(len(k) == 32 for k in itertools.islice(keys, 10))
