"""Access decisions (docs/access.md: CONNECT steps 3–7, topics): pure functions over
frozen values.

No I/O, no awaits, no amqtt: the broker plugins translate a packet into these inputs,
call one function and act on the returned ``Decision``. A ``SessionPolicy`` is built
once at CONNECT (scope fixed, custom-topic filters compiled) and every per-message check
is then an in-memory lookup.

Topic classes with device prefix ``P`` and scope ``S``:

* device topics ``P/<id>`` and ``P/<id>/...`` with ``<id>`` in S (S None = any id):
  allowed both ways;
* every other topic under ``P`` (``P`` itself, ``P/``, ``P//x``, ids out of scope):
  denied whatever the topic mode;
* topics starting with ``$``: never publishable, never delivered, not subscribable;
* custom topics (the rest): by topic mode — publish uses the publish list, subscribe
  and delivery use the subscribe list.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from netaddr import IPSet

from broker.policy.addresses import compile_addresses, parse_ip
from broker.topics import (
    HASH,
    PLUS,
    FilterSet,
    device_of,
    is_system,
    is_topic_name,
    parse_filter,
    validate_device_prefix,
)
from keystore.errors import ValidationError
from keystore.models import AccessKey, AddressMode, KeyStatus, TopicMode


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


# Shared instances: the hot path returns one of these and allocates nothing.
ALLOW_DEVICE = Decision(True, "device_topic")
ALLOW_CUSTOM_ALL = Decision(True, "custom_all")
ALLOW_IN_LIST = Decision(True, "in_list")
ALLOW_NOT_IN_EXCEPT = Decision(True, "not_in_except_list")
DENY_NOT_IN_SCOPE = Decision(False, "not_in_scope")
DENY_DEVICE_PREFIX = Decision(False, "device_prefix")
DENY_DOLLAR = Decision(False, "dollar_topic")
DENY_MODE_NONE = Decision(False, "topic_mode_none")
DENY_NOT_IN_LIST = Decision(False, "not_in_list")
DENY_IN_EXCEPT = Decision(False, "in_except_list")
DENY_INVALID_TOPIC = Decision(False, "invalid_topic")
DENY_INVALID_FILTER = Decision(False, "invalid_filter")

ALLOW = Decision(True, "ok")
DENY_INACTIVE = Decision(False, "inactive")
DENY_EXPIRED = Decision(False, "expired")
DENY_UNKNOWN_DEVICE = Decision(False, "unknown_device")
DENY_DEVICE_NOT_IN_SCOPE = Decision(False, "device_not_in_scope")
DENY_IP = Decision(False, "ip_denied")
DENY_WILL = Decision(False, "will_denied")

ALLOW_IP_ANY = Decision(True, "ip_any")
ALLOW_IP_LISTED = Decision(True, "ip_in_list")
ALLOW_IP_NOT_EXCEPTED = Decision(True, "ip_not_in_except_list")
DENY_IP_NOT_LISTED = Decision(False, "ip_not_in_list")
DENY_IP_EXCEPTED = Decision(False, "ip_in_except_list")
DENY_IP_INVALID = Decision(False, "ip_invalid")

# Decisions a policy keeps per direction (SessionPolicy._publish, _receive), for topics
# of at most DECIDED_TOPIC_CHARS: a device uses a few topics; a key's worst case is a
# few KiB.
DECISIONS_KEPT = 32
DECIDED_TOPIC_CHARS = 128

# CONNACK return codes (MQTT 3.1.1 §3.2.2.3) by refusal reason: 3 = server unavailable,
# 4 = bad user name or password, 5 = not authorized. Steps 0–2 of docs/access.md#connect
# are decided by the caller.
CONNACK_SERVER_UNAVAILABLE = 3
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORIZED = 5
CONNACK_CODE: dict[str, int] = {
    "keystore_unavailable": CONNACK_SERVER_UNAVAILABLE,
    "no_credentials": CONNACK_BAD_CREDENTIALS,
    "unknown_key": CONNACK_BAD_CREDENTIALS,
    "bad_secret": CONNACK_BAD_CREDENTIALS,
    "banned": CONNACK_NOT_AUTHORIZED,
    "inactive": CONNACK_NOT_AUTHORIZED,
    "expired": CONNACK_NOT_AUTHORIZED,
    "unknown_device": CONNACK_NOT_AUTHORIZED,
    "device_not_in_scope": CONNACK_NOT_AUTHORIZED,
    "ip_denied": CONNACK_NOT_AUTHORIZED,
    "will_denied": CONNACK_NOT_AUTHORIZED,
}


# ------------------------------------------------------------------------- policy


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """What one session may publish, receive and subscribe; fixed at CONNECT."""

    device_prefix: str  # one literal topic level (broker.topics.validate_device_prefix)
    scope: frozenset[str] | None  # device ids; None = every device
    topic_mode: TopicMode
    pub: FilterSet
    sub: FilterSet
    _prefix_levels: tuple[str, ...] = field(init=False, repr=False, compare=False)
    # Decisions already taken, by topic (a device publishes to the same few topics over
    # and over): the policy never changes, so neither do they. Bounded: emptied when full.
    _publish: dict[str, Decision] = field(init=False, repr=False, compare=False)
    _receive: dict[str, Decision] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        validate_device_prefix(self.device_prefix)
        # Coerce so the hot path can compare modes by identity.
        object.__setattr__(self, "topic_mode", TopicMode(self.topic_mode))
        object.__setattr__(self, "_prefix_levels", (self.device_prefix,))
        object.__setattr__(self, "_publish", {})
        object.__setattr__(self, "_receive", {})

    @classmethod
    def build(
        cls, key: AccessKey, scope: frozenset[str] | None, device_prefix: str
    ) -> SessionPolicy:
        """Compile a key's custom-topic lists for a session with the given scope."""
        return cls(
            device_prefix=device_prefix,
            scope=None if scope is None else frozenset(scope),
            topic_mode=key.topic_mode,
            pub=FilterSet(key.pub_topics),
            sub=FilterSet(key.sub_topics),
        )


