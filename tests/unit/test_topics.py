"""Topic names and filters: matching against an independent reference, exact set
relations checked by brute force over a finite universe of topics."""

from __future__ import annotations

import itertools
import re
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.topics import (
    FilterSet,
    filter_intersection,
    filter_within,
    filters_overlap,
    parse_filter,
    topic_matches,
    validate_filter,
    validate_topic_name,
)
from keystore.errors import ValidationError

# --------------------------------------------------------------------- reference


def reference_match(topic_filter: str, topic: str) -> bool:
    """Independent reference: translate the filter into an anchored regex (tests only)."""
    levels = topic_filter.split("/")
    if topic.startswith("$") and levels[0] in ("+", "#"):
        return False
    if levels == ["#"]:
        return True
    pattern = ""
    for index, level in enumerate(levels):
        sep = "/" if index else ""
        if level == "#":
            pattern += "(?:/.*)?"  # the parent itself, or anything below it
        elif level == "+":
            pattern += sep + "[^/]*"
        else:
            pattern += sep + re.escape(level)
    return re.fullmatch(pattern, topic, flags=re.DOTALL) is not None


# Literal levels in filters; topics additionally use a "fresh" level no filter names.
LITERALS = ["a", "b", "", "$s"]
FRESH = "z"

topic_level = st.sampled_from([*LITERALS, FRESH, "$"])
topics = st.lists(topic_level, min_size=1, max_size=6).map("/".join).filter(bool)


@st.composite
def filters(draw: st.DrawFn, max_depth: int = 5) -> str:
    levels = draw(st.lists(st.sampled_from([*LITERALS, "+"]), min_size=1, max_size=max_depth))
    if draw(st.booleans()):
        if draw(st.booleans()) or len(levels) == 1:
            levels.append("#")
        else:
            levels[-1] = "#"
    return "/".join(levels) or "a"  # "" is not a valid filter


small_filters = filters(max_depth=3)


@cache
def universe(depth: int) -> tuple[str, ...]:
    """All topics of 1..depth levels over the literals plus one fresh level.

    Enough to decide relations of filters of <= depth-1 levels exactly: any other level
    value behaves like FRESH, and levels beyond both filters' lengths change nothing.
    """
    values = [*LITERALS, FRESH]
    return tuple(
        "/".join(combo)
        for n in range(1, depth + 1)
        for combo in itertools.product(values, repeat=n)
        if combo != ("",)  # "" is not a valid topic name
    )


