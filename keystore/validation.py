"""Pure validation of everything a user can put into the keystore.

No I/O and no database: the keystore calls them before it opens a transaction, so a
refused value never leaves anything half-written. Topic filters follow the broker's one
topic grammar (broker.topics). Every error is one line naming the bad value and the
reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, date, datetime, time
from enum import Enum
from typing import TypeVar

import netaddr

from keystore.errors import ValidationError
from keystore.models import AddressMode, KeyStatus, Tag, TopicMode
from keystore.topics import filter_under_prefix, is_system, validate_filter

__all__ = [
    "MAX_DESCRIPTION_LEN",
    "MIN_PREFIX_LEN",
    "MAX_DEVICE_ID_LEN",
    "MAX_NAME_LEN",
    "MAX_TAG_LEN",
    "coerce_address_mode",
    "coerce_status",
    "coerce_topic_mode",
    "coerce_utc",
    "as_str_list",
    "dedupe",
    "parse_tag",
    "validate_address",
    "validate_custom_filter",
    "validate_description",
    "validate_device_id",
    "validate_key_name",
    "validate_tag",
    "validate_tags",
]

MAX_DEVICE_ID_LEN = 128
MIN_PREFIX_LEN = 8  # shortest key prefix accepted where a key is named
MAX_TAG_LEN = 255
MAX_NAME_LEN = 255
MAX_DESCRIPTION_LEN = 4096

_DEVICE_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")

T = TypeVar("T")


def dedupe(items: Iterable[T]) -> tuple[T, ...]:
    """Drop repeated items, keeping the first occurrence's order."""
    return tuple(dict.fromkeys(items))


