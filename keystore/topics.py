"""MQTT 3.1.1 topic names and filters (§4.7), and the two topic rules keybroker adds:
what a device topic is, and what a valid device prefix is (docs/topics.md). The one home
of each rule: the keystore validates its topic lists with these functions, and the
broker's matching and tries (broker.topics) build on them.

* A topic name: 1-65535 bytes of UTF-8 (no lone surrogates), no NUL, no wildcard.
* A topic filter: the same, with ``+`` and ``#`` only as whole levels and ``#`` last.
* The ``$`` rule (§4.7.2): a topic whose first level starts with ``$`` is never matched
  by a wildcard in the filter's first level; only a literal first level reaches it.
* Device topics: with device prefix ``P``, ``P/<id>`` and everything under ``P/<id>/``.
  ``P`` is one literal topic level, not starting with ``$``.
"""

from __future__ import annotations

from keystore.errors import ValidationError

MAX_TOPIC_BYTES = 65535  # MQTT strings carry a 16-bit length
PLUS = "+"
HASH = "#"


def is_system(level: str) -> bool:
    """True for a ``$`` first level (``$SYS``): the §4.7.2 rule. A wildcard first level of
    a filter never matches it; every walk over topic levels asks this one function."""
    return level[:1] == "$"


def is_wildcard(level: str) -> bool:
    return level == PLUS or level == HASH


def _shown(value: str) -> str:
    return value if len(value) <= 60 else value[:60] + "..."


def _check_string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"invalid {what} {value!r}: must be a string")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValidationError(
            f"invalid {what} {_shown(value)!r}: not valid UTF-8 (lone surrogate)") from None
    if size == 0:
        raise ValidationError(f"invalid {what} '': must not be empty")
    if size > MAX_TOPIC_BYTES:
        raise ValidationError(
            f"invalid {what} {_shown(value)!r}: {size} bytes, longer than {MAX_TOPIC_BYTES} bytes")
    if "\x00" in value:
        raise ValidationError(f"invalid {what} {_shown(value)!r}: contains NUL")
    return value


def is_topic_name(topic: str) -> bool:
    """The grammar of a PUBLISH topic name (MQTT-4.7.1-1, MQTT-4.7.3-1/2): not empty, no
    wildcard character, no NUL. Cheap enough for every message; the length limits are
    checked apart (``validate_topic_name``, and the broker's limits)."""
    return bool(topic) and PLUS not in topic and HASH not in topic and "\x00" not in topic


def validate_topic_name(topic: object) -> str:
    """Return ``topic`` if it is a valid PUBLISH topic name, else raise ValidationError."""
    checked = _check_string(topic, "topic")
    if not is_topic_name(checked):
        raise ValidationError(
            f"invalid topic {_shown(checked)!r}: wildcards '+' and '#' not allowed")
    return checked


def parse_filter(topic_filter: object) -> tuple[str, ...]:
    """Validate a topic filter and return its levels (ValidationError naming the value)."""
    checked = _check_string(topic_filter, "topic filter")
    levels = tuple(checked.split("/"))
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if level == HASH:
            if index != last:
                raise ValidationError(
                    f"invalid topic filter {_shown(checked)!r}: '#' must be the last level")
        elif level != PLUS and (PLUS in level or HASH in level):
            raise ValidationError(
                f"invalid topic filter {_shown(checked)!r}: wildcard inside level {level!r} "
                "('+' and '#' must occupy a whole level)")
    return levels


def validate_filter(topic_filter: object) -> str:
    """Return ``topic_filter`` if valid (see ``parse_filter``), else raise ValidationError."""
    parse_filter(topic_filter)
    assert isinstance(topic_filter, str)
    return topic_filter


# --------------------------------------------------------------------- device topics


def validate_device_prefix(prefix: object) -> str:
    """The device prefix is the first level of every device topic: one literal level."""
    if not isinstance(prefix, str) or not prefix or is_system(prefix) or any(
            c in prefix for c in "/+#\x00"):
        raise ValidationError(
            f"invalid device prefix {prefix!r}: must be one topic level "
            "(no '/', '+', '#', NUL) not starting with '$'")
    return prefix


def device_topic(prefix: str, device_id: str) -> str:
    """The root of a device's topics: ``P/<id>`` (its topics are that and ``P/<id>/...``)."""
    return f"{prefix}/{device_id}"


def device_of(topic: str, prefix: str) -> str | None:
    """The device id a topic belongs to: ``P/<id>`` and ``P/<id>/...`` give ``<id>``;
    ``P`` itself and ``P/`` or ``P//...`` give "" (a device topic of no device); any
    other topic gives None (not a device topic)."""
    head, slash, rest = topic.partition("/")
    if head != prefix:
        return None
    return rest.partition("/")[0] if slash else ""


def filter_under_prefix(topic_filter: str, prefix: str) -> bool:
    """True when a filter's first level is the device prefix itself: it can only match
    device topics (used to keep key topic lists away from them)."""
    return topic_filter.partition("/")[0] == prefix
