"""Pure validation of a whole access-key definition (creation and updates).

Everything here runs before a transaction is opened. What needs the database (device ids
exist, name not taken, max_keys) is checked by the store inside the transaction, before
its first write.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from keystore.errors import ValidationError
from keystore.models import AddressMode, Tag, TopicMode
from keystore.validation import (
    coerce_address_mode,
    coerce_topic_mode,
    coerce_utc,
    dedupe,
    validate_address,
    validate_custom_filter,
    validate_description,
    validate_device_id,
    validate_key_name,
    validate_tags,
)

CREATE_FIELDS = frozenset(
    {
        "name",
        "description",
        "device_ids",
        "device_tags",
        "all_devices",
        "address_mode",
        "addresses",
        "topic_mode",
        "pub_topics",
        "sub_topics",
        "expires_at",
    }
)
RESTRICTION_FIELDS = ("device_ids", "device_tags", "all_devices")


@dataclass(frozen=True, slots=True)
class KeySpec:
    """A validated, normalised key definition, ready to insert."""

    name: str | None
    description: str | None
    all_devices: bool
    device_ids: tuple[str, ...]
    device_tags: tuple[Tag, ...]
    address_mode: AddressMode
    addresses: tuple[str, ...]
    topic_mode: TopicMode
    pub_topics: tuple[str, ...]
    sub_topics: tuple[str, ...]
    expires_at: datetime | None


def as_list(value: object, what: str) -> list[Any]:
    """A list-valued argument; a bare string is refused because iterating it would
    silently turn '10.0.0.1' into ten one-character entries."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValidationError(f"invalid {what} {value!r}: expected a list")
    return list(value)


def validate_addresses(addresses: object) -> tuple[str, ...]:
    return dedupe(validate_address(a) for a in as_list(addresses, "addresses"))


def validate_topic_list(filters: object, what: str, device_prefix: str) -> tuple[str, ...]:
    return dedupe(validate_custom_filter(f, device_prefix) for f in as_list(filters, what))


def check_modes(
    address_mode: AddressMode,
    addresses: tuple[str, ...],
    topic_mode: TopicMode,
    pub_topics: tuple[str, ...],
    sub_topics: tuple[str, ...],
) -> None:
    """Lists must agree with their mode: an address given with mode 'all' would otherwise
    be silently ignored, and 'only' with no address would lock the key out."""
    if address_mode is AddressMode.ALL and addresses:
        raise ValidationError(
            f"addresses {list(addresses)} given but address mode is 'all'; "
            "use 'only' or 'except' (or give no addresses)"
        )
    if address_mode is not AddressMode.ALL and not addresses:
        raise ValidationError(f"address mode '{address_mode.value}' needs at least one address")
    if topic_mode in (TopicMode.NONE, TopicMode.ALL) and (pub_topics or sub_topics):
        raise ValidationError(
            f"topic filters {list(pub_topics + sub_topics)} given but topic mode is "
            f"'{topic_mode.value}'; use 'only' or 'except' (or give no filters)"
        )
    if topic_mode in (TopicMode.ONLY, TopicMode.EXCEPT) and not (pub_topics or sub_topics):
        raise ValidationError(
            f"topic mode '{topic_mode.value}' needs at least one publish or subscribe filter"
        )


def validate_key_spec(fields: Mapping[str, Any], device_prefix: str) -> KeySpec:
    """Validate create_key keyword arguments (or one create_keys dict)."""
    unknown = sorted(set(fields) - CREATE_FIELDS)
    if unknown:
        raise ValidationError(f"unknown access key field {unknown[0]!r}")
    device_ids = dedupe(
        validate_device_id(d) for d in as_list(fields.get("device_ids", ()), "device ids")
    )
    device_tags = validate_tags(as_list(fields.get("device_tags", ()), "device tags"))
    all_devices = fields.get("all_devices")
    if all_devices is None:
        all_devices = not device_ids and not device_tags
    if not isinstance(all_devices, bool):
        raise ValidationError(f"invalid all_devices {all_devices!r}: must be true or false")
    if all_devices and (device_ids or device_tags):
        raise ValidationError(
            "a key for all devices cannot also list device ids or tags "
            f"(got ids {list(device_ids)}, tags {[f'{k}={v}' for k, v in device_tags]})"
        )
    if not all_devices and not (device_ids or device_tags):
        raise ValidationError(
            "a key restricted to some devices needs at least one device id or tag"
        )
    address_mode = coerce_address_mode(fields.get("address_mode", AddressMode.ALL))
    addresses = validate_addresses(fields.get("addresses", ()))
    topic_mode = coerce_topic_mode(fields.get("topic_mode", TopicMode.NONE))
    pub_topics = validate_topic_list(fields.get("pub_topics", ()), "pub topics", device_prefix)
    sub_topics = validate_topic_list(fields.get("sub_topics", ()), "sub topics", device_prefix)
    check_modes(address_mode, addresses, topic_mode, pub_topics, sub_topics)
    return KeySpec(
        name=validate_key_name(fields.get("name")),
        description=validate_description(fields.get("description")),
        all_devices=all_devices,
        device_ids=device_ids,
        device_tags=device_tags,
        address_mode=address_mode,
        addresses=addresses,
        topic_mode=topic_mode,
        pub_topics=pub_topics,
        sub_topics=sub_topics,
        expires_at=coerce_utc(fields.get("expires_at"), "expiration date"),
    )
