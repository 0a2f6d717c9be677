"""Shared subscriptions: ``$share/GROUP/FILTER`` (MQTT 5 §4.8.2; MQTT 3.1.1 clients may use
them too). Each message matching FILTER goes to one member of GROUP, not to each.

* A group lives in one application (its key is mounted like every topic), so groups
  never span tenants. In the subscription trie a group is one subscriber, whose id
  starts with NUL (no client id can) and names the application, the group and the filter.
* A member joins with a SUBSCRIBE checked like any other (the filter against its key);
  each message is offered to the members in turn, and goes to the first whose grant may
  read it (the delivery-time check: a member that may not read it is skipped, not sent)
  and, among those, preferably one that is online and not past its bounds; when no
  member is online it is queued for one, within that session's bounds.
* Members leaving do not lose the group's QoS 1/2 messages: what waits for a member that
  goes offline, or whose session ends, goes to the others (what it has in flight too,
  when its session ends). Retained messages are not sent for a shared subscription
  (§4.8.2: "Retained messages are not sent to the Session when it subscribes to a
  Shared Subscription"), and No Local is a
  protocol error on one (MQTT-3.8.3-4).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from amqtt.contexts import Action

from broker.mqtt.outbox import MessageProps, OutMessage
from broker.mqtt.session import KeySession

SHARE_PREFIX = "$share/"
SHARE_MARK = "\x00"  # first character of a group's subscriber id in the trie


def parse_shared(topic_filter: str) -> tuple[str, str] | None:
    """(group, filter) of ``$share/GROUP/FILTER``; None for an ordinary filter. ValueError
    for a malformed one: a group must be a non-empty level without wildcards, and the
    filter non-empty (MQTT-4.8.2-1/2)."""
    if not topic_filter.startswith(SHARE_PREFIX):
        return None
    group, slash, inner = topic_filter[len(SHARE_PREFIX):].partition("/")
    if not group or "+" in group or "#" in group:
        raise ValueError(f"invalid shared subscription {topic_filter!r}: the group must be "
                         "a name without '+' or '#'")
    if not slash or not inner:
        raise ValueError(f"invalid shared subscription {topic_filter!r}: no topic filter "
                         "after the group")
    return group, inner


def group_key(mount: str, group: str, topic_filter: str) -> str:
    return f"{SHARE_MARK}{mount}{group}{SHARE_MARK}{topic_filter}"


class Group:
    __slots__ = ("members", "turn")

    def __init__(self) -> None:
        self.members: dict[str, int] = {}  # client id -> its subscription's options
        self.turn = 0  # where the next message starts looking (round robin)


class Delivery(Protocol):
    """What a group needs of the router to hand a message to its chosen member."""

    sessions: dict[str, KeySession]

    def enqueue(self, session: KeySession, message: OutMessage, source: Any = None,
                ) -> bool: ...

    def deliver_qos0(self, session: KeySession, topic: str, payload: bytes,
                     retain: bool, props: MessageProps | None, ids: tuple[int, ...],
                     source: Any = None) -> None: ...


class SharedSubscriptions:
    def __init__(self, delivery: Delivery, congested: Callable[[KeySession], bool]) -> None:
        self.delivery = delivery
        self.congested = congested  # past its bounds (broker.mqtt.flow)
        self.groups: dict[str, Group] = {}
        # client id -> the groups it is in (key -> its $share/... filter)
        self.of_session: dict[str, dict[str, str]] = {}

    def join(self, session: KeySession, key: str, topic_filter: str, packed: int) -> bool:
        """Add (or update) a member; True when the group is new (the caller adds it to
        the trie). ``topic_filter`` is the ``$share/...`` filter as the client gave it."""
        group = self.groups.get(key)
        new = group is None
        if group is None:
            group = self.groups[key] = Group()
        group.members[session.client_id] = packed
        self.of_session.setdefault(session.client_id, {})[key] = topic_filter
        return new

    def leave(self, client_id: str, key: str) -> tuple[bool, bool]:
        """(whether it was a member, whether the group is now empty and gone: the caller
        removes it from the trie)."""
        group = self.groups.get(key)
        if group is None or group.members.pop(client_id, None) is None:
            return False, False
        keys = self.of_session.get(client_id)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self.of_session[client_id]
        if group.members:
            return True, False
        del self.groups[key]
        return True, True

    def memberships(self, client_id: str) -> dict[str, str]:
        """Group key -> the ``$share/...`` filter, for each group the session is in."""
        return dict(self.of_session.get(client_id, {}))

    def options_of(self, client_id: str, key: str) -> int:
        group = self.groups.get(key)
        return group.members.get(client_id, 0) if group is not None else 0

    def _candidates(self, group: Group) -> Iterator[str]:
        members = list(group.members)
        start = group.turn % len(members)
        group.turn = start + 1
        yield from members[start:]
        yield from members[:start]

    def choose(self, key: str, topic: str, exclude: str | None = None,
               ) -> tuple[KeySession, int] | None:
        """The member to give a message to, and its options: in turn, the first that may
        read it and is online and not past its bounds; else the first online; else the
        first offline that keeps its session. None when no member may read it."""
        group = self.groups.get(key)
        if group is None or not group.members:
            return None
        sessions = self.delivery.sessions
        online = offline = None
        for client_id in self._candidates(group):
            if client_id == exclude:
                continue
            session = sessions.get(client_id)
            if session is None or not session.decide(topic, Action.RECEIVE).allowed:
                continue
            if session.link is not None and not session.kicked:
                if not self.congested(session):
                    return session, group.members[client_id]
                online = online or (session, group.members[client_id])
            elif not session.clean_session:
                offline = offline or (session, group.members[client_id])
        return online or offline

    def route(self, key: str, topic: str, payload: bytes, qos: int, _packed: int,
              source: Any, retain: bool, props: MessageProps | None) -> bool:
        """Give one message to one member; False when no member may read it."""
        chosen = self.choose(key, topic)
        if chosen is None:
            return False
        session, packed = chosen
        ids = (packed >> 6,) if packed >> 6 else ()
        if qos and packed & 3:
            self.delivery.enqueue(session, OutMessage(topic, payload, min(qos, packed & 3),
                                                      False, props, ids, key), source)
        elif session.link is not None:
            self.delivery.deliver_qos0(session, topic, payload, False, props, ids, source)
        return True

    def hand_over(self, session: KeySession, messages: list[OutMessage]) -> int:
        """Messages of groups that ``session`` can no longer take (it went offline, or its
        session ended) go to other members; returns how many found one."""
        moved = 0
        for message in messages:
            key = message.share
            if key is None:
                continue
            chosen = self.choose(key, message.topic, exclude=session.client_id)
            if chosen is None:
                continue
            member, packed = chosen
            ids = (packed >> 6,) if packed >> 6 else ()
            if packed & 3:
                moved += self.delivery.enqueue(member, OutMessage(
                    message.topic, message.payload, min(message.qos, packed & 3), False,
                    message.props, ids, key))
            elif member.link is not None:
                self.delivery.deliver_qos0(member, message.topic, message.payload, False,
                                           message.props, ids, None)
                moved += 1
        return moved
