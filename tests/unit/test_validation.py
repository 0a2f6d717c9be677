"""The pure validators in keystore.validation: every rule refused with a one-line message
naming the bad value."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from keystore import (
    ValidationError,
    parse_tag,
    validate_address,
    validate_custom_filter,
    validate_device_id,
    validate_tag,
)
from keystore.models import AddressMode, TopicMode
from keystore.validation import coerce_address_mode, coerce_topic_mode, coerce_utc, validate_tags


def refused(func, value, *args, match: str) -> ValidationError:
    with pytest.raises(ValidationError, match=match) as info:
        func(value, *args)
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize("good", ["a", "dev-1", "A.b:c_d-9", "x" * 128])
def test_device_id_accepted(good: str) -> None:
    assert validate_device_id(good) == good


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("", "must not be empty"),
        ("x" * 129, "longer than 128"),
        ("a/b", "only letters"),
        ("a+b", "only letters"),
        ("a#", "only letters"),
        ("$sys", "only letters"),
        ("with space", "only letters"),
        ("dev\n", "only letters"),  # fullmatch: a trailing newline is not ignored
        ("é", "only letters"),
        (12, "must be a string"),
    ],
)
def test_device_id_refused(bad: object, reason: str) -> None:
    err = refused(validate_device_id, bad, match=reason)
    if isinstance(bad, str) and len(bad) < 50:
        assert repr(bad) in str(err)


def test_parse_tag_splits_at_first_equals() -> None:
    assert parse_tag("floor=1") == ("floor", "1")
    assert parse_tag("expr=a=b") == ("expr", "a=b")


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("floor", "must be key=value"),
        ("=1", "tag key '': must not be empty"),
        ("floor=", "tag value '': must not be empty"),
        ("k" * 256 + "=1", "longer than 255"),
        ("floor=" + "v" * 256, "longer than 255"),
        ("fl\toor=1", "non-printable"),
        ("floor=1\n", "non-printable"),
        ("floor =1", "whitespace"),
        ("floor= 1", "whitespace"),
    ],
)
def test_tag_refused(spec: str, reason: str) -> None:
    refused(parse_tag, spec, match=reason)


def test_tag_key_with_equals_refused() -> None:
    with pytest.raises(ValidationError, match="must not contain '='"):
        validate_tag("a=b", "c")


def test_tags_are_a_sorted_set() -> None:
    assert validate_tags(["b=2", ("a", "1"), "b=2", "b=1"]) == (("a", "1"), ("b", "1"), ("b", "2"))
    with pytest.raises(ValidationError, match="expected a list"):
        validate_tags("a=1")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        ("10.0.0.1", "10.0.0.1/32"),
        ("10.0.0.0/8", "10.0.0.0/8"),
        (" 192.168.1.0/24 ", "192.168.1.0/24"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("2001:db8::1", "2001:db8::1/128"),
        ("2001:DB8::/32", "2001:db8::/32"),
        ("::ffff:10.0.0.1", "::ffff:10.0.0.1/128"),
    ],
)
def test_address_normalised(given: str, normalised: str) -> None:
    assert validate_address(given) == normalised


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("10.0.0.0/33", "prefix length must be 0-32"),
        ("2001:db8::/129", "prefix length must be 0-128"),
        ("10.0.0.0/x", "prefix length"),
        ("10.0.0.256", "not an IPv4 or IPv6 address"),
        ("10.1", "not an IPv4 or IPv6 address"),
        ("example.com", "not an IPv4 or IPv6 address"),
        ("", "empty"),
        ("10.0.0.1/8", r"host bits set \(did you mean 10.0.0.0/8\?\)"),
        ("2001:db8::1/32", "host bits set"),
    ],
)
def test_address_refused(bad: str, reason: str) -> None:
    err = refused(validate_address, bad, match=reason)
    assert repr(bad) in str(err)


@pytest.mark.parametrize("good", ["#", "+/x", "+/+/state", "losantx/a", "a/losant/b", "other/#"])
def test_custom_filter_accepted(good: str) -> None:
    assert validate_custom_filter(good, "losant") == good


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("$SYS/x", "topics starting with '\\$' are reserved"),
        ("$share/g/a", "reserved"),
        ("losant/x", "lies under the device prefix 'losant/'"),
        ("losant", "device prefix"),
        ("losant/#", "device prefix"),
        ("losant/+/state", "device prefix"),
        ("a/#/b", "must be the last level"),
    ],
)
def test_custom_filter_refused(bad: str, reason: str) -> None:
    err = refused(validate_custom_filter, bad, "losant", match=reason)
    assert repr(bad) in str(err)


def test_custom_filter_uses_the_configured_prefix() -> None:
    assert validate_custom_filter("losant/x", "dev") == "losant/x"
    with pytest.raises(ValidationError, match="device prefix 'dev/'"):
        validate_custom_filter("dev/x", "dev")


def test_modes_accept_enum_value_and_losant_names() -> None:
    assert coerce_address_mode("whitelist") is AddressMode.ONLY
    assert coerce_address_mode(AddressMode.EXCEPT) is AddressMode.EXCEPT
    assert coerce_topic_mode("blacklist") is TopicMode.EXCEPT
    assert coerce_topic_mode("none") is TopicMode.NONE
    with pytest.raises(ValidationError, match="invalid topic mode 'some': must be one of"):
        coerce_topic_mode("some")


def test_dates_must_carry_a_timezone() -> None:
    assert coerce_utc("2030-01-01T00:00:00Z") == datetime(2030, 1, 1, tzinfo=UTC)
    east = datetime(2030, 1, 1, 2, tzinfo=timezone(timedelta(hours=2)))
    assert coerce_utc(east) == datetime(2030, 1, 1, tzinfo=UTC)
    with pytest.raises(ValidationError, match="needs a timezone"):
        coerce_utc(datetime(2030, 1, 1))
    with pytest.raises(ValidationError, match="not an ISO-8601 date"):
        coerce_utc("tomorrow")
