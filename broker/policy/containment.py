"""SUBSCRIBE by containment, for engines that authorise a filter once (docs/cluster.md).

The daemon grants a filter that can match at least one readable topic and then checks
every delivery (``check_subscribe`` + ``check_receive``). RabbitMQ and EMQX ask about a
filter once, at SUBSCRIBE, and then deliver whatever it matches, so there a filter is
granted only when **every** topic it can match is readable by the session. "Every topic"
means every topic a message can be published to: no session may publish to ``$`` topics
nor to the prefix's own levels (``P``, ``P/``, ``P//...``), so those carry nothing and
are left out (``P/+/x`` is not refused for matching ``P//x``).

Exact for device topics; for custom topics conservative where exactness would need the
union of several list filters: under ``only`` the filter must lie within one filter of
the subscribe list (a filter within the union of two is refused), under ``except`` it
must share no topic with any excepted filter (exact).
"""

from __future__ import annotations

from broker.policy.decisions import (
    ALLOW_CUSTOM_ALL,
    ALLOW_DEVICE,
    ALLOW_IN_LIST,
    ALLOW_NOT_IN_EXCEPT,
    DENY_DEVICE_PREFIX,
    DENY_IN_EXCEPT,
    DENY_MODE_NONE,
    DENY_NOT_IN_LIST,
    DENY_NOT_IN_SCOPE,
    Decision,
    SessionPolicy,
    filter_levels,
)
from broker.topics import HASH, PLUS
from keystore.models import TopicMode


def check_subscribe_within(policy: SessionPolicy, topic_filter: str) -> Decision:
    """Grant ``topic_filter`` iff every topic it can match that can carry a message is
    readable by this session (see the module docstring)."""
    levels = filter_levels(policy, topic_filter)  # no wildcard: contained iff readable
    if isinstance(levels, Decision):
        return levels
    device = _device_part(policy, levels)
    if device is not None and not device.allowed:
        return device
    custom = _custom_part(policy, topic_filter, levels)
    if custom is not None:
        return custom
    # Only the prefix's own levels (e.g. "P/" + "/#"): nothing can be published there.
    return device if device is not None else DENY_DEVICE_PREFIX


def _device_part(policy: SessionPolicy, levels: tuple[str, ...]) -> Decision | None:
    """Are all the device topics ``P/<id>[/...]`` the filter matches readable? None when
    it matches none (no wildcard or P first, or only P itself / the empty id)."""
    scope = policy.scope
    first = levels[0]
    if first == HASH:
        return ALLOW_DEVICE if scope is None else DENY_NOT_IN_SCOPE  # every id
    if (first != PLUS and first != policy.device_prefix) or len(levels) == 1:
        return None
    id_level = levels[1]
    if id_level == PLUS or id_level == HASH:
        return ALLOW_DEVICE if scope is None else DENY_NOT_IN_SCOPE  # every id
    if not id_level:
        return None  # P//...: no device has the empty id
    return ALLOW_DEVICE if scope is None or id_level in scope else DENY_NOT_IN_SCOPE


def _custom_part(policy: SessionPolicy, topic_filter: str,
                 levels: tuple[str, ...]) -> Decision | None:
    """Are all the custom topics (first level not P) the filter matches readable? None
    when it matches none (its first level is P)."""
    if levels[0] == policy.device_prefix:
        return None
    mode = policy.topic_mode
    if mode is TopicMode.NONE:
        return DENY_MODE_NONE
    if mode is TopicMode.ALL:
        return ALLOW_CUSTOM_ALL
    if mode is TopicMode.ONLY:
        return ALLOW_IN_LIST if policy.sub.covers(topic_filter) else DENY_NOT_IN_LIST
    excepted = policy.sub.shares_topic(levels, (policy.device_prefix,))
    return DENY_IN_EXCEPT if excepted else ALLOW_NOT_IN_EXCEPT