def depth_of(*topic_filters: str) -> int:
    return max(len(f.split("/")) for f in topic_filters) + 1


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize("topic", ["a", "/", "a//b", "$SYS/x", "é/ü", "x" * 65535])
def test_valid_topic_names(topic: str) -> None:
    assert validate_topic_name(topic) == topic


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("", "empty"),
        ("a/+", "wildcards"),
        ("a/#", "wildcards"),
        ("a+b", "wildcards"),
        ("a\x00b", "NUL"),
        ("x" * 65536, "longer than 65535 bytes"),
        ("é" * 32768, "longer than 65535 bytes"),  # 65536 bytes in UTF-8
        ("\udcff", "UTF-8"),
    ],
)
def test_invalid_topic_names(topic: str, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        validate_topic_name(topic)


@pytest.mark.parametrize("topic_filter", ["#", "+", "a/#", "+/+", "/#", "a//+/b", "$SYS/#"])
def test_valid_filters(topic_filter: str) -> None:
    assert validate_filter(topic_filter) == topic_filter
    assert "/".join(parse_filter(topic_filter)) == topic_filter


@pytest.mark.parametrize(
    ("topic_filter", "reason"),
    [
        ("", "empty"),
        ("a/#/b", "last"),
        ("#/a", "last"),
        ("a#", "whole level"),
        ("a/b+", "whole level"),
        ("++", "whole level"),
        ("a\x00", "NUL"),
        ("x" * 65536, "longer than 65535 bytes"),
    ],
)
def test_invalid_filters(topic_filter: str, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason) as info:
        parse_filter(topic_filter)
    assert repr(topic_filter[:20])[:-1] in str(info.value)  # names the value


# ------------------------------------------------------------------------ matching


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/#", "a", True),  # '#' matches the parent level
        ("a/#", "a/b/c", True),
        ("a/#", "ab", False),
        ("#", "a", True),
        ("#", "/", True),
        ("+", "", True),  # one empty level (not a valid topic name, still a level)
        ("+", "/", False),
        ("+/+", "/", True),  # leading '/' gives an empty first level
        ("/+", "/a", True),
        ("+", "a/b", False),
        ("a/+/c", "a//c", True),  # '+' matches an empty level
        ("a/+", "a", False),
        ("#", "$SYS/uptime", False),  # §4.7.2
        ("+/uptime", "$SYS/uptime", False),
        ("$SYS/#", "$SYS/uptime", True),
        ("$SYS/+", "$SYS/uptime", True),
        ("a/$x", "a/$x", True),  # '$' matters only in the first level
        ("a/+", "a/$x", True),
        ("losant/+/state", "losant/d1/state", True),
        ("losant/+/state", "losant/d1/state/x", False),
    ],
)
def test_topic_matches_examples(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected
    assert reference_match(topic_filter, topic) is expected
    assert FilterSet([topic_filter]).matches_topic(topic) is expected


@given(filters(), topics)
def test_topic_matches_agrees_with_reference(topic_filter: str, topic: str) -> None:
    assert topic_matches(topic_filter, topic) == reference_match(topic_filter, topic)


@given(st.lists(filters(), max_size=8), topics)
def test_filterset_matches_iff_some_member_matches(members: list[str], topic: str) -> None:
    expected = any(topic_matches(f, topic) for f in members)
    assert FilterSet(members).matches_topic(topic) is expected


def test_no_redos_on_deep_topics() -> None:
    """GHSA-2hjf-7455-w946: a deep topic against many '+' must not backtrack."""
    depth = 10_000
    topic = "/".join(["a"] * depth)
    all_plus = "/".join(["+"] * depth)
    assert topic_matches(all_plus, topic)
    assert not topic_matches(all_plus + "/+", topic)
    assert not topic_matches("/".join(["+"] * (depth - 1) + ["b"]), topic)
    assert topic_matches("/".join(["+"] * 5000) + "/#", topic)
    assert not topic_matches("/".join(["+"] * 5000) + "/b/#", topic)
    members = FilterSet(["/".join(["+"] * n) + "/b" for n in range(1, 50)] + [all_plus])
    assert members.matches_topic(topic)
    assert not members.matches_topic(topic + "/a")
    assert members.covers(all_plus) and not members.covers(all_plus + "/#")
    assert members.overlaps(topic) and not members.overlaps(topic + "/a")
    assert members.overlaps_outside(all_plus, "losant")


# ------------------------------------------------------------- filter relations


@pytest.mark.parametrize(
    ("inner", "outer", "expected"),
    [
        ("a/b", "a/+", True),
        ("a/+", "a/b", False),
        ("a/+", "a/#", True),
        ("a/#", "a/+", False),
        ("a", "a/#", True),  # '#' includes the parent
        ("a/#", "a/+/#", False),  # ...which '+/#' does not
        ("#", "+/#", True),  # every topic has at least one level
        ("#", "+/+/#", False),
        ("+/#", "#", True),
        ("$SYS/x", "#", False),  # '#' does not reach '$' topics
        ("$SYS/x", "+/x", False),
        ("$SYS/x", "$SYS/#", True),
        ("a/$x", "a/+", True),
        ("#", "#", True),
        ("a/b/c", "a/b", False),
        ("a/b", "a/b/c", False),
        ("/#", "/+/#", True),  # the parent of '/#' would be "", not a topic name
        ("a/#", "a/+/#", False),
    ],
)
def test_filter_within_examples(inner: str, outer: str, expected: bool) -> None:
    assert filter_within(inner, outer) is expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("a/#", "a", True),
        ("a/+", "a", False),
        ("+/b", "a/+", True),
        ("#", "$SYS/x", False),
        ("+/#", "$SYS/#", False),
        ("$SYS/#", "$SYS/+/x", True),
        ("a/b", "a/c", False),
        ("a/+/c", "a/b/#", True),
        ("/#", "+/a", True),
        ("/#", "+", False),  # would share only "", which is not a topic name
        ("/#", "#", True),
    ],
)
def test_filters_overlap_examples(a: str, b: str, expected: bool) -> None:
    assert filters_overlap(a, b) is expected
    assert filters_overlap(b, a) is expected


def test_relations_differ_from_matching() -> None:
    """Feeding a filter to topic_matches as if it were a topic gives wrong answers."""
    assert filter_within("a/+", "a/+") and not filter_within("a/+", "a/b")
    assert topic_matches("a/+", "a/+")  # '+' taken as a literal level: meaningless
    assert filters_overlap("a/b", "a/+") and not topic_matches("a/b", "a/+")


@settings(max_examples=300)
@given(small_filters, small_filters)
def test_filter_within_is_exact(inner: str, outer: str) -> None:
    expected = all(
        topic_matches(outer, t) for t in universe(depth_of(inner, outer)) if topic_matches(inner, t)
    )
    assert filter_within(inner, outer) is expected


