"""Devices: the keystore operations on devices, validated before the backend is asked."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from keystore.backend import Backend, UntagSpec
from keystore.errors import ValidationError
from keystore.models import Device, Tag
from keystore.validation import (
    as_str_list,
    dedupe,
    parse_tag,
    validate_device_id,
    validate_key_name,
    validate_tags,
)

log = logging.getLogger(__name__)


class DeviceOps:
    backend: Backend

    async def add_device(
        self, device_id: str, *, name: str | None = None, tags: Iterable[Tag | str] = ()
    ) -> Device:
        return await self.backend.insert_device(
            validate_device_id(device_id), validate_key_name(name, "device name"),
            validate_tags(tags))

    async def upsert_devices(
        self, items: Iterable[tuple[str, str | None, Iterable[Tag | str]]]
    ) -> int:
        """Insert new devices and bring existing ones to the given name and tag set.
        Idempotent: re-running the same seed changes nothing. Returns how many devices
        were created or changed."""
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
        touched = await self.backend.upsert_devices(wanted)
        log.info("upserted %d devices (%d created or changed)", len(wanted), touched)
        return touched

    async def get_device(self, device_id: str) -> Device:
        return await self.backend.load_device(device_id)

    async def list_devices(self) -> list[Device]:
        return await self.backend.all_devices()

    async def tag_device(self, device_id: str, tags: Iterable[Tag | str]) -> Device:
        return await self.backend.add_tags(device_id, validate_tags(tags))

    async def untag_device(self, device_id: str, specs: Iterable[str]) -> Device:
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
        return await self.backend.remove_tags(device_id, parsed)

    async def remove_devices(self, ids: Iterable[str]) -> list[str]:
        """Remove devices (all or, if one is missing, none); their sessions are
        disconnected by a running daemon (change feed)."""
        wanted = dedupe(as_str_list(ids, "device ids"))
        await self.backend.delete_devices(wanted)
        log.info("removed %d devices", len(wanted))
        return list(wanted)

    async def device_exists(self, device_id: str) -> bool:
        return await self.backend.device_exists(device_id)

    async def count_devices(self) -> int:
        return await self.backend.count_devices()
