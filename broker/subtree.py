"""Subscription index and retained-message store, both tries over topic levels.

Routing a PUBLISH walks the topic's levels through the subscription trie (literal
child, ``+`` child, ``#`` leaf at each level), so its cost follows the depth of the
topic and the number of *matching* branches, not the number of subscriptions — the
shape of aiomqtt's SubscriptionTree and of mosquitto. Likewise a SUBSCRIBE walks the
retained trie with its filter instead of scanning every retained topic.

Pure data structures: no I/O, no locking (one event loop owns them). Filters given to
``add`` are validated; topics given to ``match``/``set`` are assumed valid (the broker
validates PUBLISH topics once, on the way in).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

from .topics import HASH, PLUS, parse_filter

S = TypeVar("S", bound=Hashable)
V = TypeVar("V")


class _SubNode(Generic[S]):
    __slots__ = ("children", "plus", "hash", "subscribers", "parent", "key")

    def __init__(self, parent: _SubNode[S] | None, key: str) -> None:
        self.children: dict[str, _SubNode[S]] = {}
        self.plus: _SubNode[S] | None = None
        self.hash: _SubNode[S] | None = None  # leaf holding "<path>/#" subscribers
        self.subscribers: dict[S, int] = {}  # subscriber -> QoS of the filter ending here
        self.parent = parent
        self.key = key  # literal level, or PLUS / HASH for those children

    def is_empty(self) -> bool:
        return not (self.subscribers or self.children or self.plus or self.hash)


def _merge(into: dict[S, int], subscribers: dict[S, int]) -> None:
    # One delivery per subscriber at the highest QoS of its matching filters
    # (MQTT-3.3.5-1).
    for subscriber, qos in subscribers.items():
        if into.get(subscriber, -1) < qos:
            into[subscriber] = qos


class SubscriptionTree(Generic[S]):
    """Topic filter -> subscribers index for message routing."""

    __slots__ = ("_root", "_by_subscriber", "_entries")

    def __init__(self) -> None:
        self._root: _SubNode[S] = _SubNode(None, "")
        # Reverse index: subscriber -> {filter: node where it ends}, so removing a
        # subscriber costs O(its filters) and nothing is ever left behind.
        self._by_subscriber: dict[S, dict[str, _SubNode[S]]] = {}
        self._entries = 0

    def __len__(self) -> int:
        """Number of (subscriber, filter) entries."""
        return self._entries

    def node_count(self) -> int:
        """Number of trie nodes including the root (1 when empty: proof of pruning)."""
        count = 0
        stack = [self._root]
        while stack:
            node = stack.pop()
            count += 1
            stack.extend(node.children.values())
            if node.plus is not None:
                stack.append(node.plus)
            if node.hash is not None:
                stack.append(node.hash)
        return count

    def add(self, topic_filter: str, subscriber: S, qos: int) -> None:
        """Subscribe; subscribing again to the same filter replaces the QoS."""
        levels = parse_filter(topic_filter)
        node = self._root
        for level in levels:
            if level == HASH:
                if node.hash is None:
                    node.hash = _SubNode(node, HASH)
                node = node.hash
            elif level == PLUS:
                if node.plus is None:
                    node.plus = _SubNode(node, PLUS)
                node = node.plus
            else:
                child = node.children.get(level)
                if child is None:
                    child = node.children[level] = _SubNode(node, level)
                node = child
        if subscriber not in node.subscribers:
            self._entries += 1
        node.subscribers[subscriber] = qos
        self._by_subscriber.setdefault(subscriber, {})[topic_filter] = node

    def remove(self, topic_filter: str, subscriber: S) -> bool:
        """Unsubscribe one filter; False if it was not subscribed."""
        filters = self._by_subscriber.get(subscriber)
        if filters is None:
            return False
        node = filters.pop(topic_filter, None)
        if node is None:
            return False
        if not filters:
            del self._by_subscriber[subscriber]
        del node.subscribers[subscriber]
        self._entries -= 1
        self._prune(node)
        return True

    def remove_subscriber(self, subscriber: S) -> int:
        """Drop every filter of a subscriber (session gone); returns how many."""
        filters = self._by_subscriber.pop(subscriber, None)
        if not filters:
            return 0
        for node in filters.values():
            del node.subscribers[subscriber]
            self._prune(node)
        self._entries -= len(filters)
        return len(filters)

    def has(self, topic_filter: str, subscriber: S) -> bool:
        return topic_filter in self._by_subscriber.get(subscriber, ())

    def count_of(self, subscriber: S) -> int:
        """How many filters the subscriber holds."""
        return len(self._by_subscriber.get(subscriber, ()))

    def filters_of(self, subscriber: S) -> dict[str, int]:
        """The subscriber's filters and their QoS."""
        filters = self._by_subscriber.get(subscriber, {})
        return {f: node.subscribers[subscriber] for f, node in filters.items()}

    def _prune(self, node: _SubNode[S]) -> None:
        while node.parent is not None and node.is_empty():
            parent = node.parent
            if node.key == HASH:
                parent.hash = None
            elif node.key == PLUS and parent.plus is node:
                parent.plus = None
            else:
                del parent.children[node.key]
            node.parent = None
            node = parent

    def match(self, topic: str) -> dict[S, int]:
        """Subscribers whose filters match ``topic``, each once, at its highest QoS."""
        levels = topic.split("/")
        dollar = levels[0][:1] == "$"  # §4.7.2: no '+'/'#' first level for '$' topics
        result: dict[S, int] = {}
        nodes = [self._root]
        first = True
        for level in levels:
            following: list[_SubNode[S]] = []
            wild_ok = not (first and dollar)
            for node in nodes:
                if node.hash is not None and wild_ok:
                    _merge(result, node.hash.subscribers)
                child = node.children.get(level)
                if child is not None:
                    following.append(child)
                if node.plus is not None and wild_ok:
                    following.append(node.plus)
            if not following:
                return result
            nodes = following
            first = False
        for node in nodes:
            _merge(result, node.subscribers)
            if node.hash is not None:
                _merge(result, node.hash.subscribers)  # "a/#" matches "a"
        return result