PolicyBuilder = Callable[[AccessKey, frozenset[str] | None, str], SessionPolicy]


class PolicyCache:
    """``SessionPolicy.build``, reused while the key's row and the resolved scope object
    are the same (the keystore keeps one scope object per generation): sessions of one
    key share one immutable policy instead of compiling the topic lists per CONNECT.
    Bounded; least recently used dropped first. ``build`` compiles a policy (another form
    of the key's lists, e.g. keybroker.authsvc's AMQP form, gets a cache of its own)."""

    def __init__(self, device_prefix: str, size: int = 4096,
                 build: PolicyBuilder | None = None) -> None:
        self.device_prefix = device_prefix
        self.size = size
        self.build: PolicyBuilder = build or SessionPolicy.build
        self._items: OrderedDict[tuple[str, datetime, int], SessionPolicy] = OrderedDict()

    def get(self, key: AccessKey, scope: frozenset[str] | None) -> SessionPolicy:
        identity = (key.key, key.updated_at, id(scope))
        cached = self._items.get(identity)
        # ``is``: an id can be reused once its object is gone.
        if cached is not None and cached.scope is scope:
            self._items.move_to_end(identity)
            return cached
        built = self.build(key, scope, self.device_prefix)
        self._items[identity] = built
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return built


def _classify_topic(policy: SessionPolicy, topic: str) -> Decision | None:
    """Decision for device-prefix, ``$`` and malformed topics; None for custom topics."""
    if not is_topic_name(topic):
        return DENY_INVALID_TOPIC
    if is_system(topic):
        return DENY_DOLLAR
    device_id = device_of(topic, policy.device_prefix)
    if device_id is None:
        return None
    if not device_id:
        return DENY_DEVICE_PREFIX  # "P", "P/" or "P//...": no device has the empty id
    scope = policy.scope
    if scope is None or device_id in scope:
        return ALLOW_DEVICE
    return DENY_NOT_IN_SCOPE


def _custom_topic(policy: SessionPolicy, filters: FilterSet, topic: str) -> Decision:
    mode = policy.topic_mode
    if mode is TopicMode.NONE:
        return DENY_MODE_NONE
    if mode is TopicMode.ALL:
        return ALLOW_CUSTOM_ALL
    listed = filters.matches(topic.split("/"))
    if mode is TopicMode.ONLY:
        return ALLOW_IN_LIST if listed else DENY_NOT_IN_LIST
    return DENY_IN_EXCEPT if listed else ALLOW_NOT_IN_EXCEPT


