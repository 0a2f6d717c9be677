"""Frozen value types returned by the keystore.

These are the contract between the keystore, the CLI and the broker. The Losant REST
field names (docs/access.md#access-keys) are produced by ``to_losant()``; the same names
are accepted by the advanced query.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any


class KeyStatus(str, Enum):
    ACTIVE = "active"
    INACTIVE = "inactive"


class AddressMode(str, Enum):
    """Connection restriction. Losant names: all / whitelist / blacklist."""

    ALL = "all"
    ONLY = "only"
    EXCEPT = "except"

    @property
    def losant(self) -> str:
        return {"all": "all", "only": "whitelist", "except": "blacklist"}[self.value]


class TopicMode(str, Enum):
    """Additional (custom) topics. Losant names: none / all / whitelist / blacklist."""

    NONE = "none"
    ALL = "all"
    ONLY = "only"
    EXCEPT = "except"

    @property
    def losant(self) -> str:
        return {"none": "none", "all": "all", "only": "whitelist", "except": "blacklist"}[
            self.value
        ]


Tag = tuple[str, str]


def iso(ts: datetime | None) -> str | None:
    """UTC ISO-8601 with millisecond precision and a trailing Z, as Losant prints dates."""
    if ts is None:
        return None
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


@dataclass(frozen=True, slots=True)
class Change:
    """One row of the keystore's change feed (written by triggers; see migrations)."""

    id: int
    kind: str  # key_status | key_expiry | key_updated | key_deleted | device_deleted | kick
    subject: str  # the key or device id
    at: datetime | None


@dataclass(frozen=True, slots=True)
class Application:
    """A tenant: every device and key belongs to exactly one (docs/access.md#applications)."""

    id: str  # 24 hex characters, like Losant's ids
    name: str
    description: str | None
    # 0: no limit. None only as stored for an application that set none (the "default"
    # one, and those older than the device limit): the configured limit, which KeyStore
    # puts in its place (keystore.apps).
    max_keys: int | None
    max_devices: int | None  # the same, for devices
    created_at: datetime
    updated_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "applicationId": self.id,
            "name": self.name,
            "description": self.description,
            "maxKeys": self.max_keys,
            "maxDevices": self.max_devices,
            "creationDate": iso(self.created_at),
            "lastUpdated": iso(self.updated_at),
        }


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    name: str | None
    tags: tuple[Tag, ...]  # sorted (key, value) pairs; a key may repeat with other values
    created_at: datetime
    updated_at: datetime
    connected: bool = False
    last_seen: datetime | None = None
    app_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "deviceId": self.id,
            "applicationId": self.app_id,
            "name": self.name,
            "tags": [{"key": k, "value": v} for k, v in self.tags],
            "creationDate": iso(self.created_at),
            "lastUpdated": iso(self.updated_at),
            "connected": self.connected,
            "lastSeen": iso(self.last_seen),
        }


@dataclass(frozen=True, slots=True)
class AccessKey:
    """An access key as stored: never carries the secret (only its salted hash is kept)."""

    key: str
    name: str | None
    description: str | None
    status: KeyStatus
    expires_at: datetime | None
    # Device restriction (immutable after creation). all_devices=True means unrestricted;
    # otherwise a device matches when its id is in device_ids OR it has any pair in device_tags.
    all_devices: bool
    device_ids: tuple[str, ...]
    device_tags: tuple[Tag, ...]
    address_mode: AddressMode
    addresses: tuple[str, ...]  # normalised IPs/CIDRs (str(netaddr.IPNetwork))
    topic_mode: TopicMode
    pub_topics: tuple[str, ...]
    sub_topics: tuple[str, ...]
    created_at: datetime
    updated_at: datetime
    last_used: datetime | None = None
    app_id: str = ""
    id: str = ""  # 24 hex: Losant's applicationKeyId (the API's name for the key)

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def to_losant(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "applicationKeyId": self.id,
            "key": self.key,
            "applicationId": self.app_id,
            "name": self.name,
            "description": self.description,
            "status": self.status.value,
            "deviceIds": list(self.device_ids),
            "deviceTags": [{"key": k, "value": v} for k, v in self.device_tags],
            "allDevices": self.all_devices,
            "filterType": self.topic_mode.losant,
            "pubTopics": list(self.pub_topics),
            "subTopics": list(self.sub_topics),
            "addressFilterType": self.address_mode.losant,
            "addresses": list(self.addresses),
            "creationDate": iso(self.created_at),
            "lastUpdated": iso(self.updated_at),
            "expirationDate": iso(self.expires_at),
            "lastUsed": iso(self.last_used),
        }


@dataclass(frozen=True, slots=True)
class ApiToken:
    """An admin token of the HTTP API as stored: never carries the token itself."""

    id: str  # 24 hex
    name: str
    app_id: str | None  # None: every application
    scopes: tuple[str, ...]
    status: str  # active | revoked
    created_at: datetime
    expires_at: datetime | None
    last_used: datetime | None = None

    def is_usable(self, now: datetime) -> bool:
        return self.status == "active" and (self.expires_at is None or now < self.expires_at)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "applicationId": self.app_id,
            "scope": list(self.scopes),
            "status": self.status,
            "creationDate": iso(self.created_at),
            "expirationDate": iso(self.expires_at),
            "lastUsed": iso(self.last_used),
        }


@dataclass(frozen=True, slots=True)
class ConnectionSnapshot:
    """What one connection of an external MQTT engine was granted at CONNECT (keybroker
    authsvc, docs/cluster.md), so that every replica decides its later requests alike.
    The digests are opaque to the keystore."""

    client_id: str
    key: str
    scope: str | None  # digest of the scope's device list; None: every device of the app
    policy: str  # digest of the key's topic settings the connection was admitted under
    client_ip: str
    created_at: datetime

    def same_grant(self, other: ConnectionSnapshot) -> bool:
        """Admitted under the same key, scope and topic settings (address and time aside)."""
        return (self.key, self.scope, self.policy) == (other.key, other.scope, other.policy)


@dataclass(frozen=True, slots=True)
class CredentialCheck:
    """A CONNECT's secret checked for a client id by an external engine's first request
    (keybroker authsvc, docs/cluster.md): its admission request may follow."""

    client_id: str
    key: str
    checked_at: datetime
