"""The stored forms both databases share, and rows back to models.

SQLite and PostgreSQL store the same values the same way, so one mapping serves them and a
keystore copies between them row for row (``keybroker migrate``):

* timestamps are integer microseconds since the Unix epoch, UTC: they sort and compare
  numerically in queries and round-trip to aware datetimes exactly;
* flags (``all_devices``, ``connected``) are the integers 0 and 1;
* list-valued fields that are never searched by index (addresses, topic filters, token
  scopes) are JSON arrays;
* a key's device ids and tag pairs come back in its row as lists (SQLite: JSON text
  from ``json_group_array``; PostgreSQL: arrays), so reading a key is one statement.

Column order is the contract: ``row_to_key`` reads the key columns of either database
(keystore.sql.statements).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from keystore.backend import DeviceTokenRow
from keystore.errors import ValidationError
from keystore.models import (
    AccessKey,
    AddressMode,
    ApiToken,
    Application,
    ConnectionSnapshot,
    Device,
    KeyStatus,
    Tag,
    TopicMode,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

KEY_COLUMN_COUNT = 18
LAST_USED = 13  # position of last_used in a key row

# Sortable fields of the API's lists (Losant names) -> column; ties go by the primary key.
KEY_SORT = {"key": "k.key", "id": "k.id", "status": "k.status", "name": "k.name",
            "creationDate": "k.created_at", "lastUpdated": "k.updated_at"}
DEVICE_SORT = {"deviceId": "d.id", "id": "d.id", "name": "d.name",
               "creationDate": "d.created_at", "lastUpdated": "d.updated_at"}


def to_micros(when: datetime) -> int:
    """Aware datetime -> integer microseconds since the epoch, UTC (the stored form)."""
    delta = when.astimezone(UTC) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(micros: int | None) -> datetime | None:
    if micros is None:
        return None
    seconds, rest = divmod(micros, 1_000_000)
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=rest)


def now_micros() -> int:
    return to_micros(datetime.now(UTC))


def order_by(columns: dict[str, str], sort: str, descending: bool, tie: str) -> str:
    """ORDER BY text from whitelisted names only."""
    if sort not in columns:
        raise ValidationError(f"invalid sortField {sort!r}: use one of {', '.join(columns)}")
    direction = "DESC" if descending else "ASC"
    return f"{columns[sort]} {direction}, {tie} {direction}"


def as_list(value: Any) -> list[Any]:
    """A stored list: JSON text, or already a list (PostgreSQL arrays)."""
    if isinstance(value, list):
        return value
    # Most restriction lists are empty; skipping the parser for them is a measurable
    # share of authenticate() and list_keys().
    return [] if value == "[]" else list(json.loads(value))


class KeyParser:
    """``row_to_key`` that reuses the AccessKey of an identical row: CONNECT reads a key's
    row fresh every time, and only parsing it is saved. last_used, which changes on every
    connection, is left out of the identity and taken from the row. Rows whose lists come
    as JSON text (SQLite) are cached; lists that come parsed (PostgreSQL arrays) cannot
    be a dictionary key and cost no JSON parse anyway."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._parsed: OrderedDict[tuple[Any, ...], AccessKey] = OrderedDict()

    def __call__(self, row: Sequence[Any]) -> AccessKey:
        if not isinstance(row[14], str):
            return row_to_key(row)
        identity = (*row[:LAST_USED], *row[LAST_USED + 1 : KEY_COLUMN_COUNT])
        cached = self._parsed.get(identity)
        if cached is None:
            cached = row_to_key(row)
            self._parsed[identity] = cached
            if len(self._parsed) > self.size:
                self._parsed.popitem(last=False)
        else:
            self._parsed.move_to_end(identity)
        last_used = from_micros(row[LAST_USED])
        return cached if cached.last_used == last_used else replace(cached, last_used=last_used)


def row_to_key(row: Sequence[Any]) -> AccessKey:
    created = from_micros(row[11])
    updated = from_micros(row[12])
    assert created is not None and updated is not None
    return AccessKey(
        key=row[0],
        name=row[1],
        description=row[2],
        status=KeyStatus(row[3]),
        expires_at=from_micros(row[4]),
        all_devices=bool(row[5]),
        device_ids=tuple(sorted(as_list(row[14]))),
        device_tags=tuple(sorted((k, v) for k, v in as_list(row[15]))),
        address_mode=AddressMode(row[6]),
        addresses=tuple(as_list(row[7])),
        topic_mode=TopicMode(row[8]),
        pub_topics=tuple(as_list(row[9])),
        sub_topics=tuple(as_list(row[10])),
        created_at=created,
        updated_at=updated,
        last_used=from_micros(row[13]),
        app_id=row[16],
        id=row[17],
    )


APP_COLUMNS = ("a.id, a.name, a.description, a.max_keys, a.created_at, a.updated_at, "
               "a.max_devices")


def row_to_app(row: Sequence[Any]) -> Application:
    created, updated = from_micros(row[4]), from_micros(row[5])
    assert created is not None and updated is not None
    return Application(id=row[0], name=row[1], description=row[2], max_keys=row[3],
                       max_devices=row[6], created_at=created, updated_at=updated)


def row_to_device(row: Sequence[Any]) -> Device:
    created = from_micros(row[2])
    updated = from_micros(row[3])
    assert created is not None and updated is not None
    tags: tuple[Tag, ...] = tuple(sorted((k, v) for k, v in as_list(row[6])))
    return Device(
        id=row[0],
        name=row[1],
        tags=tags,
        created_at=created,
        updated_at=updated,
        connected=bool(row[4]),
        last_seen=from_micros(row[5]),
        app_id=row[7],
    )


def to_device_token_row(row: Sequence[Any]) -> DeviceTokenRow:
    """A DEVICE_TOKEN_SQL row of either backend: generation, device id, salt, hash,
    expiry, then the key's columns."""
    expires = from_micros(row[4])
    assert expires is not None
    return DeviceTokenRow(int(row[0]), row_to_key(row[5:]), row[1], row[2], row[3], expires)


# Column names, not a password.
TOKEN_COLUMNS = "t.id, t.name, t.app_id, t.scopes, t.status, t.created_at, t.expires_at, t.last_used"  # noqa: S105, E501


def row_to_token(row: Sequence[Any]) -> ApiToken:
    created = from_micros(row[5])
    assert created is not None
    return ApiToken(id=row[0], name=row[1], app_id=row[2], scopes=tuple(as_list(row[3])),
                    status=row[4], created_at=created, expires_at=from_micros(row[6]),
                    last_used=from_micros(row[7]))


# A connection snapshot (keystore.connections); both backends' tables of schema 8.
SNAPSHOT_COLUMNS = "s.client_id, s.key, s.scope, s.policy, s.client_ip, s.created_at"
SNAPSHOT_COLUMN_COUNT = 6


def row_to_snapshot(row: Sequence[Any]) -> ConnectionSnapshot:
    created = from_micros(row[5])
    assert created is not None
    return ConnectionSnapshot(client_id=row[0], key=row[1], scope=row[2], policy=row[3],
                              client_ip=row[4], created_at=created)

