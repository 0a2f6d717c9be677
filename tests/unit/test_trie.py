"""SubscriptionTree and RetainedStore against brute force over topic_matches."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.topics import RetainedStore, SubscriptionTree, topic_matches, trie
from keystore.errors import ValidationError

LEVELS = ["a", "b", "", "$s"]
topic_level = st.sampled_from([*LEVELS, "z"])
topics = st.lists(topic_level, min_size=1, max_size=5).map("/".join).filter(bool)


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from([*LEVELS, "+"]), min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    joined = "/".join(levels)
    return joined if joined else "#"


subscriptions = st.lists(
    st.tuples(filters(), st.integers(0, 4), st.integers(0, 2)), max_size=25
)


def brute_force(entries: dict[tuple[str, int], int], topic: str) -> dict[int, int]:
    result: dict[int, int] = {}
    for (topic_filter, subscriber), qos in entries.items():
        if topic_matches(topic_filter, topic):
            result[subscriber] = max(qos, result.get(subscriber, -1))
    return result


@settings(max_examples=300)
@given(subscriptions, st.lists(topics, min_size=1, max_size=10), st.data())
def test_match_equals_brute_force_and_removal_leaves_nothing(
    subs: list[tuple[str, int, int]], sample: list[str], data: st.DataObject
) -> None:
    tree: SubscriptionTree[int] = SubscriptionTree()
    entries: dict[tuple[str, int], int] = {}
    for topic_filter, subscriber, qos in subs:
        tree.add(topic_filter, subscriber, qos)
        entries[(topic_filter, subscriber)] = qos  # re-subscribe replaces QoS
    assert len(tree) == len(entries)
    for topic in sample:
        assert tree.match(topic)[0] == brute_force(entries, topic)

    # Random removals, some of them of things never subscribed.
    for topic_filter, subscriber, _ in data.draw(st.permutations(subs)):
        if data.draw(st.booleans()):
            removed = tree.remove(topic_filter, subscriber)
            assert removed is ((topic_filter, subscriber) in entries)
            entries.pop((topic_filter, subscriber), None)
    assert tree.remove("never/subscribed", 99) is False
    assert len(tree) == len(entries)
    for topic in sample:
        assert tree.match(topic)[0] == brute_force(entries, topic)
    for subscriber in {s for _, s in entries}:
        expected_filters = {f: q for (f, s), q in entries.items() if s == subscriber}
        assert tree.filters_of(subscriber) == expected_filters

    # Remove what is left, partly per subscriber: no stale nodes or entries remain.
    for subscriber in range(5):
        expected = sum(1 for _, s in entries if s == subscriber)
        assert tree.remove_subscriber(subscriber) == expected
    assert len(tree) == 0
    assert tree.node_count() == 1
    for topic in sample:
        assert tree.match(topic)[0] == {}


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matched"),
    [
        ("a/#", "a", True),  # '#' matches the parent level
        ("#", "$SYS/uptime", False),  # '$' topics not reached by first-level wildcards
        ("+/uptime", "$SYS/uptime", False),
        ("$SYS/#", "$SYS/uptime", True),
        ("+/+", "/x", True),  # leading '/' is an empty first level
        ("a/+/c", "a//c", True),  # '+' matches an empty level
        ("a/+", "a/b/c", False),
    ],
)
def test_match_examples(topic_filter: str, topic: str, matched: bool) -> None:
    tree: SubscriptionTree[str] = SubscriptionTree()
    tree.add(topic_filter, "s", 1)
    assert tree.match(topic)[0] == ({"s": 1} if matched else {})


def test_overlapping_subscriptions_deliver_once_at_max_qos() -> None:
    tree: SubscriptionTree[str] = SubscriptionTree()
    tree.add("losant/d1/#", "s1", 0)
    tree.add("losant/+/state", "s1", 2)
    tree.add("#", "s1", 1)
    tree.add("losant/d1/state", "s2", 1)
    tree.add("losant/d1/state", "s2", 0)  # re-subscribe replaces
    assert tree.match("losant/d1/state")[0] == {"s1": 2, "s2": 0}
    assert len(tree) == 4
    assert tree.filters_of("s1") == {"losant/d1/#": 0, "losant/+/state": 2, "#": 1}
    assert tree.filters_of("nobody") == {}


def test_remove_prunes_empty_nodes() -> None:
    tree: SubscriptionTree[str] = SubscriptionTree()
    tree.add("a/b/c/d", "s", 0)
    tree.add("a/+/#", "s", 0)
    assert tree.node_count() == 1 + 4 + 2
    assert tree.remove("a/b/c/d", "s")
    assert tree.node_count() == 1 + 3  # a, +, #
    assert not tree.remove("a/b/c/d", "s")
    assert tree.remove_subscriber("s") == 1
    assert tree.node_count() == 1 and len(tree) == 0


def test_add_rejects_invalid_filters() -> None:
    tree: SubscriptionTree[str] = SubscriptionTree()
    with pytest.raises(ValidationError):
        tree.add("a/#/b", "s", 0)
    assert len(tree) == 0 and tree.node_count() == 1


def test_many_subscriptions_only_matching_branches() -> None:
    tree: SubscriptionTree[int] = SubscriptionTree()
    for n in range(20_000):
        tree.add(f"losant/dev{n}/#", n, 1)
    assert tree.match("losant/dev123/state")[0] == {123: 1}
    assert tree.match("other")[0] == {}


def test_deep_topic_does_not_recurse() -> None:
    tree: SubscriptionTree[str] = SubscriptionTree()
    deep = "/".join(["+"] * 5000)
    tree.add(deep, "s", 0)
    assert tree.match("/".join(["x"] * 5000))[0] == {"s": 0}
    assert tree.remove(deep, "s") and tree.node_count() == 1


# ------------------------------------------------------------------ retained store


@settings(max_examples=300)
@given(
    st.dictionaries(topics, st.integers(), max_size=20),
    st.lists(filters(), min_size=1, max_size=5),
    st.data(),
)
def test_retained_matching_equals_brute_force(
    retained: dict[str, int], probe: list[str], data: st.DataObject
) -> None:
    store: RetainedStore[int] = RetainedStore()
    for topic, value in retained.items():
        store.set(topic, value)
    assert len(store) == len(retained)
    for topic_filter in probe:
        expected = {t: v for t, v in retained.items() if topic_matches(topic_filter, t)}
        found = list(store.matching(topic_filter))
        assert len(found) == len(expected)  # each topic once
        assert dict(found) == expected

    for topic in data.draw(st.permutations(list(retained))):
        if data.draw(st.booleans()):
            assert store.delete(topic)
            del retained[topic]
    for topic_filter in probe:
        expected = {t: v for t, v in retained.items() if topic_matches(topic_filter, t)}
        assert dict(store.matching(topic_filter)) == expected
    for topic in list(retained):
        assert store.get(topic) == retained[topic] and topic in store
        assert store.delete(topic)
    assert len(store) == 0 and store.node_count() == 1


def test_retained_basics() -> None:
    store: RetainedStore[bytes] = RetainedStore()
    store.set("losant/d1/state", b"1")
    store.set("losant/d1", b"0")
    store.set("$SYS/uptime", b"9")
    store.set("losant/d1/state", b"2")  # replaces
    assert len(store) == 3
    assert sorted(store.matching("losant/d1/#")) == [
        ("losant/d1", b"0"),
        ("losant/d1/state", b"2"),
    ]
    assert list(store.matching("#")) != [] and all(
        not t.startswith("$") for t, _ in store.matching("#")
    )
    assert list(store.matching("$SYS/+")) == [("$SYS/uptime", b"9")]
    assert store.get("nope") is None and not store.delete("nope")
    assert store.delete("losant/d1") and store.get("losant/d1/state") == b"2"
    assert sorted(store.items()) == [("$SYS/uptime", b"9"), ("losant/d1/state", b"2")]


def test_a_remembered_match_follows_every_change_of_the_subscriptions() -> None:
    """``match`` remembers its answers per topic: each change is seen at once."""
    tree: SubscriptionTree[str] = SubscriptionTree()
    tree.add("a/b", "s1", 0)
    assert tree.match("a/b")[0] == {"s1": 0}
    tree.add("a/b", "s1", 1)  # new options for the same filter
    assert tree.match("a/b")[0] == {"s1": 1}
    tree.add("a/#", "s2", 2)
    assert tree.match("a/b")[0] == {"s1": 1, "s2": 2}
    assert tree.remove("a/b", "s1")
    assert tree.match("a/b")[0] == {"s2": 2}
    assert tree.remove_subscriber("s2") == 1
    assert tree.match("a/b")[0] == {}


def test_matches_of_more_topics_than_it_remembers_stay_right() -> None:
    tree: SubscriptionTree[str] = SubscriptionTree()
    tree.add("d/+", "s", 1)
    topics = [f"d/{i}" for i in range(trie.MATCHES_KEPT * 2 + 5)]
    for _ in range(2):
        assert all(tree.match(topic)[0] == {"s": 1} for topic in topics)
    assert tree.match("e/1")[0] == {}