# -------------------------------------------------------------------- retained store


class _TopicNode(Generic[V]):
    __slots__ = ("children", "parent", "level", "topic", "value", "has_value")

    def __init__(self, parent: _TopicNode[V] | None, level: str) -> None:
        self.children: dict[str, _TopicNode[V]] = {}
        self.parent = parent
        self.level = level
        self.topic = ""
        self.value: V | None = None
        self.has_value = False


class RetainedStore(Generic[V]):
    """Retained messages by topic, looked up by filter through a trie over levels.

    ``matching("losant/ID/#")`` visits only the ``losant/ID`` subtree. The MQTT rule that
    an empty retained payload deletes is the caller's: here ``delete`` is explicit.
    """

    __slots__ = ("_root", "_count")

    def __init__(self) -> None:
        self._root: _TopicNode[V] = _TopicNode(None, "")
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def node_count(self) -> int:
        count = 0
        stack = [self._root]
        while stack:
            node = stack.pop()
            count += 1
            stack.extend(node.children.values())
        return count

    def _find(self, topic: str) -> _TopicNode[V] | None:
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                return None
            node = child
        return node

    def get(self, topic: str) -> V | None:
        node = self._find(topic)
        return node.value if node is not None and node.has_value else None

    def __contains__(self, topic: object) -> bool:
        if not isinstance(topic, str):
            return False
        node = self._find(topic)
        return node is not None and node.has_value

    def set(self, topic: str, value: V) -> None:
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _TopicNode(node, level)
            node = child
        if not node.has_value:
            self._count += 1
        node.topic, node.value, node.has_value = topic, value, True

    def delete(self, topic: str) -> bool:
        node = self._find(topic)
        if node is None or not node.has_value:
            return False
        node.value, node.has_value = None, False
        self._count -= 1
        while node.parent is not None and not node.has_value and not node.children:
            parent = node.parent
            del parent.children[node.level]
            node.parent = None
            node = parent
        return True

    def items(self) -> Iterator[tuple[str, V]]:
        yield from self._subtree(self._root)

    def matching(self, topic_filter: str) -> Iterator[tuple[str, V]]:
        """(topic, value) for every retained topic the filter matches (§4.7 rules).

        Lazy and safe against changes between steps (the caller may await in between):
        each node's children are copied when it is visited, and a value is read when it
        is yielded, so a topic deleted meanwhile is skipped and a replaced one yields its
        new value. Topics added meanwhile may or may not be seen.
        """
        levels = parse_filter(topic_filter)
        # Explicit stack: a filter may have thousands of levels.
        stack: list[tuple[_TopicNode[V], int]] = [(self._root, 0)]
        while stack:
            node, index = stack.pop()
            if index == len(levels):
                if node.has_value:
                    yield node.topic, node.value  # type: ignore[misc]
                continue
            level = levels[index]
            first = index == 0
            if level == HASH:
                # Everything below, and the parent itself ("a/#" matches "a").
                if node.has_value:
                    yield node.topic, node.value  # type: ignore[misc]
                for child in list(node.children.values()):
                    if first and child.level[:1] == "$":
                        continue
                    yield from self._subtree(child)
            elif level == PLUS:
                for child in node.children.values():
                    if first and child.level[:1] == "$":
                        continue
                    stack.append((child, index + 1))
            else:
                literal_child = node.children.get(level)
                if literal_child is not None:
                    stack.append((literal_child, index + 1))

    @staticmethod
    def _subtree(start: _TopicNode[V]) -> Iterator[tuple[str, V]]:
        stack = [start]
        while stack:
            node = stack.pop()
            if node.has_value:
                yield node.topic, node.value  # type: ignore[misc]
            stack.extend(node.children.values())