def check_publish(policy: SessionPolicy, topic: str) -> Decision:
    """May this session PUBLISH to ``topic``? (Also used for the Will topic.)"""
    decision = policy._publish.get(topic)
    return _decide(policy, policy._publish, policy.pub, topic) if decision is None else decision


def check_receive(policy: SessionPolicy, topic: str) -> Decision:
    """May a message on ``topic`` (retained included) be delivered to this session?"""
    decision = policy._receive.get(topic)
    return _decide(policy, policy._receive, policy.sub, topic) if decision is None else decision


def _decide(policy: SessionPolicy, decisions: dict[str, Decision], filters: FilterSet,
            topic: str) -> Decision:
    """A decision not remembered yet, for one direction (its remembered ``decisions`` and
    custom topic ``filters``)."""
    decision = _classify_topic(policy, topic)
    if decision is None:
        decision = _custom_topic(policy, filters, topic)
    _remember(decisions, topic, decision)
    return decision


def _remember(decisions: dict[str, Decision], topic: str, decision: Decision) -> None:
    if len(topic) > DECIDED_TOPIC_CHARS:
        return
    if len(decisions) >= DECISIONS_KEPT:
        decisions.clear()
    decisions[topic] = decision


# ---------------------------------------------------------------------- subscribe


def _device_part(policy: SessionPolicy, levels: tuple[str, ...]) -> Decision | None:
    """Can the filter match a readable device topic ``P/<id>[/...]``, id in scope?

    Returns ALLOW_DEVICE, a denial saying why the device part fails (when the filter
    reaches into the prefix at all), or None when it cannot reach the prefix.
    Exact: wildcards in the id position need one id in scope; a literal id must be in
    scope; anything after the id is readable.
    """
    scope = policy.scope
    first = levels[0]
    if first == HASH:
        # Reaches P/<id>/... for any id (and custom topics, decided elsewhere).
        return ALLOW_DEVICE if scope is None or scope else DENY_NOT_IN_SCOPE
    if first != PLUS and first != policy.device_prefix:
        return None
    if len(levels) == 1:
        return DENY_DEVICE_PREFIX  # matches only P itself
    id_level = levels[1]
    if id_level == PLUS or id_level == HASH:
        return ALLOW_DEVICE if scope is None or scope else DENY_NOT_IN_SCOPE
    if not id_level:
        return DENY_DEVICE_PREFIX  # P//...: no device has the empty id
    if scope is None or id_level in scope:
        return ALLOW_DEVICE
    return DENY_NOT_IN_SCOPE


def _reaches_custom(policy: SessionPolicy, levels: tuple[str, ...]) -> bool:
    """Can the filter (not starting with '$') match a topic outside ``P``/``P/...``?
    Exact: only a filter whose first level is P literally is confined to the prefix."""
    return levels[0] != policy.device_prefix


def _custom_subscribe(
    policy: SessionPolicy, topic_filter: str, levels: tuple[str, ...]
) -> Decision:
    """Can the filter match a readable custom topic? (not '$', not under P, by mode)"""
    if not _reaches_custom(policy, levels):
        return DENY_DEVICE_PREFIX
    mode = policy.topic_mode
    if mode is TopicMode.NONE:
        return DENY_MODE_NONE
    if mode is TopicMode.ALL:
        return ALLOW_CUSTOM_ALL
    if mode is TopicMode.ONLY:
        # A listed filter itself always reaches topics outside P (lists may not start with
        # '$' or the prefix), so subscribing to exactly a listed filter needs no search.
        if topic_filter in policy.sub.filters:
            return ALLOW_IN_LIST
        # Exact: some topic outside P matched by the filter and by a listed filter.
        if policy.sub.shares_topic(levels, policy._prefix_levels):
            return ALLOW_IN_LIST
        return DENY_NOT_IN_LIST
    # EXCEPT. Conservative toward granting: refused only when the filter lies within a
    # single excepted filter. A filter inside the union of several excepted filters (and
    # nowhere else readable) is granted but then delivers nothing: check_receive runs on
    # every message. Granting is never a leak; refusing a useful filter would be a bug.
    if policy.sub.covers(topic_filter):
        return DENY_IN_EXCEPT
    return ALLOW_NOT_IN_EXCEPT


