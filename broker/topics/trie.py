"""Tries over topic levels: one node type for the three uses (docs/topics.md).

* ``FilterSet``: an immutable set of filters (a key's topic list); ``matches`` is the
  per-message policy check, ``covers``/``shares_topic`` the SUBSCRIBE-time relations.
* ``SubscriptionTree``: filter -> subscribers, for routing; a PUBLISH walks its topic's
  levels, so the cost follows the topic's depth and the matching branches, not the
  number of subscriptions (mosquitto's subs.c shape).
* ``RetainedStore``: topic -> retained value; a SUBSCRIBE walks only its filter's subtree.

A node has literal children, a ``+`` child and a ``#`` child (a leaf), and ``value``:
whatever ends exactly there (membership, a subscriber map, a retained message). Filters
given to ``add`` are validated; topics given to ``match``/``set`` are assumed valid (the
broker validates PUBLISH topics once, on the way in). No I/O, no locking: one event loop
owns them.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar

from broker.topics.relations import without_empty_parent
from keystore.topics import HASH, PLUS, is_system, parse_filter

V = TypeVar("V")
S = TypeVar("S", bound=Hashable)

# SubscriptionTree: topics whose subscribers are remembered until the next change of the
# subscriptions (a device repeats its topics); past this many, forgotten all at once.
MATCHES_KEPT = 1024


class Node(Generic[V]):
    __slots__ = ("children", "plus", "hash", "parent", "key", "value")

    def __init__(self, parent: Node[V] | None = None, key: str = "") -> None:
        self.children: dict[str, Node[V]] = {}
        self.plus: Node[V] | None = None
        self.hash: Node[V] | None = None  # leaf: what "<path to here>/#" holds
        self.parent = parent
        self.key = key  # literal level, or PLUS / HASH
        self.value: V | None = None

    def child(self, level: str) -> Node[V]:
        """The child for a filter level, created if missing."""
        if level == HASH:
            if self.hash is None:
                self.hash = Node(self, HASH)
            return self.hash
        if level == PLUS:
            if self.plus is None:
                self.plus = Node(self, PLUS)
            return self.plus
        found = self.children.get(level)
        if found is None:
            found = self.children[level] = Node(self, level)
        return found

    def find(self, levels: Iterable[str]) -> Node[V] | None:
        """The node a literal path leads to, if it exists."""
        node: Node[V] | None = self
        for level in levels:
            node = node.children.get(level) if node is not None else None
        return node

    def prune(self) -> None:
        """Detach this node and its empty ancestors (nothing is left behind)."""
        node: Node[V] = self
        while node.parent is not None and node.value is None and not (
                node.children or node.plus or node.hash):
            parent = node.parent
            if node.key == HASH:
                parent.hash = None
            elif node.key == PLUS and parent.plus is node:
                parent.plus = None
            else:
                del parent.children[node.key]
            node.parent = None
            node = parent

    def count(self) -> int:
        """Nodes in this subtree, itself included (1 for an empty trie: proof of pruning)."""
        total, stack = 0, [self]
        while stack:
            node = stack.pop()
            total += 1
            stack.extend(node.children.values())
            stack.extend(n for n in (node.plus, node.hash) if n is not None)
        return total


def match_nodes(root: Node[V], levels: Sequence[str]) -> list[Node[V]]:
    """Nodes (with a value) whose filter matches the topic given as levels: the literal
    path, ``+`` at any level, ``#`` taking the rest (also the parent: ``a/#`` matches
    ``a``), and no wildcard first level for a ``$`` topic."""
    out: list[Node[V]] = []
    nodes = [root]
    wild_ok = not is_system(levels[0])
    for level in levels:
        following: list[Node[V]] = []
        for node in nodes:
            if wild_ok:
                if node.hash is not None:
                    out.append(node.hash)
                if node.plus is not None:
                    following.append(node.plus)
            found = node.children.get(level)
            if found is not None:
                following.append(found)
        if not following:
            return out
        nodes = following
        wild_ok = True
    for node in nodes:
        if node.value is not None:
            out.append(node)
        if node.hash is not None:
            out.append(node.hash)  # "a/#" matches "a"
    return out


# ------------------------------------------------------------------------ FilterSet

_ABSORB: Node[bool] = Node()  # search state: a member's '#' has taken over (any rest)
# (member node, filter index, topic depth, T still spelling the prefix, T == "" so far)
_SearchState = tuple[Node[bool], int, int, bool, bool]


class FilterSet:
    """An immutable set of topic filters compiled into a trie.

    ``matches`` costs O(topic depth × trie width at that depth), independent of the
    number of unrelated filters; it is the per-message check of a session policy.
    """

    __slots__ = ("filters", "_root")

    filters: tuple[str, ...]
    _root: Node[bool]

    def __init__(self, filters: Iterable[str] = ()) -> None:
        unique = tuple(dict.fromkeys(filters))
        root: Node[bool] = Node()
        for topic_filter in unique:
            node = root
            for level in parse_filter(topic_filter):
                node = node.child(level)
            node.value = True
        object.__setattr__(self, "filters", unique)
        object.__setattr__(self, "_root", root)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("FilterSet is immutable")

    def __repr__(self) -> str:
        return f"FilterSet({list(self.filters)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FilterSet):
            return NotImplemented
        return set(self.filters) == set(other.filters)

    def __hash__(self) -> int:
        return hash(frozenset(self.filters))

    def __len__(self) -> int:
        return len(self.filters)

    def __bool__(self) -> bool:
        return bool(self.filters)

    def __iter__(self) -> Iterator[str]:
        return iter(self.filters)

    # -- per message ----------------------------------------------------------------

    def matches_topic(self, topic: str) -> bool:
        """True iff some member filter matches the topic name."""
        return self.matches(topic.split("/"))

    def matches(self, topic_levels: Sequence[str]) -> bool:
        """True iff some member filter matches the topic given as its levels: the walk of
        ``match_nodes``, returning at the first match (it is every delivery's check)."""
        root = self._root
        system = is_system(topic_levels[0])
        if root.hash is not None and not system:
            return True
        nodes = [root]
        first = True
        for level in topic_levels:
            following: list[Node[bool]] = []
            for node in nodes:
                found = node.children.get(level)
                if found is not None:
                    if found.hash is not None:
                        return True  # "<path>/#" takes the rest, including nothing
                    following.append(found)
                plus = node.plus
                if plus is not None and not (first and system):
                    if plus.hash is not None:
                        return True
                    following.append(plus)
            if not following:
                return False
            nodes = following
            first = False
        for node in nodes:
            if node.value:
                return True
        return False

    # -- SUBSCRIBE-time relations ---------------------------------------------------

    def covers(self, topic_filter: str) -> bool:
        """True iff ``topic_filter`` lies within a single member filter (exact per member).

        A filter within the *union* of several members but within none of them alone is
        not covered; callers needing "entirely excluded" are thereby conservative.
        """
        levels = without_empty_parent(parse_filter(topic_filter))
        system = is_system(levels[0])
        stack: list[tuple[Node[bool], int]] = [(self._root, 0)]
        while stack:
            node, index = stack.pop()
            if node.hash is not None and not (index == 0 and system):
                return True
            if index == len(levels):
                if node.value:
                    return True
                continue
            level = levels[index]
            if level == HASH:
                continue  # only a member '#' right here covers it (checked above)
            if level == PLUS:
                if node.plus is not None:
                    stack.append((node.plus, index + 1))
                continue
            found = node.children.get(level)
            if found is not None:
                stack.append((found, index + 1))
            if node.plus is not None and not (index == 0 and system):
                stack.append((node.plus, index + 1))
        return False

    def overlaps(self, topic_filter: str) -> bool:
        """True iff some topic is matched by ``topic_filter`` and by a member (exact)."""
        return self.shares_topic(parse_filter(topic_filter), None)

    def overlaps_outside(self, topic_filter: str, prefix: str) -> bool:
        """True iff some topic matched by ``topic_filter`` and by a member is neither
        ``prefix`` itself nor under ``prefix/`` (exact). ``prefix`` is a topic name."""
        return self.shares_topic(parse_filter(topic_filter), tuple(prefix.split("/")))

    def shares_topic(
        self, levels: Sequence[str], prefix: Sequence[str] | None
    ) -> bool:
        """Is there a topic T matched by the filter ``levels`` and by some member (and,
        when ``prefix`` levels are given, whose first len(prefix) levels differ from them)?

        Depth-first search over a product of three small automata: the filter (index,
        or stuck on its '#'), the member trie (node, or _ABSORB after a member '#'), and
        "T still spells the prefix". A wildcard step is taken once, with a fresh level
        (not a literal in sight, not '$'), which dominates any particular value: it
        leaves the prefix and is not the empty level. So each trie node is entered at
        most once per edge and the search is linear in the trie size.
        """
        prefix_depth = len(prefix) if prefix is not None else 0
        filter_depth = len(levels)
        stack: list[_SearchState] = [(self._root, 0, 0, prefix is not None, False)]
        while stack:
            node, f_index, depth, on_prefix, empty = stack.pop()
            if on_prefix and depth >= prefix_depth:
                continue  # T is the prefix or lies under it
            member_absorbs = node is _ABSORB
            if not member_absorbs and node.hash is not None:
                stack.append((_ABSORB, f_index, depth, on_prefix, empty))
            filter_absorbs = f_index < filter_depth and levels[f_index] == HASH
            if (
                depth >= 1
                and not empty  # "" is not a topic name
                and (f_index == filter_depth or filter_absorbs)
                and (member_absorbs or bool(node.value) or node.hash is not None)
            ):
                return True  # T can end here
            if filter_absorbs and member_absorbs:
                return True  # both take anything: T continues with a fresh level
            if f_index == filter_depth:
                continue
            next_f_index = f_index if filter_absorbs else f_index + 1
            next_depth = depth + 1
            filter_level = levels[f_index]
            if filter_absorbs or filter_level == PLUS:
                # The filter takes any level: follow every literal child with its own
                # value, and the member's wildcard once with a fresh value.
                fresh = (next_f_index, next_depth, False, False)
                if member_absorbs:
                    stack.append((_ABSORB, *fresh))
                    continue
                if node.plus is not None:
                    stack.append((node.plus, *fresh))
                for value, found in node.children.items():
                    if depth == 0 and is_system(value):
                        continue  # a filter wildcard never reaches a '$' first level
                    stack.append(
                        (
                            found,
                            next_f_index,
                            next_depth,
                            on_prefix and value == prefix[depth],  # type: ignore[index]
                            depth == 0 and value == "",
                        )
                    )
                continue
            # Literal filter level: T's level is fixed.
            step = (
                next_f_index,
                next_depth,
                on_prefix and filter_level == prefix[depth],  # type: ignore[index]
                depth == 0 and filter_level == "",
            )
            member_wild_ok = not (depth == 0 and is_system(filter_level))
            if member_absorbs:
                if member_wild_ok:
                    stack.append((_ABSORB, *step))
                continue
            literal = node.children.get(filter_level)
            if literal is not None:
                stack.append((literal, *step))
            if node.plus is not None and member_wild_ok:
                stack.append((node.plus, *step))
        return False


# ----------------------------------------------------------------- SubscriptionTree

# A subscription's options packed in one int (the QoS alone for a plain one, so MQTT
# 3.1.1 subscriptions cost what they did): bits 0-1 QoS, 2 No Local, 3 Retain As
# Published, 4-5 Retain Handling, 6 and up the subscription identifier (MQTT 5, §3.8.3.1).
NO_LOCAL = 0x04
RETAIN_AS_PUBLISHED = 0x08


def options(qos: int, no_local: bool = False, retain_as_published: bool = False,
            retain_handling: int = 0, sub_id: int = 0) -> int:
    return (qos | (NO_LOCAL if no_local else 0) | (RETAIN_AS_PUBLISHED if retain_as_published
            else 0) | retain_handling << 4 | sub_id << 6)


def qos_of(packed: int) -> int:
    return packed & 3


def retain_handling_of(packed: int) -> int:
    return (packed >> 4) & 3


def sub_id_of(packed: int) -> int:
    return packed >> 6


def merge_options(a: int, b: int) -> tuple[int, int]:
    """Two subscriptions of one subscriber matching one message: one delivery, at the
    higher QoS, Retain As Published if either asks, and both identifiers (the second
    returned apart, 0 if there is none to add)."""
    qos = max(a & 3, b & 3)
    rap = (a | b) & RETAIN_AS_PUBLISHED
    first, second = sub_id_of(a), sub_id_of(b)
    if not first:
        first, second = second, 0
    return qos | rap | first << 6, second if second != first else 0



class SubscriptionTree(Generic[S]):
    """Topic filter -> subscribers (each with the options of that subscription, ``options``:
    for MQTT 3.1.1 just its QoS), for routing."""

    __slots__ = ("_root", "_by_subscriber", "_entries", "_matched")

    def __init__(self) -> None:
        self._root: Node[dict[S, int]] = Node()
        # Reverse index: subscriber -> {filter: node where it ends}, so removing a
        # subscriber costs O(its filters) and nothing is ever left behind.
        self._by_subscriber: dict[S, dict[str, Node[dict[S, int]]]] = {}
        self._entries = 0
        # (topic, origin) -> what ``match`` answered, until the subscriptions change
        self._matched: dict[tuple[str, S | None],
                            tuple[dict[S, int], dict[S, list[int]] | None]] = {}

    def __len__(self) -> int:
        """Number of (subscriber, filter) entries."""
        return self._entries

    def node_count(self) -> int:
        return self._root.count()

    def add(self, topic_filter: str, subscriber: S, qos: int) -> None:
        """Subscribe; subscribing again to the same filter replaces the options (``qos``:
        the packed ``options``, the QoS alone for a plain subscription)."""
        node = self._root
        for level in parse_filter(topic_filter):
            node = node.child(level)
        self._matched.clear()
        if node.value is None:
            node.value = {}
        if subscriber not in node.value:
            self._entries += 1
        node.value[subscriber] = qos
        self._by_subscriber.setdefault(subscriber, {})[topic_filter] = node

    def remove(self, topic_filter: str, subscriber: S) -> bool:
        """Unsubscribe one filter; False if it was not subscribed."""
        filters = self._by_subscriber.get(subscriber)
        node = filters.pop(topic_filter, None) if filters is not None else None
        if node is None:
            return False
        self._matched.clear()
        if not filters:
            del self._by_subscriber[subscriber]
        self._forget(node, subscriber)
        self._entries -= 1
        return True

    def remove_subscriber(self, subscriber: S) -> int:
        """Drop every filter of a subscriber (session gone); returns how many."""
        filters = self._by_subscriber.pop(subscriber, None)
        if not filters:
            return 0
        self._matched.clear()
        for node in filters.values():
            self._forget(node, subscriber)
        self._entries -= len(filters)
        return len(filters)

    @staticmethod
    def _forget(node: Node[dict[S, int]], subscriber: S) -> None:
        subscribers = node.value
        assert subscribers is not None
        del subscribers[subscriber]
        if not subscribers:
            node.value = None
            node.prune()

    def has(self, topic_filter: str, subscriber: S) -> bool:
        return topic_filter in self._by_subscriber.get(subscriber, ())

    def count_of(self, subscriber: S) -> int:
        """How many filters the subscriber holds."""
        return len(self._by_subscriber.get(subscriber, ()))

    def filters_of(self, subscriber: S) -> dict[str, int]:
        """The subscriber's filters and their QoS."""
        out: dict[str, int] = {}
        for topic_filter, node in self._by_subscriber.get(subscriber, {}).items():
            assert node.value is not None
            out[topic_filter] = node.value[subscriber]
        return out

    def match(self, topic: str, origin: S | None = None,
              ) -> tuple[dict[S, int], dict[S, list[int]] | None]:
        """Subscribers whose filters match ``topic``, each once (MQTT-3.3.5-1), with the
        options of its subscription (``Options``); a subscriber matching several gets
        the highest QoS and Retain As Published of any, and the subscription identifiers
        of all: the first in its options, the others in the second dict (None when no
        subscriber has more than one). ``origin`` (the publisher) does not get what it
        subscribed to with No Local (MQTT-3.8.3-3). The answer is remembered until the
        subscriptions change: callers do not change it."""
        matched = self._matched
        found = matched.get((topic, origin))
        if found is not None:
            return found
        result: dict[S, int] = {}
        more: dict[S, list[int]] | None = None
        for node in match_nodes(self._root, topic.split("/")):
            subscribers = node.value
            if subscribers is None:
                continue
            for subscriber, value in subscribers.items():
                if value & NO_LOCAL and subscriber == origin:
                    continue
                old = result.get(subscriber)
                if old is None:
                    result[subscriber] = value
                elif old <= 3 and value <= 3:  # plain QoS both: the highest
                    if value > old:
                        result[subscriber] = value
                else:
                    merged, extra = merge_options(old, value)
                    result[subscriber] = merged
                    if extra:
                        more = more if more is not None else {}
                        more.setdefault(subscriber, []).append(extra)
        if len(matched) >= MATCHES_KEPT:
            matched.clear()
        matched[(topic, origin)] = result, more
        return result, more


# -------------------------------------------------------------------- RetainedStore


class RetainedStore(Generic[V]):
    """Retained values by topic, looked up by filter (``matching("losant/ID/#")``
    visits only the ``losant/ID`` subtree). An empty retained payload deleting the
    message is the caller's rule: here ``delete`` is explicit."""

    __slots__ = ("_root", "_count")

    def __init__(self) -> None:
        self._root: Node[tuple[str, V]] = Node()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def node_count(self) -> int:
        return self._root.count()

    def get(self, topic: str) -> V | None:
        node = self._root.find(topic.split("/"))
        return node.value[1] if node is not None and node.value is not None else None

    def __contains__(self, topic: object) -> bool:
        return isinstance(topic, str) and self.get(topic) is not None

    def set(self, topic: str, value: V) -> None:
        node = self._root
        for level in topic.split("/"):
            node = node.child(level)  # topic names hold no wildcard: always literal
        if node.value is None:
            self._count += 1
        node.value = (topic, value)

    def delete(self, topic: str) -> bool:
        node = self._root.find(topic.split("/"))
        if node is None or node.value is None:
            return False
        node.value = None
        self._count -= 1
        node.prune()
        return True

    def items(self) -> Iterator[tuple[str, V]]:
        yield from _subtree(self._root)

    def matching(self, topic_filter: str) -> Iterator[tuple[str, V]]:
        """(topic, value) for every retained topic the filter matches (§4.7 rules).

        Lazy and safe against changes between steps (the caller may await in between):
        each node's children are copied when it is visited, and a value is read when it
        is yielded, so a topic deleted meanwhile is skipped and a replaced one yields its
        new value. Topics added meanwhile may or may not be seen.
        """
        levels = parse_filter(topic_filter)
        # Explicit stack: a filter may have thousands of levels.
        stack: list[tuple[Node[tuple[str, V]], int]] = [(self._root, 0)]
        while stack:
            node, index = stack.pop()
            if index == len(levels):
                if node.value is not None:
                    yield node.value
                continue
            level = levels[index]
            first = index == 0
            if level == HASH:
                # Everything below, and the parent itself ("a/#" matches "a").
                if node.value is not None:
                    yield node.value
                for found in list(node.children.values()):
                    if not (first and is_system(found.key)):
                        yield from _subtree(found)
            elif level == PLUS:
                for found in node.children.values():
                    if not (first and is_system(found.key)):
                        stack.append((found, index + 1))
            else:
                literal = node.children.get(level)
                if literal is not None:
                    stack.append((literal, index + 1))


def _subtree(start: Node[tuple[str, V]]) -> Iterator[tuple[str, V]]:
    stack = [start]
    while stack:
        node = stack.pop()
        if node.value is not None:
            yield node.value
        stack.extend(node.children.values())
