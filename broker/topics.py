"""MQTT 3.1.1 topic names and topic filters (§4.7): validation, matching, set relations.

Two kinds of question, two kinds of function (spec §3):

* ``topic_matches(filter, topic)`` — does this filter match this concrete topic?
  Used for PUBLISH and for every delivery.
* ``filter_within(inner, outer)`` / ``filters_overlap(a, b)`` — relations between two
  *filters* (every topic of one is a topic of the other / some topic is shared). Used
  for SUBSCRIBE decisions. A filter is not a topic: ``+`` in a filter is not the
  level ``"+"`` of a topic, so these are not ``topic_matches`` applied to a filter.

Everything here is pure, walks levels one by one and never uses regular expressions:
amqtt's regex matcher had a ReDoS advisory (GHSA-2hjf-7455-w946). Matching costs
O(number of levels); the set relations walk both filters once; ``FilterSet`` walks a
trie, so its cost follows the depth of the topic, not the number of filters.

The ``$`` rule (§4.7.2): a topic whose first level starts with ``$`` is never matched by
a filter whose first level is ``+`` or ``#``; only a literal first level matches it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from keystore.errors import ValidationError

MAX_TOPIC_BYTES = 65535
PLUS = "+"
HASH = "#"


def _check_utf8_length(value: str, what: str) -> None:
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates cannot be sent as MQTT UTF-8
        raise ValidationError(f"invalid {what} {value!r}: not valid UTF-8") from None
    if size == 0:
        raise ValidationError(f"invalid {what} {value!r}: must not be empty")
    if size > MAX_TOPIC_BYTES:
        raise ValidationError(
            f"invalid {what} {value[:40]!r}...: {size} bytes, at most {MAX_TOPIC_BYTES}"
        )
    if "\x00" in value:
        raise ValidationError(f"invalid {what} {value!r}: contains NUL")


def validate_topic_name(topic: str) -> str:
    """Return ``topic`` if it is a valid PUBLISH topic name, else raise ValidationError."""
    if not isinstance(topic, str):
        raise ValidationError(f"invalid topic {topic!r}: not a string")
    _check_utf8_length(topic, "topic")
    if PLUS in topic or HASH in topic:
        raise ValidationError(f"invalid topic {topic!r}: wildcards '+' and '#' not allowed")
    return topic


def parse_filter(topic_filter: str) -> tuple[str, ...]:
    """Validate a topic filter and return its levels.

    1–65535 UTF-8 bytes, no NUL, ``+``/``#`` only as whole levels, ``#`` only last.
    Raises ValidationError naming the value and the reason.
    """
    if not isinstance(topic_filter, str):
        raise ValidationError(f"invalid topic filter {topic_filter!r}: not a string")
    _check_utf8_length(topic_filter, "topic filter")
    levels = tuple(topic_filter.split("/"))
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if level == HASH:
            if index != last:
                raise ValidationError(
                    f"invalid topic filter {topic_filter!r}: '#' must be the last level"
                )
        elif level != PLUS and (PLUS in level or HASH in level):
            raise ValidationError(
                f"invalid topic filter {topic_filter!r}: "
                f"'+' and '#' must occupy a whole level, got {level!r}"
            )
    return levels


def validate_filter(topic_filter: str) -> str:
    """Return ``topic_filter`` if valid (see ``parse_filter``), else raise ValidationError."""
    parse_filter(topic_filter)
    return topic_filter


def _is_wild(level: str) -> bool:
    return level == PLUS or level == HASH


# --------------------------------------------------------------------------- matching


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 §4.7 match of a (valid) filter against a (valid) topic name.

    ``#`` also matches the parent level (``a/#`` matches ``a``); ``+`` matches exactly
    one level, empty levels included; a leading ``/`` is an empty first level; a topic
    starting with ``$`` is not matched by a first level ``+`` or ``#``.
    Inputs are assumed validated (callers validate once, on the way in).
    """
    return levels_match(topic_filter.split("/"), topic.split("/"))


