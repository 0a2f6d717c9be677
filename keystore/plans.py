"""What a write will change, worked out in Python before any SQL runs for it.

keystore.sql calls these with what it read inside its transaction, so that the rules
(what an upsert rewrites, which tags an untag removes, how a key row is stored, the
limits) stand apart from the statements that carry them out.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from keystore import credentials
from keystore.backend import UntagSpec
from keystore.errors import ConflictError, LimitError, NotFoundError
from keystore.keyspec import KeySpec
from keystore.models import AccessKey, Device, KeyStatus, Tag
from keystore.rows import from_micros, now_micros, to_micros


@dataclass(slots=True)
class UpsertPlan:
    """Rows to write for one batch of an upsert: only the differences."""

    new_devices: list[tuple[str, str | None, int, int]] = field(default_factory=list)
    changed: list[tuple[str | None, int, str]] = field(default_factory=list)  # name, at, id
    add_tags: list[tuple[str, str, str]] = field(default_factory=list)
    drop_tags: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def touched(self) -> int:
        return len(self.new_devices) + len(self.changed)


def plan_upsert(batch: Sequence[str], wanted: Mapping[str, tuple[str | None, frozenset[Tag]]],
                names: Mapping[str, str | None], tags: Mapping[str, set[Tag]],
                now: int) -> UpsertPlan:
    """Diff the wanted devices against the stored ``names`` and ``tags`` (of the ids that
    exist in the application)."""
    plan = UpsertPlan()
    for dev_id in batch:
        name, want_tags = wanted[dev_id]
        if dev_id not in names:
            plan.new_devices.append((dev_id, name, now, now))
            plan.add_tags.extend((dev_id, k, v) for k, v in want_tags)
            continue
        have = tags[dev_id]
        if names[dev_id] == name and have == want_tags:
            continue
        plan.changed.append((name, now, dev_id))
        plan.add_tags.extend((dev_id, k, v) for k, v in want_tags - have)
        plan.drop_tags.extend((dev_id, k, v) for k, v in have - want_tags)
    return plan


def check_new_device(device_id: str, owner: str | None, app_id: str) -> None:
    """A device id is new, unless ``owner`` (its application) says it exists."""
    if owner is not None:
        where = "" if owner == app_id else " in another application"
        raise ConflictError(f"device {device_id!r} already exists{where}")


def existing_devices(app_id: str, devices: Iterable[Sequence[Any]],
                     tag_rows: Iterable[Sequence[Any]]
                     ) -> tuple[dict[str, str | None], dict[str, set[Tag]]]:
    """(names, tags) of stored devices from rows (id, name, app_id) and (id, key, value);
    a device of another application is a conflict."""
    names: dict[str, str | None] = {}
    tags: dict[str, set[Tag]] = {}
    for dev_id, name, owner in devices:
        if owner != app_id:
            raise ConflictError(f"device {dev_id!r} exists in another application")
        names[dev_id] = name
        tags[dev_id] = set()
    for dev_id, k, v in tag_rows:
        tags[dev_id].add((k, v))
    return names, tags


@dataclass(frozen=True, slots=True)
class DeviceEdit:
    """What change_device writes: a new name (or not), tags to drop and to add."""

    rename: bool
    drop: list[tuple[str, str, str]]
    add: list[tuple[str, str, str]]

    @property
    def touched(self) -> bool:
        return self.rename or bool(self.drop or self.add)


def device_edit(before: Device, name: Any, tags: tuple[Tag, ...] | None) -> DeviceEdit:
    """``name``: ``...`` leaves it; ``tags``: None leaves them, else the whole new set."""
    rename = name is not ... and name != before.name
    if tags is None or set(tags) == set(before.tags):
        return DeviceEdit(rename, [], [])
    return DeviceEdit(rename, [(before.id, k, v) for k, v in set(before.tags) - set(tags)],
                      [(before.id, k, v) for k, v in set(tags) - set(before.tags)])


def check_limit(noun: str, app_name: str, limit: int, existing: int, adding: int) -> None:
    """An application's limit of ``noun``s (keys, devices; 0: none) holds after
    ``adding`` more to the ``existing`` ones."""
    if limit and existing + adding > limit:
        raise LimitError(f"{noun} limit of {limit} reached in application {app_name!r}: "
                         f"it holds {existing}, cannot add {adding} more")


def doomed_tags(device: Device, specs: list[UntagSpec]) -> set[Tag]:
    """The tags an untag removes; a spec matching none of them is an error."""
    doomed: set[Tag] = set()
    for tag_key, tag_value, spec in specs:
        hits = {t for t in device.tags
                if t[0] == tag_key and (tag_value is None or t[1] == tag_value)}
        if not hits:
            raise NotFoundError(f"device {device.id!r} has no tag matching {spec!r}")
        doomed |= hits
    return doomed


@dataclass(slots=True)
class KeyRows:
    keys: list[tuple[Any, ...]] = field(default_factory=list)  # in KEY_INSERT_COLUMNS order
    device_ids: list[tuple[str, str]] = field(default_factory=list)
    tags: list[tuple[str, str, str]] = field(default_factory=list)
    created: dict[str, AccessKey] = field(default_factory=dict)


KEY_INSERT_COLUMNS = ("key", "salt", "secret_hash", "name", "description", "status",
                      "expires_at", "all_devices", "address_mode", "addresses", "topic_mode",
                      "pub_topics", "sub_topics", "created_at", "updated_at", "app_id", "id")


def key_rows(app_id: str, specs: list[KeySpec], minted: list[tuple[str, str]],
             now: int) -> KeyRows:
    """Rows for validated new keys, and the keys as stored, built here rather than read
    back (reading 100k keys back would cost more than inserting them)."""
    stamp = from_micros(now)
    assert stamp is not None
    out = KeyRows()
    for spec, (key, secret) in zip(specs, minted, strict=True):
        salt, digest = credentials.hash_secret(secret)
        key_id = credentials.new_object_id()
        out.keys.append((
            key, salt, digest, spec.name, spec.description, KeyStatus.ACTIVE.value,
            to_micros(spec.expires_at) if spec.expires_at else None, int(spec.all_devices),
            spec.address_mode.value, json.dumps(spec.addresses), spec.topic_mode.value,
            json.dumps(spec.pub_topics), json.dumps(spec.sub_topics), now, now, app_id, key_id,
        ))
        out.device_ids.extend((key, d) for d in spec.device_ids)
        out.tags.extend((key, k, v) for k, v in spec.device_tags)
        out.created[key] = AccessKey(
            key=key,
            name=spec.name,
            description=spec.description,
            status=KeyStatus.ACTIVE,
            expires_at=spec.expires_at,
            all_devices=spec.all_devices,
            device_ids=tuple(sorted(spec.device_ids)),  # as row_to_key returns them
            device_tags=spec.device_tags,
            address_mode=spec.address_mode,
            addresses=spec.addresses,
            topic_mode=spec.topic_mode,
            pub_topics=spec.pub_topics,
            sub_topics=spec.sub_topics,
            created_at=stamp,
            updated_at=stamp,
            app_id=app_id,
            id=key_id,
        )
    return out


# Column each update_key field writes to, and how its value is stored.
KEY_UPDATE_COLUMNS: dict[str, tuple[str, Any]] = {
    "name": ("name", lambda v: v),
    "description": ("description", lambda v: v),
    "expires_at": ("expires_at", lambda v: to_micros(v) if v is not None else None),
    "address_mode": ("address_mode", lambda v: v.value),
    "addresses": ("addresses", json.dumps),
    "topic_mode": ("topic_mode", lambda v: v.value),
    "pub_topics": ("pub_topics", json.dumps),
    "sub_topics": ("sub_topics", json.dumps),
}


def key_changes(changes: dict[str, Any]) -> list[tuple[str, Any]]:
    """(column, stored value) for each changed field of update_key, updated_at last."""
    out = []
    for name, value in changes.items():
        column, encode = KEY_UPDATE_COLUMNS[name]
        out.append((column, encode(value)))
    out.append(("updated_at", now_micros()))
    return out