def filter_levels(policy: SessionPolicy, topic_filter: str) -> Decision | tuple[str, ...]:
    """What every SUBSCRIBE rule starts with: the decision for a ``$`` filter, an invalid
    one or one without wildcards (it matches exactly one topic, readable or not: that is
    check_receive, and much cheaper), else the filter's levels."""
    if is_system(topic_filter):
        return DENY_DOLLAR
    if "+" not in topic_filter and "#" not in topic_filter:
        decision = check_receive(policy, topic_filter)
        return DENY_INVALID_FILTER if decision is DENY_INVALID_TOPIC else decision
    try:
        return parse_filter(topic_filter)
    except ValidationError:
        return DENY_INVALID_FILTER


def check_subscribe(policy: SessionPolicy, topic_filter: str) -> Decision:
    """Grant ``topic_filter`` iff it can match at least one topic this session may read.

    Granting is about usefulness, not protection: every delivery is checked by
    ``check_receive``, so ``#`` granted for device topics still never carries another
    scope's data.
    """
    levels = filter_levels(policy, topic_filter)
    if isinstance(levels, Decision):
        return levels
    device = _device_part(policy, levels)
    if device is ALLOW_DEVICE:
        return device
    custom = _custom_subscribe(policy, topic_filter, levels)
    if custom.allowed:
        return custom
    if device is not None and custom is DENY_DEVICE_PREFIX:
        return device  # confined to the prefix: say why the device part failed
    return custom


# ------------------------------------------------------------------- connection


def check_address(mode: AddressMode, networks: IPSet, ip: str) -> Decision:
    """Connection restriction. Never raises.

    With mode ``all`` the address is not consulted (even an unparsable one is allowed:
    the key restricts nothing). With ``only``/``except`` an unparsable address is denied.
    """
    if mode == AddressMode.ALL:
        return ALLOW_IP_ANY
    address = parse_ip(ip)
    if address is None:
        return DENY_IP_INVALID
    listed = address in networks
    if mode == AddressMode.ONLY:
        return ALLOW_IP_LISTED if listed else DENY_IP_NOT_LISTED
    return DENY_IP_EXCEPTED if listed else ALLOW_IP_NOT_EXCEPTED


def check_key_address(key: AccessKey, ip: str) -> Decision:
    """The key's connection restriction for a client address (at CONNECT, and again for
    live sessions when the key's restriction changes)."""
    if key.address_mode == AddressMode.ALL:
        return ALLOW_IP_ANY
    try:
        networks = compile_addresses(tuple(key.addresses))
    except ValidationError:
        return DENY_IP  # a stored address we cannot read: fail closed
    return check_address(key.address_mode, networks, ip)


@dataclass(frozen=True)
class ConnectFacts:
    """What the caller looked up for one CONNECT (after the credentials were accepted)."""

    key: AccessKey
    now: datetime
    device_registered: bool
    device_in_scope: bool
    client_ip: str
    will_topic: str | None


def check_connect(facts: ConnectFacts, policy: SessionPolicy | None) -> Decision:
    """Steps 3–8 of docs/access.md#connect in order; the first failure is the reason.

    ``policy`` is the session policy the connection would get; it is needed only for a
    Will topic. With a Will but no policy the connection is refused (fail closed).
    """
    key = facts.key
    if key.status != KeyStatus.ACTIVE:
        return DENY_INACTIVE
    if key.is_expired(facts.now):
        return DENY_EXPIRED
    if not facts.device_registered:
        return DENY_UNKNOWN_DEVICE
    if not facts.device_in_scope:
        return DENY_DEVICE_NOT_IN_SCOPE
    if not check_key_address(key, facts.client_ip).allowed:
        return DENY_IP
    if facts.will_topic is not None:
        if policy is None or not check_publish(policy, facts.will_topic).allowed:
            return DENY_WILL
    return ALLOW