def levels_match(filter_levels: Sequence[str], topic_levels: Sequence[str]) -> bool:
    """``topic_matches`` on already split levels. Linear, no backtracking."""
    if topic_levels[0][:1] == "$" and _is_wild(filter_levels[0]):
        return False
    topic_depth = len(topic_levels)
    for index, level in enumerate(filter_levels):
        if level == HASH:
            # All previous levels matched, so the topic has >= index levels; '#' takes
            # the rest, including nothing (the parent).
            return True
        if index >= topic_depth:
            return False
        if level != PLUS and level != topic_levels[index]:
            return False
    return len(filter_levels) == topic_depth


# ------------------------------------------------------------------ filter relations


def filter_within(inner: str, outer: str) -> bool:
    """True iff every topic matched by ``inner`` is matched by ``outer`` (exact).

    Both must be valid filters. Mind ``$``: ``$SYS/x`` is not within ``#``.
    """
    return levels_within(parse_filter(inner), parse_filter(outer))


def _without_empty_parent(levels: Sequence[str]) -> Sequence[str]:
    """An equivalent filter whose '#' never stands for the empty topic name.

    ``#`` and ``/#`` would "match their parent", but that parent (no level / the single
    empty level) is ``""``, which is not a valid topic name. So over valid topics ``#``
    is ``+/#`` and ``/#`` is ``/+/#``; writing them so keeps the walks below exact.
    """
    if levels[-1] == HASH and (len(levels) == 1 or (len(levels) == 2 and levels[0] == "")):
        return (*levels[:-1], PLUS, HASH)
    return levels


def levels_within(inner: Sequence[str], outer: Sequence[str]) -> bool:
    if inner[0][:1] == "$" and _is_wild(outer[0]):
        return False  # outer's wildcard first level does not reach $ topics
    inner = _without_empty_parent(inner)
    for index, outer_level in enumerate(outer):
        if outer_level == HASH:
            return True  # takes whatever inner has left, including nothing
        if index >= len(inner):
            return False  # inner's topics end here; outer needs more levels
        inner_level = inner[index]
        if inner_level == HASH:
            return False  # inner reaches the parent and deeper; only '#' covers that
        if outer_level == PLUS:
            continue  # any single level of inner (literal or '+') fits
        if inner_level != outer_level:
            return False  # different literal, or '+' is wider than a literal
    return len(inner) == len(outer)


def filters_overlap(a: str, b: str) -> bool:
    """True iff some topic is matched by both filters (exact). Symmetric."""
    return levels_overlap(parse_filter(a), parse_filter(b))


def levels_overlap(a: Sequence[str], b: Sequence[str]) -> bool:
    a0, b0 = a[0], b[0]
    if (a0[:1] == "$" and _is_wild(b0)) or (b0[:1] == "$" and _is_wild(a0)):
        return False  # a $ topic is only reachable through a literal first level
    for index in range(min(len(a), len(b))):
        la, lb = a[index], b[index]
        if la == HASH or lb == HASH:
            return True  # '#' absorbs any instantiation of the other's rest
        if la != PLUS and lb != PLUS and la != lb:
            return False
    if len(a) == len(b):
        return True
    longer = a if len(a) > len(b) else b
    shorter_depth = min(len(a), len(b))
    # The shorter one ends; the longer must accept that very topic: only '#' (parent),
    # and not when that topic would be the single empty level "" (not a topic name).
    return longer[shorter_depth] == HASH and not (shorter_depth == 1 and longer[0] == "")


def filter_intersection(a: str, b: str) -> str | None:
    """The filter matching exactly the topics matched by both, or None if there are none.

    MQTT filters are closed under intersection (level by level: literal∩'+' = literal,
    X∩'#' = X's rest), which makes some SUBSCRIBE reasoning easy to state and test.
    """
    result = levels_intersection(parse_filter(a), parse_filter(b))
    return None if result is None else "/".join(result)


def levels_intersection(a: Sequence[str], b: Sequence[str]) -> tuple[str, ...] | None:
    if not levels_overlap(a, b):
        return None
    out: list[str] = []
    for index in range(max(len(a), len(b))):
        la = a[index] if index < len(a) else None
        lb = b[index] if index < len(b) else None
        if la == HASH:
            out.extend(b[index:])
            return tuple(out) if out else (HASH,)
        if lb == HASH:
            out.extend(a[index:])
            return tuple(out) if out else (HASH,)
        assert la is not None and lb is not None  # noqa: S101 — guaranteed by overlap
        out.append(lb if la == PLUS else la)
    return tuple(out)