@given(filters(), filters(), st.lists(topics, max_size=20))
def test_filter_within_implies_matching(inner: str, outer: str, sample: list[str]) -> None:
    if filter_within(inner, outer):
        for topic in sample:
            if topic_matches(inner, topic):
                assert topic_matches(outer, topic)


@settings(max_examples=300)
@given(small_filters, small_filters)
def test_filters_overlap_is_exact_and_symmetric(a: str, b: str) -> None:
    shared = [t for t in universe(depth_of(a, b)) if topic_matches(a, t) and topic_matches(b, t)]
    assert filters_overlap(a, b) is bool(shared)
    assert filters_overlap(b, a) is filters_overlap(a, b)


def witness(topic_filter: str) -> str:
    """One concrete topic matched by a filter: '+' -> fresh level, trailing '#' -> parent."""
    levels = topic_filter.split("/")
    if levels[-1] == "#":
        levels = levels[:-1] or [FRESH]
    return "/".join(FRESH if level == "+" else level for level in levels)


@given(filters(), filters())
def test_overlap_has_a_witness_topic(a: str, b: str) -> None:
    both = filter_intersection(a, b)
    assert (both is not None) is filters_overlap(a, b)
    if both is not None:
        topic = witness(both)
        assert topic_matches(a, topic) and topic_matches(b, topic)


@settings(max_examples=200)
@given(small_filters, small_filters)
def test_intersection_is_exact(a: str, b: str) -> None:
    both = filter_intersection(a, b)
    for topic in universe(depth_of(a, b)):
        expected = topic_matches(a, topic) and topic_matches(b, topic)
        assert (both is not None and topic_matches(both, topic)) is expected


# ---------------------------------------------------------------------- FilterSet


@settings(max_examples=200)
@given(st.lists(small_filters, max_size=5), small_filters)
def test_filterset_relations_are_exact(members: list[str], topic_filter: str) -> None:
    compiled = FilterSet(members)
    assert compiled.covers(topic_filter) is any(filter_within(topic_filter, m) for m in members)
    assert compiled.overlaps(topic_filter) is any(filters_overlap(topic_filter, m) for m in members)


@settings(max_examples=300)
@given(st.lists(small_filters, max_size=4), small_filters, st.sampled_from(["a", "a/b", "$s"]))
def test_overlaps_outside_is_exact(members: list[str], topic_filter: str, prefix: str) -> None:
    def outside(topic: str) -> bool:
        return topic != prefix and not topic.startswith(prefix + "/")

    expected = any(
        topic_matches(topic_filter, t) and outside(t) and any(topic_matches(m, t) for m in members)
        for t in universe(depth_of(topic_filter, *members, prefix))
    )
    assert FilterSet(members).overlaps_outside(topic_filter, prefix) is expected


def test_filterset_is_immutable_value() -> None:
    one = FilterSet(["a/#", "b", "a/#"])
    assert one.filters == ("a/#", "b")
    assert one == FilterSet(["b", "a/#"]) and hash(one) == hash(FilterSet(["b", "a/#"]))
    assert not FilterSet([]) and len(one) == 2
    with pytest.raises(AttributeError):
        one.filters = ()  # type: ignore[misc]
    with pytest.raises(ValidationError):
        FilterSet(["a/#/b"])


# Messages as the keystore shows them for a key's topic lists (one validator for both).
@pytest.mark.parametrize(
    "good", ["a", "a/b/c", "+", "#", "a/+/b", "a/#", "+/+", "/", "a//b", "é/ü"]
)
def test_filter_syntax_accepted(good: str) -> None:
    assert validate_filter(good) == good


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("a/#/b", "'#' must be the last level"),
        ("#/a", "'#' must be the last level"),
        ("a+", "wildcard inside level 'a\\+'"),
        ("a/b#", "wildcard inside level"),
        ("+a/b", "wildcard inside level"),
        ("a\x00b", "contains NUL"),
        ("", "must not be empty"),
        ("a" * 65536, "65536 bytes, longer than 65535"),
        ("\ud800", "lone surrogate"),
        (5, "must be a string"),
    ],
)
def test_filter_syntax_refused(bad: object, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason) as info:
        validate_filter(bad)
    assert "\n" not in str(info.value)


def test_filter_length_counts_utf8_bytes() -> None:
    assert validate_filter("a" * 65535)
    with pytest.raises(ValidationError, match="longer than 65535 bytes"):
        validate_filter("é" * 32768)  # 32768 chars, 65536 bytes
