"""Access decisions (docs/access.md#connect, docs/topics.md). Every security rule has a
negative test."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.policy import (
    CONNACK_CODE,
    ConnectFacts,
    Decision,
    SessionPolicy,
    check_address,
    check_connect,
    check_publish,
    check_receive,
    check_subscribe,
    compile_addresses,
)
from broker.policy.decisions import DECIDED_TOPIC_CHARS, DECISIONS_KEPT
from broker.topics import FilterSet, topic_matches
from keystore.errors import ValidationError
from keystore.models import AccessKey, AddressMode, KeyStatus, TopicMode

NOW = datetime(2025, 1, 1, tzinfo=UTC)
PUB = ("pub/#", "both/+")
SUB = ("sub/#", "both/+", "+/state")


def make_key(**changes: object) -> AccessKey:
    key = AccessKey(
        key="k" * 32,
        name=None,
        description=None,
        status=KeyStatus.ACTIVE,
        expires_at=None,
        all_devices=False,
        device_ids=("d1", "d2"),
        device_tags=(),
        address_mode=AddressMode.ALL,
        addresses=(),
        topic_mode=TopicMode.NONE,
        pub_topics=PUB,
        sub_topics=SUB,
        created_at=NOW,
        updated_at=NOW,
    )
    return replace(key, **changes)  # type: ignore[arg-type]


def policy(
    mode: TopicMode = TopicMode.NONE,
    scope: frozenset[str] | None = frozenset({"d1", "d2"}),
    prefix: str = "losant",
) -> SessionPolicy:
    return SessionPolicy.build(make_key(topic_mode=mode), scope, prefix)


ALL_MODES = list(TopicMode)

# -------------------------------------------------------------- publish / receive

# (topic, expected for publish by mode, expected for receive by mode); modes in the
# order none, all, only, except. Device and prefix topics ignore the mode.
T, F = True, False
MATRIX = [
    ("losant/d1", [T, T, T, T], [T, T, T, T]),
    ("losant/d1/state", [T, T, T, T], [T, T, T, T]),
    ("losant/d2/command/x", [T, T, T, T], [T, T, T, T]),
    ("losant/other/state", [F, F, F, F], [F, F, F, F]),  # out of scope
    ("losant/d1x/state", [F, F, F, F], [F, F, F, F]),
    ("losant", [F, F, F, F], [F, F, F, F]),  # the prefix itself
    ("losant/", [F, F, F, F], [F, F, F, F]),  # empty id
    ("losant//state", [F, F, F, F], [F, F, F, F]),
    ("$SYS/broker/uptime", [F, F, F, F], [F, F, F, F]),
    ("$d1", [F, F, F, F], [F, F, F, F]),
    ("pub/x", [F, T, T, F], [F, T, F, T]),  # in pub list only
    ("sub/x", [F, T, F, T], [F, T, T, F]),  # in sub list only
    ("both/x", [F, T, T, F], [F, T, T, F]),
    ("other/state", [F, T, F, T], [F, T, T, F]),  # '+/state' is in the sub list
    ("custom", [F, T, F, T], [F, T, F, T]),
    ("losantx/d1", [F, T, F, T], [F, T, F, T]),  # not under the prefix
    ("/losant/d1", [F, T, F, T], [F, T, F, T]),
]


@pytest.mark.parametrize(("topic", "publish", "receive"), MATRIX)
@pytest.mark.parametrize("mode_index", range(4))
def test_publish_receive_matrix(
    topic: str, publish: list[bool], receive: list[bool], mode_index: int
) -> None:
    session = policy(ALL_MODES[mode_index])
    assert check_publish(session, topic).allowed is publish[mode_index]
    assert check_receive(session, topic).allowed is receive[mode_index]


@pytest.mark.parametrize("mode", ALL_MODES)
def test_remembered_decisions_are_the_decisions(mode: TopicMode) -> None:
    """A policy remembers its decisions per topic (a device repeats its topics): the
    second, third ... answer is the first, denials included, and what it keeps is bounded
    (a client publishing to ever new topics, or to very long ones, cannot grow it)."""
    session = policy(mode)
    index = ALL_MODES.index(mode)
    for _ in range(3):
        for topic, publish, receive in MATRIX:
            assert check_publish(session, topic).allowed is publish[index], topic
            assert check_receive(session, topic).allowed is receive[index], topic
    assert "$SYS/broker/uptime" in session._publish  # denials are remembered too
    for n in range(3 * DECISIONS_KEPT):
        assert not check_publish(session, f"losant/other{n}/state")
        assert check_receive(session, "losant/d1/" + "x" * (DECIDED_TOPIC_CHARS + n))
    assert len(session._publish) <= DECISIONS_KEPT
    assert len(session._receive) <= DECISIONS_KEPT
    assert all(len(topic) <= DECIDED_TOPIC_CHARS for topic in session._receive)
    for topic, publish, receive in MATRIX:
        assert check_publish(session, topic).allowed is publish[index], topic
        assert check_receive(session, topic).allowed is receive[index], topic


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("losant/d1/state", "device_topic"),
        ("losant/other/state", "not_in_scope"),
        ("losant", "device_prefix"),
        ("losant//x", "device_prefix"),
        ("$SYS/broker/uptime", "dollar_topic"),
        ("custom", "topic_mode_none"),
        ("a/+", "invalid_topic"),
        ("", "invalid_topic"),
    ],
)
def test_reasons(topic: str, reason: str) -> None:
    assert check_publish(policy(), topic) == Decision(False, reason) or (
        reason == "device_topic" and check_publish(policy(), topic) == Decision(True, reason)
    )


def test_custom_reasons() -> None:
    assert check_publish(policy(TopicMode.ALL), "x").reason == "custom_all"
    assert check_publish(policy(TopicMode.ONLY), "pub/a").reason == "in_list"
    assert check_publish(policy(TopicMode.ONLY), "x").reason == "not_in_list"
    assert check_receive(policy(TopicMode.EXCEPT), "sub/a").reason == "in_except_list"
    assert check_receive(policy(TopicMode.EXCEPT), "x").allowed


def test_other_scope_topic_denied_for_single_device_scope() -> None:
    one = policy(TopicMode.ALL, scope=frozenset({"d1"}))
    assert check_publish(one, "losant/d1/state").allowed
    assert not check_publish(one, "losant/d2/state").allowed
    assert not check_receive(one, "losant/d2/state").allowed
    assert not check_receive(one, "losant/other/state").allowed


def test_empty_scope_reaches_no_device() -> None:
    nobody = policy(TopicMode.ALL, scope=frozenset())
    assert not check_publish(nobody, "losant/d1/state").allowed
    assert not check_subscribe(nobody, "losant/+/state").allowed
    assert check_subscribe(nobody, "#").reason == "custom_all"


def test_unrestricted_scope_reaches_any_device() -> None:
    everyone = policy(scope=None)
    assert check_publish(everyone, "losant/anything/state").allowed
    assert not check_publish(everyone, "losant").allowed
    assert not check_publish(everyone, "losant//x").allowed
    assert check_subscribe(everyone, "losant/whoever/#").allowed


def test_dollar_topics_never_reachable_even_in_mode_all() -> None:
    open_key = policy(TopicMode.ALL, scope=None)
    assert not check_publish(open_key, "$SYS/broker/uptime").allowed
    assert not check_receive(open_key, "$SYS/broker/uptime").allowed
    assert not check_subscribe(open_key, "$SYS/#").allowed
    assert not check_subscribe(open_key, "$SYS/broker/uptime").allowed


def test_prefix_topics_denied_whatever_the_lists_say() -> None:
    # Keys are validated not to list prefix topics, but a broad filter still reaches it.
    key = make_key(topic_mode=TopicMode.ONLY, pub_topics=("+/+/state",), sub_topics=("#",))
    session = SessionPolicy.build(key, frozenset({"d1"}), "losant")
    assert check_publish(session, "x/y/state").allowed
    assert not check_publish(session, "losant/other/state").allowed
    assert not check_receive(session, "losant/other/state").allowed
    assert not check_receive(session, "losant").allowed


@pytest.mark.parametrize("prefix", ["", "$sys", "a/+", "a/", "/a", "a\x00", "acme/devices"])
def test_bad_device_prefix_rejected(prefix: str) -> None:
    with pytest.raises(ValidationError):
        policy(prefix=prefix)


def test_policy_is_frozen_and_built_once() -> None:
    session = policy(TopicMode.ONLY)
    assert session.pub == FilterSet(PUB) and session.sub == FilterSet(SUB)
    assert session.scope == frozenset({"d1", "d2"})
    with pytest.raises(AttributeError):
        session.scope = None  # type: ignore[misc]


# ---------------------------------------------------------------------- subscribe

# Expected grant per mode (none, all, only, except) for the default key:
# scope {d1, d2}, sub list sub/#, both/+, +/state.
SUBSCRIBE_MATRIX = [
    ("losant/d1/state", [T, T, T, T]),
    ("losant/d1/#", [T, T, T, T]),
    ("losant/d1", [T, T, T, T]),
    ("losant/+/state", [T, T, T, T]),  # d1, d2 readable; delivery filters the rest
    ("losant/#", [T, T, T, T]),
    ("#", [T, T, T, T]),  # granted for device topics; see the receive test below
    ("+/+", [T, T, T, T]),
    ("losant/other/#", [F, F, F, F]),  # out of scope
    ("losant", [F, F, F, F]),
    ("losant//#", [F, F, F, F]),
    ("$SYS/#", [F, F, F, F]),
    ("$SYS/broker/uptime", [F, F, F, F]),
    ("sub/x", [F, T, T, F]),
    ("sub/#", [F, T, T, F]),
    ("sub/+/x", [F, T, T, F]),
    ("both/+", [F, T, T, F]),
    ("both/#", [F, T, T, T]),  # both/x/y is not excepted
    ("pub/x", [F, T, F, T]),  # publish list does not grant subscribe
    ("x/state", [F, T, T, F]),
    ("+/x", [F, T, T, T]),  # both/x and sub/x are listed
    ("custom/#", [F, T, T, T]),  # custom/state matches "+/state"
    ("custom/x/#", [F, T, F, T]),
    ("+/other", [F, T, T, T]),  # only: sub/other; except: custom/other
]


@pytest.mark.parametrize(("topic_filter", "granted"), SUBSCRIBE_MATRIX)
@pytest.mark.parametrize("mode_index", range(4))
def test_subscribe_matrix(topic_filter: str, granted: list[bool], mode_index: int) -> None:
    session = policy(ALL_MODES[mode_index])
    assert check_subscribe(session, topic_filter).allowed is granted[mode_index]


@pytest.mark.parametrize(
    ("topic_filter", "reason"),
    [
        ("losant/d1/#", "device_topic"),
        ("losant/other/#", "not_in_scope"),
        ("losant", "device_prefix"),
        ("losant//x", "device_prefix"),
        ("$SYS/#", "dollar_topic"),
        ("custom", "topic_mode_none"),
        ("a/#/b", "invalid_filter"),
        ("", "invalid_filter"),
    ],
)
def test_subscribe_reasons(topic_filter: str, reason: str) -> None:
    assert check_subscribe(policy(), topic_filter).reason == reason


def test_hash_granted_for_device_topics_still_never_carries_other_scopes() -> None:
    one = policy(TopicMode.NONE, scope=frozenset({"d1"}))
    assert check_subscribe(one, "#").allowed  # readable: losant/d1/...
    assert check_subscribe(one, "losant/+/state").allowed
    assert check_receive(one, "losant/d1/state").allowed
    assert not check_receive(one, "losant/d2/state").allowed
    assert not check_receive(one, "custom/topic").allowed
    assert not check_receive(one, "$SYS/broker/uptime").allowed


def test_only_list_filter_overlapping_prefix_grants_nothing_under_it() -> None:
    # '+/state' in the sub list reaches losant/state... but only custom topics count.
    key = make_key(topic_mode=TopicMode.ONLY, sub_topics=("+/state",))
    session = SessionPolicy.build(key, frozenset(), "losant")
    assert not check_subscribe(session, "losant/state").allowed
    assert not check_subscribe(session, "losant/+").allowed
    assert check_subscribe(session, "+/state").allowed
    assert check_subscribe(session, "+/+").allowed


def test_except_is_conservative_only_toward_granting() -> None:
    key = make_key(topic_mode=TopicMode.EXCEPT, sub_topics=("a", "+/#"))
    session = SessionPolicy.build(key, frozenset(), "losant")
    # Every custom topic is excepted ('+/#'), so nothing custom is readable...
    assert not check_subscribe(session, "x/y").allowed
    # ...'#' lies within '+/#' (every topic has a level) and is refused too.
    assert not check_subscribe(session, "#").allowed
    # Within the union of two excepted filters but neither alone: granted, yet inert.
    union = SessionPolicy.build(
        make_key(topic_mode=TopicMode.EXCEPT, sub_topics=("+", "+/+/#")), frozenset(), "losant"
    )
    assert check_subscribe(union, "#").allowed
    assert not check_receive(union, "x").allowed and not check_receive(union, "x/y").allowed


# Property: over a finite universe of topics (every level value the filters name, plus
# one fresh level) a filter is granted iff it matches some readable topic — exactly for
# none/all/only; for except, never refused when it matches a readable topic.
UNIVERSE_LEVELS = ["losant", "d1", "d9", "sub", "", "$SYS"]
FRESH = "q"


@st.composite
def small_filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from([*UNIVERSE_LEVELS, "+"]), min_size=1, max_size=2))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels) or "#"


@cache
def universe(depth: int) -> tuple[str, ...]:
    values = [*UNIVERSE_LEVELS, FRESH]
    return tuple(
        t
        for n in range(1, depth + 1)
        for t in map("/".join, itertools.product(values, repeat=n))
        if t  # "" is not a topic name
    )


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(ALL_MODES),
    st.lists(small_filters(), max_size=3),
    small_filters(),
    st.sampled_from([frozenset(), frozenset({"d1"}), None]),
)
def test_subscribe_grant_matches_readable_topics(
    mode: TopicMode,
    sub_list: list[str],
    topic_filter: str,
    scope: frozenset[str] | None,
) -> None:
    key = make_key(topic_mode=mode, sub_topics=tuple(sub_list))
    session = SessionPolicy.build(key, scope, "losant")
    granted = check_subscribe(session, topic_filter).allowed
    depth = max(len(f.split("/")) for f in [topic_filter, *sub_list]) + 1
    useful = any(
        topic_matches(topic_filter, t) and check_receive(session, t).allowed
        for t in universe(depth)
    )
    if mode is TopicMode.EXCEPT:
        assert granted or not useful
    else:
        assert granted is useful


# -------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("mode", "addresses", "ip", "allowed"),
    [
        (AddressMode.ALL, (), "203.0.113.1", True),
        (AddressMode.ALL, (), "garbage", True),  # no restriction: address not consulted
        (AddressMode.ONLY, ("10.0.0.0/8",), "10.1.2.3", True),
        (AddressMode.ONLY, ("10.0.0.0/8",), "11.1.2.3", False),
        (AddressMode.ONLY, ("10.0.0.0/8",), "::ffff:10.1.2.3", True),  # IPv4-mapped
        (AddressMode.ONLY, ("10.0.0.0/8",), "::ffff:11.1.2.3", False),
        (AddressMode.ONLY, ("192.0.2.7/32",), "192.0.2.7", True),
        (AddressMode.ONLY, ("2001:db8::/32",), "2001:db8::1", True),
        (AddressMode.ONLY, ("2001:db8::/32",), "2001:db9::1", False),
        (AddressMode.ONLY, ("::ffff:10.0.0.0/104",), "10.9.9.9", True),
        (AddressMode.ONLY, ("10.0.0.0/8",), "garbage", False),  # invalid: deny
        (AddressMode.ONLY, ("10.0.0.0/8",), "", False),
        (AddressMode.EXCEPT, ("10.0.0.0/8",), "10.1.2.3", False),
        (AddressMode.EXCEPT, ("10.0.0.0/8",), "::ffff:10.1.2.3", False),  # no bypass
        (AddressMode.EXCEPT, ("10.0.0.0/8",), "11.1.2.3", True),
        (AddressMode.EXCEPT, ("2001:db8::/32",), "2001:db8::5", False),
        (AddressMode.EXCEPT, ("10.0.0.0/8",), "garbage", False),  # invalid: deny
        (AddressMode.EXCEPT, ("10.0.0.0/8",), "10.1.2.3:80", False),
    ],
)
def test_check_address(
    mode: AddressMode, addresses: tuple[str, ...], ip: str, allowed: bool
) -> None:
    assert check_address(mode, compile_addresses(addresses), ip).allowed is allowed


def test_compile_addresses_is_cached_and_validates() -> None:
    assert compile_addresses(("10.0.0.0/8",)) is compile_addresses(("10.0.0.0/8",))
    with pytest.raises(ValidationError, match="10.0.0.0/33"):
        compile_addresses(("10.0.0.0/33",))


# ---------------------------------------------------------------------- connect


def facts(**changes: object) -> ConnectFacts:
    base = ConnectFacts(
        key=make_key(),
        now=NOW,
        device_registered=True,
        device_in_scope=True,
        client_ip="192.0.2.1",
        will_topic=None,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_connect_ok() -> None:
    assert check_connect(facts(), policy()).allowed
    assert check_connect(facts(will_topic="losant/d1/state"), policy()).allowed


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"key": make_key(status=KeyStatus.INACTIVE)}, "inactive"),
        ({"key": make_key(expires_at=NOW)}, "expired"),
        ({"key": make_key(expires_at=NOW - timedelta(seconds=1))}, "expired"),
        ({"device_registered": False}, "unknown_device"),
        ({"device_in_scope": False}, "device_not_in_scope"),
        (
            {"key": make_key(address_mode=AddressMode.ONLY, addresses=("10.0.0.0/8",))},
            "ip_denied",
        ),
        (
            {"key": make_key(address_mode=AddressMode.EXCEPT, addresses=("192.0.2.0/24",))},
            "ip_denied",
        ),
        ({"will_topic": "losant/other/state"}, "will_denied"),
        ({"will_topic": "$SYS/x"}, "will_denied"),
        ({"will_topic": "custom"}, "will_denied"),  # mode none
    ],
)
def test_connect_refusals(changes: dict[str, object], reason: str) -> None:
    decision = check_connect(facts(**changes), policy())
    assert decision == Decision(False, reason)
    assert CONNACK_CODE[reason] == 5


def test_connect_checks_in_spec_order() -> None:
    everything_wrong = facts(
        key=make_key(
            status=KeyStatus.INACTIVE,
            expires_at=NOW,
            address_mode=AddressMode.ONLY,
            addresses=("10.0.0.0/8",),
        ),
        device_registered=False,
        device_in_scope=False,
        will_topic="$SYS/x",
    )
    order = ["inactive", "expired", "unknown_device", "device_not_in_scope", "ip_denied"]
    current = everything_wrong
    fixes: list[dict[str, object]] = [
        {"key": replace(current.key, status=KeyStatus.ACTIVE)},
        {"key": replace(current.key, status=KeyStatus.ACTIVE, expires_at=None)},
        {"device_registered": True},
        {"device_in_scope": True},
        {"client_ip": "10.0.0.1"},
    ]
    for reason, fix in zip(order, fixes, strict=True):
        assert check_connect(current, policy()).reason == reason
        current = replace(current, **fix)  # type: ignore[arg-type]
    assert check_connect(current, policy()).reason == "will_denied"
    assert check_connect(replace(current, will_topic=None), policy()).allowed


def test_expiry_moved_to_future_works_again() -> None:
    assert check_connect(facts(key=make_key(expires_at=NOW + timedelta(days=1))), policy())


def test_will_without_policy_fails_closed() -> None:
    assert check_connect(facts(will_topic="losant/d1/state"), None).reason == "will_denied"
    assert check_connect(facts(), None).allowed


def test_connack_codes() -> None:
    for reason in ("no_credentials", "unknown_key", "bad_secret"):
        assert CONNACK_CODE[reason] == 4
    assert CONNACK_CODE["banned"] == 5