# ------------------------------------------------------------------------ FilterSet


class _Node:
    """One trie level: literal children, a '+' child, and flags for filters ending here."""

    __slots__ = ("children", "plus", "end", "hash")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.plus: _Node | None = None
        self.end = False  # a member filter ends exactly here
        self.hash = False  # a member filter is "<path to here>/#"


_ABSORB = _Node()  # search state: a member's '#' has taken over (accepts any rest)
# (member node, filter index, topic depth, T still spelling the prefix, T == "" so far)
_SearchState = tuple[_Node, int, int, bool, bool]


class FilterSet:
    """An immutable set of topic filters compiled into a trie over levels.

    ``matches`` costs O(topic depth × trie width at that depth), independent of the
    number of unrelated filters; it is the per-message check of a session policy.
    """

    __slots__ = ("filters", "_root")

    filters: tuple[str, ...]
    _root: _Node

    def __init__(self, filters: Iterable[str] = ()) -> None:
        unique = tuple(dict.fromkeys(filters))
        root = _Node()
        for topic_filter in unique:
            node = root
            levels = parse_filter(topic_filter)
            for level in levels:
                if level == HASH:
                    node.hash = True
                    break
                if level == PLUS:
                    if node.plus is None:
                        node.plus = _Node()
                    node = node.plus
                else:
                    child = node.children.get(level)
                    if child is None:
                        child = node.children[level] = _Node()
                    node = child
            else:
                node.end = True
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
        """True iff some member filter matches the topic given as its levels."""
        root = self._root
        dollar = topic_levels[0][:1] == "$"
        if root.hash and not dollar:
            return True
        nodes = [root]
        first = True
        for level in topic_levels:
            following: list[_Node] = []
            for node in nodes:
                child = node.children.get(level)
                if child is not None:
                    if child.hash:
                        return True  # "<path>/#" takes the rest, including nothing
                    following.append(child)
                plus = node.plus
                if plus is not None and not (first and dollar):
                    if plus.hash:
                        return True
                    following.append(plus)
            if not following:
                return False
            nodes = following
            first = False
        for node in nodes:
            if node.end:
                return True
        return False

    # -- SUBSCRIBE-time relations ---------------------------------------------------

    def covers(self, topic_filter: str) -> bool:
        """True iff ``topic_filter`` lies within a single member filter (exact per member).

        A filter within the *union* of several members but within none of them alone is
        not covered; callers needing "entirely excluded" are thereby conservative.
        """
        levels = _without_empty_parent(parse_filter(topic_filter))
        root = self._root
        dollar = levels[0][:1] == "$"
        stack: list[tuple[_Node, int]] = [(root, 0)]
        while stack:
            node, index = stack.pop()
            if node.hash and not (index == 0 and dollar):
                return True
            if index == len(levels):
                if node.end:
                    return True
                continue
            level = levels[index]
            if level == HASH:
                continue  # only a member '#' right here covers it (checked above)
            if level == PLUS:
                if node.plus is not None:
                    stack.append((node.plus, index + 1))
                continue
            child = node.children.get(level)
            if child is not None:
                stack.append((child, index + 1))
            if node.plus is not None and not (index == 0 and dollar):
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
            if not member_absorbs and node.hash:
                stack.append((_ABSORB, f_index, depth, on_prefix, empty))
            filter_absorbs = f_index < filter_depth and levels[f_index] == HASH
            if (
                depth >= 1
                and not empty  # "" is not a topic name
                and (f_index == filter_depth or filter_absorbs)
                and (member_absorbs or node.end or node.hash)
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
                for value, child in node.children.items():
                    if depth == 0 and value[:1] == "$":
                        continue  # a filter wildcard never reaches a '$' first level
                    stack.append(
                        (
                            child,
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
            member_wild_ok = not (depth == 0 and filter_level[:1] == "$")
            if member_absorbs:
                if member_wild_ok:
                    stack.append((_ABSORB, *step))
                continue
            literal_child = node.children.get(filter_level)
            if literal_child is not None:
                stack.append((literal_child, *step))
            if node.plus is not None and member_wild_ok:
                stack.append((node.plus, *step))
        return False
