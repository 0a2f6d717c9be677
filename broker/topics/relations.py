"""Two kinds of question about topics, two kinds of function (docs/topics.md):

* ``topic_matches(filter, topic)`` — does this filter match this concrete topic?
  Used for PUBLISH and for every delivery.
* ``filter_within(inner, outer)`` / ``filters_overlap(a, b)`` — relations between two
  *filters* (every topic of one is a topic of the other / some topic is shared). Used
  for SUBSCRIBE decisions. A filter is not a topic: ``+`` in a filter is not the
  level ``"+"`` of a topic, so these are not ``topic_matches`` applied to a filter.

Pure, level by level, never regular expressions (amqtt's regex matcher had a ReDoS
advisory, GHSA-2hjf-7455-w946): matching costs O(levels); the relations walk both
filters once.
"""

from __future__ import annotations

from collections.abc import Sequence

from keystore.topics import HASH, PLUS, is_system, is_wildcard, parse_filter

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
    if is_system(topic_levels[0]) and is_wildcard(filter_levels[0]):
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


def without_empty_parent(levels: Sequence[str]) -> Sequence[str]:
    """An equivalent filter whose '#' never stands for the empty topic name.

    ``#`` and ``/#`` would "match their parent", but that parent (no level / the single
    empty level) is ``""``, which is not a valid topic name. So over valid topics ``#``
    is ``+/#`` and ``/#`` is ``/+/#``; writing them so keeps the walks below exact.
    """
    if levels[-1] == HASH and (len(levels) == 1 or (len(levels) == 2 and levels[0] == "")):
        return (*levels[:-1], PLUS, HASH)
    return levels


def levels_within(inner: Sequence[str], outer: Sequence[str]) -> bool:
    if is_system(inner[0]) and is_wildcard(outer[0]):
        return False  # outer's wildcard first level does not reach $ topics
    inner = without_empty_parent(inner)
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
    if (is_system(a0) and is_wildcard(b0)) or (is_system(b0) and is_wildcard(a0)):
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
