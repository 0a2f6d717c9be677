"""Devices: the keystore operations on devices, validated before the backend is asked."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from keystore.apps import AppOps
from keystore.backend import UntagSpec
from keystore.errors import ValidationError
from keystore.models import Device, Tag
from keystore.validation import (
    as_str_list,
    check_page,
    dedupe,
    parse_tag,
    validate_device_id,
    validate_key_name,
    validate_tags,
)

log = logging.getLogger(__name__)


class DeviceOps(AppOps):
    async def add_device(
        self, device_id: str, *, name: str | None = None, tags: Iterable[Tag | str] = (),
        app: str | None = None,
    ) -> Device:
        """A new device; its id must not exist in any application (it is the MQTT
        client id, unique across the broker). The application's device limit applies."""
        device_id = validate_device_id(device_id)
        name = validate_key_name(name, "device name")
        pairs = validate_tags(tags)
        owner = await self.app(app)
        return await self.backend.insert_device(owner.id, device_id, name, pairs,
                                                self.device_limit(owner))

    async def upsert_devices(
        self, items: Iterable[tuple[str, str | None, Iterable[Tag | str]]],
        app: str | None = None,
    ) -> int:
        """Insert new devices and bring existing ones to the given name and tag set.
        Idempotent: re-running the same seed changes nothing. Returns how many devices
        were created or changed. The application's device limit applies to the new ones:
        past it, nothing is written."""
        wanted: dict[str, tuple[str | None, frozenset[Tag]]] = {}
        for item in items:
            try:
                device_id, name, tags = item
            except (TypeError, ValueError):
                raise ValidationError(
                    f"invalid device entry {item!r}: expected (id, name, tags)"
                ) from None
            device_id = validate_device_id(device_id)
            if device_id in wanted:
                raise ValidationError(f"device {device_id!r} appears more than once")
            wanted[device_id] = (
                validate_key_name(name, "device name"),
                frozenset(validate_tags(tags)),
            )
        owner = await self.app(app)
        touched = await self.backend.upsert_devices(owner.id, wanted, self.device_limit(owner))
        log.info("upserted %d devices (%d created or changed)", len(wanted), touched)
        return touched

    async def get_device(self, device_id: str, *, app: str | None = None) -> Device:
        return await self.backend.load_device((await self.app(app)).id, device_id)

    async def update_device(self, device_id: str, *, name: Any = ...,
                            tags: Iterable[Tag | str] | None = None,
                            app: str | None = None) -> Device:
        """Set the name (``...`` leaves it; None clears it) and/or replace the whole tag
        set (None leaves it)."""
        if name is not ...:
            name = validate_key_name(name, "device name")
        pairs = validate_tags(tags) if tags is not None else None
        return await self.backend.change_device((await self.app(app)).id, device_id, name,
                                                pairs)

    async def page_devices(self, *, name_glob: str | None = None, sort: str = "name",
                           descending: bool = False, offset: int = 0, limit: int = 100,
                           app: str | None = None) -> tuple[list[Device], int]:
        """One sorted page of the application's devices (optionally whose name matches
        the glob ``name_glob``), and how many match in all."""
        check_page(offset, limit)
        return await self.backend.page_devices((await self.app(app)).id, name_glob, sort,
                                               descending, offset, limit)

    async def list_devices(self, *, app: str | None = None) -> list[Device]:
        return await self.backend.all_devices((await self.app(app)).id)

    async def tag_device(self, device_id: str, tags: Iterable[Tag | str], *,
                         app: str | None = None) -> Device:
        pairs = validate_tags(tags)
        return await self.backend.add_tags((await self.app(app)).id, device_id, pairs)

    async def untag_device(self, device_id: str, specs: Iterable[str], *,
                           app: str | None = None) -> Device:
        """'k=v' removes that pair, 'k' every value of k. A spec matching none of the
        device's tags is an error and nothing is removed."""
        parsed: list[UntagSpec] = []
        for spec in dedupe(as_str_list(specs, "tag specs")):
            if "=" in spec:
                k, v = parse_tag(spec)
                parsed.append((k, v, spec))
            else:
                k, _ = parse_tag(f"{spec}=x")  # validate the key alone
                parsed.append((k, None, spec))
        return await self.backend.remove_tags((await self.app(app)).id, device_id, parsed)

    async def remove_devices(self, ids: Iterable[str], *, app: str | None = None) -> list[str]:
        """Remove devices (all or, if one is missing, none); their sessions are
        disconnected by a running daemon (change feed)."""
        wanted = dedupe(as_str_list(ids, "device ids"))
        await self.backend.delete_devices((await self.app(app)).id, wanted)
        log.info("removed %d devices", len(wanted))
        return list(wanted)

    async def device_exists(self, device_id: str, *, app: str | None = None) -> bool:
        """Is this a device of the application?"""
        return await self.backend.device_app(device_id) == (await self.app(app)).id

    async def count_devices(self, *, app: str | None = None, every_app: bool = False) -> int:
        return await self.backend.count_devices(None if every_app else (await self.app(app)).id)
