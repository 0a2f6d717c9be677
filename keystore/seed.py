"""Seed files: devices and keys in bulk from a TOML or JSON document (the format is
documented in broker/seed.example.toml, printed by `keybroker seed --example`).

The file's shape is checked before the first write (``read_seed``); values are validated
by the keystore, one batch (one transaction) at a time (``apply_seed``). Devices are
upserted (idempotent); a key whose ``name`` already exists is skipped, so a re-run creates
no duplicates; unnamed keys are created on every run.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, TypeVar

from keystore.errors import ValidationError
from keystore.models import AddressMode, Tag
from keystore.store import KeyStore
from keystore.validation import as_utc, parse_tag, parse_when

BATCH = 5000
APP_FIELDS = frozenset({"name", "description", "max_keys", "max_devices"})
DEVICE_FIELDS = frozenset({"id", "name", "tags", "application"})
KEY_FIELDS = frozenset(
    {
        "application",
        "name",
        "description",
        "devices",
        "tags",
        "allow_ips",
        "deny_ips",
        "topics",
        "pub",
        "sub",
        "expires",
    }
)
DeviceRow = tuple[str, str | None, tuple[Tag, ...]]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SeedPlan:
    apps: list[dict[str, Any]]  # create_app keyword arguments
    # by application name (None: the keystore's default application)
    devices: dict[str | None, list[DeviceRow]]
    keys: dict[str | None, list[dict[str, Any]]]  # create_key keyword arguments


@dataclass(slots=True)
class SeedResult:
    apps: int = 0  # created
    devices: int = 0  # in the file
    changed: int = 0  # of those, created or changed
    created: int = 0
    skipped: list[str] = field(default_factory=list)


# --- reading and checking the file --------------------------------------------------


def read_seed(path: Path) -> SeedPlan:
    """TOML or JSON, by extension (.toml / .json) or else by content."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValidationError(f"cannot read seed file {str(path)!r}: {reason}") from None
    suffix = path.suffix.lower()
    as_json = suffix == ".json" or (suffix != ".toml" and text.lstrip().startswith("{"))
    try:
        doc = json.loads(text) if as_json else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if as_json else "TOML"
        raise ValidationError(f"seed file {str(path)!r}: invalid {kind}: {exc}") from None
    if not isinstance(doc, dict):
        raise ValidationError(f"seed file {str(path)!r}: expected a table/object at the top")
    unknown = sorted(set(doc) - {"applications", "devices", "keys"})
    if unknown:
        raise ValidationError(
            f"seed file {str(path)!r}: unknown section {unknown[0]!r} "
            "(expected applications, devices, keys)"
        )
    return parse_seed(doc)


def items(
    doc: dict[str, Any], section: str, allowed: frozenset[str]
) -> Iterator[tuple[str, dict[str, Any]]]:
    raw = doc.get(section, [])
    if not isinstance(raw, list):
        raise ValidationError(f"seed {section}: expected a list of tables")
    for i, item in enumerate(raw):
        where = f"seed {section}[{i}]"
        if not isinstance(item, dict):
            raise ValidationError(f"{where}: expected a table/object")
        unknown = sorted(set(item) - allowed)
        if unknown:
            raise ValidationError(f"{where}: unknown field {unknown[0]!r}")
        yield where, item


def optional_str(where: str, item: dict[str, Any], name: str) -> str | None:
    value = item.get(name)
    if value is not None and not isinstance(value, str):
        raise ValidationError(f"{where}: {name} must be a string, not {value!r}")
    return value