def as_str_list(values: Iterable[str], what: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise ValidationError(f"invalid {what} {values!r}: expected a list")
    out = list(values)
    for v in out:
        if not isinstance(v, str):
            raise ValidationError(f"invalid {what[:-1] if what.endswith('s') else what} {v!r}")
    return out


# --- devices and tags -------------------------------------------------------------------


def check_page(offset: object, limit: object) -> None:
    """A page of a list: ``offset`` items skipped (0 or more), ``limit`` items (1 or more)."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValidationError(f"invalid page offset {offset!r}: must be 0 or more")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValidationError(f"invalid page size {limit!r}: must be 1 or more")


def validate_device_id(device_id: object) -> str:
    """A device id is 1-128 chars of [A-Za-z0-9_.:-] (never '/', '+', '#' or '$', so it is
    always a single literal MQTT topic level)."""
    if not isinstance(device_id, str):
        raise ValidationError(f"invalid device id {device_id!r}: must be a string")
    if not device_id:
        raise ValidationError("invalid device id '': must not be empty")
    if len(device_id) > MAX_DEVICE_ID_LEN:
        raise ValidationError(
            f"invalid device id {device_id[:40]!r}...: longer than {MAX_DEVICE_ID_LEN} characters"
        )
    if not _DEVICE_ID.fullmatch(device_id):
        raise ValidationError(
            f"invalid device id {device_id!r}: only letters, digits and _ . : - are allowed"
        )
    return device_id


def _validate_tag_part(what: str, text: object) -> str:
    if not isinstance(text, str):
        raise ValidationError(f"invalid tag {what} {text!r}: must be a string")
    if not text:
        raise ValidationError(f"invalid tag {what} '': must not be empty")
    if len(text) > MAX_TAG_LEN:
        raise ValidationError(
            f"invalid tag {what} {text[:40]!r}...: longer than {MAX_TAG_LEN} characters"
        )
    if not text.isprintable():
        raise ValidationError(f"invalid tag {what} {text!r}: contains non-printable characters")
    # 'floor =1' silently never matching 'floor=1' is worse than a clear refusal.
    if text != text.strip():
        raise ValidationError(f"invalid tag {what} {text!r}: leading or trailing whitespace")
    return text


def validate_tag(key: object, value: object) -> Tag:
    """Tag keys and values: non-empty printable strings of at most 255 chars, no '=' in
    the key (so 'k=v' always splits unambiguously at the first '=')."""
    _validate_tag_part("key", key)
    _validate_tag_part("value", value)
    assert isinstance(key, str) and isinstance(value, str)
    if "=" in key:
        raise ValidationError(f"invalid tag key {key!r}: must not contain '='")
    return (key, value)


def parse_tag(spec: object) -> Tag:
    """'key=value' -> (key, value); the value may itself contain '='."""
    if not isinstance(spec, str):
        raise ValidationError(f"invalid tag {spec!r}: must be a 'key=value' string")
    key, sep, value = spec.partition("=")
    if not sep:
        raise ValidationError(f"invalid tag {spec!r}: must be key=value")
    return validate_tag(key, value)


def validate_tags(tags: Iterable[Tag | str]) -> tuple[Tag, ...]:
    """Accept (key, value) pairs or 'key=value' strings; sorted, without repeats."""
    if isinstance(tags, str):
        raise ValidationError(f"invalid tags {tags!r}: expected a list of key=value tags")
    out: set[Tag] = set()
    for tag in tags:
        if isinstance(tag, str):
            out.add(parse_tag(tag))
        elif isinstance(tag, (tuple, list)) and len(tag) == 2:
            out.add(validate_tag(tag[0], tag[1]))
        else:
            raise ValidationError(f"invalid tag {tag!r}: expected 'key=value' or (key, value)")
    return tuple(sorted(out))


# --- key fields ---------------------------------------------------------------------


def validate_key_name(name: object, what: str = "key name") -> str | None:
    """Optional display name (keys and devices): printable, 1-255 chars, no surrounding
    whitespace. None means no name."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise ValidationError(f"invalid {what} {name!r}: must be a string")
    if not name or name != name.strip():
        raise ValidationError(
            f"invalid {what} {name!r}: must be non-empty without surrounding whitespace"
        )
    if len(name) > MAX_NAME_LEN:
        raise ValidationError(
            f"invalid {what} {name[:40]!r}...: longer than {MAX_NAME_LEN} characters"
        )
    if not name.isprintable():
        raise ValidationError(f"invalid {what} {name!r}: contains non-printable characters")
    return name


def validate_description(description: object) -> str | None:
    if description is None:
        return None
    if not isinstance(description, str):
        raise ValidationError(f"invalid description {description!r}: must be a string")
    if len(description) > MAX_DESCRIPTION_LEN:
        raise ValidationError(
            f"invalid description {description[:40]!r}...: "
            f"longer than {MAX_DESCRIPTION_LEN} characters"
        )
    if "\x00" in description:
        raise ValidationError(f"invalid description {description[:40]!r}: contains NUL")
    return description


def coerce_utc(when: object, what: str = "date") -> datetime | None:
    """A tz-aware datetime or an ISO-8601 string with an offset/Z -> aware UTC datetime."""
    if when is None:
        return None
    if isinstance(when, str):
        try:
            parsed = datetime.fromisoformat(when)
        except ValueError:
            raise ValidationError(f"invalid {what} {when!r}: not an ISO-8601 date") from None
        when = parsed
    if not isinstance(when, datetime):
        raise ValidationError(f"invalid {what} {when!r}: expected a datetime or ISO-8601 string")
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValidationError(
            f"invalid {what} '{when.isoformat()}': needs a timezone (e.g. a trailing Z)"
        )
    return when.astimezone(UTC)


def as_utc(value: datetime | date) -> datetime:
    """Naive datetimes and plain dates are UTC; aware ones are converted to UTC."""
    if not isinstance(value, datetime):
        value = datetime.combine(value, time())
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def parse_when(text: str, what: str = "--expires") -> datetime:
    """ISO-8601 date or datetime ("Z" or an offset; naive means UTC) as an aware UTC datetime."""
    try:
        return as_utc(datetime.fromisoformat(text.strip()))
    except ValueError:
        raise ValidationError(
            f"invalid {what} {text!r}: expected an ISO-8601 date or datetime, "
            "e.g. 2027-01-31 or 2027-01-31T12:00:00Z"
        ) from None


E = TypeVar("E", bound=Enum)

# Losant's names for the restriction modes, accepted alongside ours.
_LOSANT_MODE_ALIASES = {"whitelist": "only", "blacklist": "except"}


def _coerce_enum(enum: type[E], value: object, what: str) -> E:
    if isinstance(value, enum):
        return value
    if isinstance(value, str):
        try:
            return enum(_LOSANT_MODE_ALIASES.get(value, value))
        except ValueError:
            pass
    allowed = ", ".join(str(m.value) for m in enum)
    raise ValidationError(f"invalid {what} {value!r}: must be one of {allowed}")


def coerce_address_mode(value: object) -> AddressMode:
    return _coerce_enum(AddressMode, value, "address mode")


def coerce_topic_mode(value: object) -> TopicMode:
    return _coerce_enum(TopicMode, value, "topic mode")


def coerce_status(value: object) -> KeyStatus:
    return _coerce_enum(KeyStatus, value, "status")


# --- addresses ------------------------------------------------------------------------


def validate_address(address: object) -> str:
    """An IPv4/IPv6 address or CIDR -> normalised ``str(netaddr.IPNetwork)``.

    A single address becomes a /32 (or /128). A CIDR with host bits set
    ('10.0.0.1/8') is refused rather than silently widened or narrowed: the operator
    meant either the host or the network, and we cannot tell which.
    """
    if not isinstance(address, str):
        raise ValidationError(f"invalid address {address!r}: must be a string")
    text = address.strip()
    if not text:
        raise ValidationError(f"invalid address {address!r}: empty")
    ip_part, slash, prefix = text.partition("/")
    try:
        ip = netaddr.IPAddress(ip_part)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise ValidationError(f"invalid address {address!r}: not an IPv4 or IPv6 address") from None
    width = 32 if ip.version == 4 else 128
    if slash and not (prefix.isdigit() and 0 <= int(prefix) <= width):
        raise ValidationError(
            f"invalid CIDR {address!r}: prefix length must be 0-{width} for IPv{ip.version}"
        )
    try:
        network = netaddr.IPNetwork(text)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise ValidationError(f"invalid CIDR {address!r}: not a valid network") from None
    if network.ip != network.network:
        raise ValidationError(
            f"invalid CIDR {address!r}: host bits set (did you mean {network.cidr}?)"
        )
    return str(network)


# --- MQTT topic filters -------------------------------------------------------------


def validate_custom_filter(topic_filter: object, device_prefix: str) -> str:
    """A filter for a key's additional-topic lists: valid syntax, not a '$' system topic,
    and not under the device prefix (device topics come only from the device restriction).

    Wildcards at the first level ('#', '+/x') are allowed here; the broker never lets
    them reach '$' or device topics it would not grant anyway.
    """
    checked = validate_filter(topic_filter)
    if is_system(checked):
        raise ValidationError(
            f"invalid topic filter {checked!r}: topics starting with '$' are reserved"
        )
    if filter_under_prefix(checked, device_prefix):
        raise ValidationError(
            f"invalid topic filter {checked!r}: lies under the device prefix "
            f"'{device_prefix}/' (device topics come from the key's device restriction)"
        )
    return checked
