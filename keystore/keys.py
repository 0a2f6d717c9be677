"""Access keys: create (the secret exists only in the return value), read, change,
delete; every input validated before the backend is asked."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import datetime
from enum import Enum
from typing import Any, Literal

from keystore import credentials
from keystore.apps import AppOps
from keystore.errors import ConflictError, ValidationError
from keystore.keyspec import (
    KeySpec,
    check_modes,
    validate_addresses,
    validate_key_spec,
    validate_topic_list,
)
from keystore.models import AccessKey, AddressMode, KeyStatus, Tag, TopicMode
from keystore.validation import (
    MIN_PREFIX_LEN,
    as_str_list,
    check_page,
    coerce_address_mode,
    coerce_status,
    coerce_topic_mode,
    coerce_utc,
    dedupe,
    validate_description,
    validate_key_name,
)

log = logging.getLogger(__name__)


class _Unset(Enum):
    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset.UNSET
"""update_key default meaning 'leave this field alone' (None clears a field)."""
Unset = Literal[_Unset.UNSET]


def short(key: str) -> str:
    """How a key is named in messages and logs: its first 8 characters."""
    return key[:MIN_PREFIX_LEN]


class KeyOps(AppOps):
    device_prefix: str

    async def create_key(
        self,
        *,
        name: str | None = None,
        description: str | None = None,
        device_ids: Iterable[str] = (),
        device_tags: Iterable[Tag | str] = (),
        all_devices: bool | None = None,
        address_mode: AddressMode | str = AddressMode.ALL,
        addresses: Iterable[str] = (),
        topic_mode: TopicMode | str = TopicMode.NONE,
        pub_topics: Iterable[str] = (),
        sub_topics: Iterable[str] = (),
        expires_at: datetime | str | None = None,
        app: str | None = None,
    ) -> tuple[AccessKey, str]:
        """Create one key; returns (key, secret). This is the only time the secret exists:
        only its salted hash is stored. all_devices=None means True when neither
        device_ids nor device_tags is given."""
        (created,) = await self.create_keys(
            [
                {
                    "name": name,
                    "description": description,
                    "device_ids": device_ids,
                    "device_tags": device_tags,
                    "all_devices": all_devices,
                    "address_mode": address_mode,
                    "addresses": addresses,
                    "topic_mode": topic_mode,
                    "pub_topics": pub_topics,
                    "sub_topics": sub_topics,
                    "expires_at": expires_at,
                }
            ],
            app=app,
        )
        return created

    async def create_keys(self, specs: Iterable[Mapping[str, Any]], *,
                          app: str | None = None) -> list[tuple[AccessKey, str]]:
        """Create many keys in one transaction; every spec is validated before any write.
        The application's key limit applies (``max_keys``, else the keystore's)."""
        validated: list[KeySpec] = []
        for index, spec in enumerate(specs):
            if not isinstance(spec, Mapping):
                raise ValidationError(f"invalid key spec #{index + 1} {spec!r}: expected a mapping")
            validated.append(validate_key_spec(spec, self.device_prefix))
        names = [s.name for s in validated if s.name is not None]
        repeated = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if repeated is not None:
            raise ConflictError(f"key name {repeated!r} is given to more than one new key")
        minted = [(credentials.new_key(), credentials.new_secret()) for _ in validated]
        owner = await self.app(app)
        loaded = await self.backend.insert_keys(owner.id, validated, minted,
                                                self.key_limit(owner))
        log.info("created %d access keys", len(minted))
        return [(loaded[key], secret) for key, secret in minted]

    async def get_key(self, ref: str, *, app: str | None = None) -> AccessKey:
        """The application's key that ``ref`` names: its key, its id, its name, or a
        prefix of its key of at least 8 characters that no other key shares
        (keystore.lookup; every operation below that takes a key takes the same)."""
        return await self.backend.load_key((await self.app(app)).id, ref)

    async def get_key_by_id(self, key_id: str, *, app: str | None = None) -> AccessKey:
        """The application's key with this ``id`` (24 hex; the API's applicationKeyId)."""
        if not isinstance(key_id, str):
            raise ValidationError(f"invalid key id {key_id!r}: must be a string")
        return await self.backend.load_key_by_id((await self.app(app)).id, key_id)

    async def page_keys(self, query: Mapping[str, Any] | str | None = None, *,
                        sort: str = "creationDate", descending: bool = False, offset: int = 0,
                        limit: int = 100, app: str | None = None) -> tuple[list[AccessKey], int]:
        """One sorted page of the application's keys matching ``query`` (the advanced
        query of list_keys), and how many match in all."""
        check_page(offset, limit)
        return await self.backend.page_keys((await self.app(app)).id, query, sort, descending,
                                            offset, limit)

    async def keys_by_id(self, keys: Iterable[str]) -> dict[str, AccessKey]:
        """Batch lookup by full key id; missing keys are simply absent (broker polling)."""
        return await self.backend.keys_by_id(dedupe(keys))

    async def list_keys(self, query: Mapping[str, Any] | str | None = None, *,
                        app: str | None = None) -> list[AccessKey]:
        """The application's keys matching a Losant-style advanced query (keystore.query)."""
        return await self.backend.query_keys((await self.app(app)).id, query)

    async def count_keys(self, *, app: str | None = None, every_app: bool = False) -> int:
        return await self.backend.count_keys(None if every_app else (await self.app(app)).id)

    async def update_key(
        self,
        ref: str,
        *,
        name: str | None | Unset = UNSET,
        description: str | None | Unset = UNSET,
        address_mode: Any = UNSET,
        addresses: Iterable[str] | Unset = UNSET,
        topic_mode: Any = UNSET,
        pub_topics: Iterable[str] | Unset = UNSET,
        sub_topics: Iterable[str] | Unset = UNSET,
        expires_at: datetime | str | None | Unset = UNSET,
        device_ids: Any = UNSET,
        device_tags: Any = UNSET,
        all_devices: Any = UNSET,
        app: str | None = None,
    ) -> AccessKey:
        """Change the given fields (UNSET leaves one alone; None clears name, description
        or expiry). The device restriction is immutable: passing it is a ConflictError."""
        changes: dict[str, Any] = {}
        if name is not UNSET:
            changes["name"] = validate_key_name(name)
        if description is not UNSET:
            changes["description"] = validate_description(description)
        if expires_at is not UNSET:
            changes["expires_at"] = coerce_utc(expires_at, "expiration date")
        if address_mode is not UNSET:
            changes["address_mode"] = coerce_address_mode(address_mode)
        if addresses is not UNSET:
            changes["addresses"] = validate_addresses(addresses)
        if topic_mode is not UNSET:
            changes["topic_mode"] = coerce_topic_mode(topic_mode)
        if pub_topics is not UNSET:
            changes["pub_topics"] = validate_topic_list(
                pub_topics, "pub topics", self.device_prefix
            )
        if sub_topics is not UNSET:
            changes["sub_topics"] = validate_topic_list(
                sub_topics, "sub topics", self.device_prefix
            )
        restriction = (device_ids, device_tags, all_devices)

        def check(current: AccessKey) -> None:
            if any(v is not UNSET for v in restriction):
                raise ConflictError(
                    f"device restriction of key {short(current.key)} cannot be changed after "
                    "creation; create a new key"
                )
            check_modes(
                changes.get("address_mode", current.address_mode),
                changes.get("addresses", current.addresses),
                changes.get("topic_mode", current.topic_mode),
                changes.get("pub_topics", current.pub_topics),
                changes.get("sub_topics", current.sub_topics),
            )

        return await self.backend.change_key((await self.app(app)).id, ref, changes, check)

    async def set_status(self, keys: Iterable[str], status: KeyStatus | str, *,
                         app: str | None = None) -> list[AccessKey]:
        new_status = coerce_status(status)
        refs = dedupe(as_str_list(keys, "keys"))
        changed = await self.backend.set_status((await self.app(app)).id, refs, new_status)
        log.info("set %d keys %s", len(changed), new_status.value)
        return changed

    async def delete_keys(self, keys: Iterable[str], *, app: str | None = None) -> list[str]:
        refs = dedupe(as_str_list(keys, "keys"))
        deleted = await self.backend.delete_keys((await self.app(app)).id, refs)
        log.info("deleted %d keys: %s", len(deleted),
                 ", ".join(short(k) for k in deleted[:20]))
        return deleted

    async def resolve_scope(self, key: AccessKey) -> frozenset[str] | None:
        """None for an unrestricted key; else the existing devices listed by id or
        carrying any listed tag pair, as of now."""
        return None if key.all_devices else await self.backend.scope_of(key)