def str_list(where: str, item: dict[str, Any], name: str) -> tuple[str, ...]:
    value = item.get(name, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValidationError(f"{where}: {name} must be a list of strings, not {value!r}")
    return tuple(value)


def tag_pairs(where: str, value: Any) -> tuple[Tag, ...]:
    """{k = "v"} or {k = ["v1", "v2"]} (a multi-map), or ["k=v", ...]."""
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise ValidationError(f"{where}: tags must be strings 'k=v', not {value!r}")
        return tuple(parse_tag(v) for v in value)
    if not isinstance(value, dict):
        raise ValidationError(f'{where}: tags must be a table {{k = "v"}}, not {value!r}')
    pairs: list[Tag] = []
    for k, v in value.items():
        values = v if isinstance(v, list) else [v]
        if not all(isinstance(x, str) for x in values):
            raise ValidationError(f"{where}: tag {k!r} values must be strings, not {v!r}")
        pairs.extend((k, x) for x in values)
    return tuple(pairs)


def expiry(where: str, value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, date):  # TOML dates and datetimes arrive parsed
        return as_utc(value)
    if isinstance(value, str):
        return parse_when(value, what=f"{where} expires")
    raise ValidationError(f"{where}: expires must be an ISO-8601 date or datetime, not {value!r}")


def device_row(where: str, item: dict[str, Any]) -> DeviceRow:
    device_id = item.get("id")
    if not isinstance(device_id, str):
        raise ValidationError(f"{where}: id is required and must be a string")
    name = optional_str(where, item, "name")
    return device_id, name, tag_pairs(where, item.get("tags", {}))


def key_spec(where: str, item: dict[str, Any]) -> dict[str, Any]:
    pub, sub = str_list(where, item, "pub"), str_list(where, item, "sub")
    topics = optional_str(where, item, "topics")
    if topics is None:
        topics = "only" if (pub or sub) else "none"
    spec: dict[str, Any] = {
        "name": optional_str(where, item, "name"),
        "description": optional_str(where, item, "description"),
        "device_ids": str_list(where, item, "devices"),
        "device_tags": tag_pairs(where, item.get("tags", [])),
        "topic_mode": topics,
        "pub_topics": pub,
        "sub_topics": sub,
        "expires_at": expiry(where, item.get("expires")),
    }
    allow, deny = str_list(where, item, "allow_ips"), str_list(where, item, "deny_ips")
    if allow and deny:
        raise ValidationError(f"{where}: allow_ips and deny_ips are mutually exclusive: "
                              "a key allows only some addresses, or all but some")
    if allow or deny:
        spec["address_mode"] = AddressMode.ONLY if allow else AddressMode.EXCEPT
        spec["addresses"] = allow or deny
    return spec


def app_spec(where: str, item: dict[str, Any]) -> dict[str, Any]:
    name = optional_str(where, item, "name")
    if name is None:
        raise ValidationError(f"{where}: name is required")
    spec: dict[str, Any] = {"name": name,
                            "description": optional_str(where, item, "description")}
    for limit in ("max_keys", "max_devices"):
        if limit in item:
            spec[limit] = item[limit]
    return spec


def parse_seed(doc: dict[str, Any]) -> SeedPlan:
    apps = [app_spec(where, item) for where, item in items(doc, "applications", APP_FIELDS)]
    devices: dict[str | None, list[DeviceRow]] = {}
    for where, item in items(doc, "devices", DEVICE_FIELDS):
        app = optional_str(where, item, "application")
        devices.setdefault(app, []).append(device_row(where, item))
    keys: dict[str | None, list[dict[str, Any]]] = {}
    for where, item in items(doc, "keys", KEY_FIELDS):
        app = optional_str(where, item, "application")
        keys.setdefault(app, []).append(key_spec(where, item))
    for app, specs in keys.items():
        seen: set[str] = set()
        for spec in specs:
            name = spec["name"]
            if name is not None and name in seen:
                raise ValidationError(f"seed keys: duplicate key name {name!r}"
                                      + (f" in application {app!r}" if app else ""))
            seen.add(name)
    return SeedPlan(apps, devices, keys)


# --- applying it --------------------------------------------------------------------


def batches(rows: Sequence[T], size: int = BATCH) -> Iterator[Sequence[T]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


async def apply_seed(
    ks: KeyStore, plan: SeedPlan, on_secret: Callable[[dict[str, Any]], None],
    on_progress: Callable[[int], None] = lambda _done: None,
) -> SeedResult:
    """Create the applications that do not exist yet, upsert the devices, then create the
    keys whose name does not exist yet in their application, one batch (one transaction)
    at a time. ``on_secret`` gets each new key's {"key", "name", "secret"} as soon as its
    batch is committed, so a later failure loses no secret; ``on_progress`` the number of
    entries done since the last call."""
    result = SeedResult()
    present = {app.name for app in await ks.list_apps()}
    for spec in plan.apps:
        if spec["name"] not in present:
            await ks.create_app(**spec)
            result.apps += 1
    for app, devices in plan.devices.items():
        for rows in batches(devices):
            result.devices += len(rows)
            result.changed += await ks.upsert_devices(rows, app=app)
            on_progress(len(rows))
    for app, specs in plan.keys.items():
        existing = {k.name for k in await ks.list_keys(None, app=app) if k.name is not None}
        todo = []
        for spec in specs:
            if spec["name"] in existing:
                result.skipped.append(spec["name"])
            else:
                todo.append(spec)
        on_progress(len(specs) - len(todo))
        for chunk in batches(todo):
            for key, secret in await ks.create_keys(list(chunk), app=app):
                on_secret({"key": key.key, "name": key.name, "secret": secret})
            result.created += len(chunk)
            on_progress(len(chunk))
    return result
