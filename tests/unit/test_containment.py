"""SUBSCRIBE by containment (broker.policy.containment, docs/cluster.md): the grant rule of
engines that authorise a filter once and never check a delivery."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.policy import SessionPolicy, check_receive, check_subscribe, check_subscribe_within
from broker.topics import topic_matches
from keystore.models import TopicMode
from tests.unit.test_policy import ALL_MODES, make_key, small_filters, universe

SCOPE = frozenset({"d1", "d2"})


def session(mode: TopicMode = TopicMode.NONE, scope: frozenset[str] | None = SCOPE,
            sub: tuple[str, ...] = ("sub/#", "both/+", "+/state")) -> SessionPolicy:
    return SessionPolicy.build(make_key(topic_mode=mode, sub_topics=sub), scope, "losant")


@pytest.mark.parametrize(
    ("topic_filter", "scope", "mode", "reason"),
    [
        ("losant/d1/state", SCOPE, TopicMode.NONE, "device_topic"),
        ("losant/d1/#", SCOPE, TopicMode.NONE, "device_topic"),
        ("losant/d1/+/x", SCOPE, TopicMode.NONE, "device_topic"),
        ("losant/d9/#", SCOPE, TopicMode.NONE, "not_in_scope"),
        # A wildcard in the id position reaches every device: only an unrestricted key.
        ("losant/+/state", SCOPE, TopicMode.NONE, "not_in_scope"),
        ("losant/+/state", None, TopicMode.NONE, "device_topic"),
        ("losant/#", SCOPE, TopicMode.ALL, "not_in_scope"),
        ("losant/#", None, TopicMode.NONE, "device_topic"),
        # '#' and '+/...' reach device and custom topics: both must be readable.
        ("#", SCOPE, TopicMode.ALL, "not_in_scope"),
        ("#", None, TopicMode.NONE, "topic_mode_none"),
        ("#", None, TopicMode.ALL, "custom_all"),
        ("+/state", SCOPE, TopicMode.ALL, "not_in_scope"),  # losant/state: device "state"
        ("+/state", SCOPE | {"state"}, TopicMode.ONLY, "in_list"),
        ("+/x", SCOPE | {"x"}, TopicMode.ONLY, "not_in_list"),
        ("$SYS/#", None, TopicMode.ALL, "dollar_topic"),
        ("sub/#", SCOPE, TopicMode.ONLY, "in_list"),
        ("sub/a/+", SCOPE, TopicMode.ONLY, "in_list"),
        ("both/#", SCOPE, TopicMode.ONLY, "not_in_list"),  # both/+ does not cover both/a/b
        ("other/+", SCOPE, TopicMode.EXCEPT, "in_except_list"),  # other/state: +/state
        ("other/x/#", SCOPE, TopicMode.EXCEPT, "not_in_except_list"),
        ("both/#", SCOPE, TopicMode.EXCEPT, "in_except_list"),  # shares both/x
        ("losant//#", None, TopicMode.ALL, "device_prefix"),  # carries nothing
        ("a/#/b", None, TopicMode.ALL, "invalid_filter"),
    ],
)
def test_reasons(topic_filter: str, scope: frozenset[str] | None, mode: TopicMode,
                 reason: str) -> None:
    assert check_subscribe_within(session(mode, scope), topic_filter).reason == reason


def test_the_daemon_grants_on_overlap_but_containment_does_not() -> None:
    """The one difference from check_subscribe: a filter reaching beyond the readable
    topics is refused, whereas the daemon grants it and checks each delivery."""
    restricted = session(TopicMode.ONLY)
    for topic_filter in ("#", "+/state", "losant/+/state", "losant/#"):
        assert check_subscribe(restricted, topic_filter).allowed
        assert not check_subscribe_within(restricted, topic_filter).allowed


def carries(topic: str) -> bool:
    """Can anyone publish to this topic? Not '$' topics nor the prefix's own levels."""
    levels = topic.split("/")
    return not levels[0].startswith("$") and not (
        levels[0] == "losant" and (len(levels) == 1 or not levels[1]))


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(ALL_MODES),
    st.lists(small_filters(), max_size=3),
    small_filters(),
    st.sampled_from([frozenset(), frozenset({"d1"}), None]),
)
def test_a_grant_never_reaches_an_unreadable_topic(
    mode: TopicMode, sub_list: list[str], topic_filter: str, scope: frozenset[str] | None,
) -> None:
    """Over a finite universe (every level the filters name plus a fresh one): granted
    implies every carrying topic the filter matches is readable; and for every mode but
    ``only`` (which asks for one list filter covering it all) the converse holds too."""
    policy = SessionPolicy.build(make_key(topic_mode=mode, sub_topics=tuple(sub_list)),
                                 scope, "losant")
    granted = check_subscribe_within(policy, topic_filter).allowed
    depth = max(len(f.split("/")) for f in [topic_filter, *sub_list]) + 1
    matched = [t for t in universe(depth) if carries(t) and topic_matches(topic_filter, t)]
    contained = bool(matched) and all(check_receive(policy, t).allowed for t in matched)
    if granted:
        assert contained
    elif mode is not TopicMode.ONLY:
        assert not contained
