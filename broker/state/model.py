"""What a broker-state store holds, as plain rows (tuples, so a store can write them as
they are). Topics are as clients see them; ``mount`` is the application's prefix inside
the broker (broker.mqtt.plugins.mount_of). Nothing here is a secret: a session names
the public id of the key that last authenticated it, never its secret.

What MQTT 5 added comes last in each row, with the value an MQTT 3.1.1 row has as its
default: no properties (None), no subscription identifiers (""), no shared subscription
(None), the server's session expiry (None). Times are wall clock (``time.time()``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple


class RetainedRow(NamedTuple):
    mount: str
    topic: str
    payload: bytes
    qos: int
    bucket: str  # the quota bucket it is counted in: "k:<key id>" or "d:<device id>"
    props: bytes | None = None  # MQTT 5 properties carried to subscribers (MessageProps)
    expires: float | None = None  # Message Expiry; None: never


class SessionRow(NamedTuple):
    client_id: str
    mount: str
    key: str  # public id of the key that last authenticated the session
    listener: str
    client_ip: str
    peer_ip: str
    disconnected_at: float | None  # None: online when last saved
    inflight_in: str  # incoming QoS 2 packet ids awaiting PUBREL (``ids_text``)
    # Seconds it outlives its connection (MQTT 5 Session Expiry Interval, inf: never);
    # None: the server's session_expiry (MQTT 3.1.1)
    expiry: float | None = None


class SubscriptionRow(NamedTuple):
    client_id: str
    filter: str  # as the client gave it: ``$share/GROUP/FILTER`` for a shared one
    options: int  # QoS, No Local, Retain As Published, Retain Handling and subscription
    # identifier, packed as broker.topics.trie.options (MQTT 3.1.1: the QoS alone)


class MessageRow(NamedTuple):
    """An outgoing QoS 1/2 message of a persistent session, queued or in flight."""

    client_id: str
    seq: int  # order of arrival in its session: in-flight ones first, then waiting
    topic: str
    payload: bytes  # empty once a QoS 2 message is released (only PUBREL is owed)
    qos: int
    retain: bool
    packet_id: int  # 0 while waiting; the id it was sent with once in flight
    released: bool
    props: bytes | None = None  # MQTT 5 properties carried (None once released, too)
    expires: float | None = None  # Message Expiry; None: never
    sub_ids: str = ""  # MQTT 5 subscription identifiers it matched (``ids_text``)
    share: str | None = None  # the shared subscription's group key it came through


@dataclass(slots=True)
class StoredSession:
    row: SessionRow
    subscriptions: dict[str, int] = field(default_factory=dict)  # filter -> options
    messages: list[MessageRow] = field(default_factory=list)  # by seq


@dataclass(slots=True)
class Snapshot:
    """A whole saved state, as loaded at start."""

    retained: list[RetainedRow]
    sessions: list[StoredSession]
    position: int  # the keystore change feed's last row applied when it was saved

    @property
    def empty(self) -> bool:
        return not self.retained and not self.sessions


@dataclass(frozen=True, slots=True)
class Batch:
    """One flush: applied in one transaction, in this order."""

    dropped: tuple[str, ...] = ()  # client ids whose stored session goes entirely
    sessions: tuple[SessionRow, ...] = ()
    subscriptions: tuple[SubscriptionRow, ...] = ()
    unsubscribed: tuple[tuple[str, str], ...] = ()  # (client id, filter)
    messages: tuple[MessageRow, ...] = ()
    removed_messages: tuple[tuple[str, int], ...] = ()  # (client id, seq)
    retained: tuple[RetainedRow, ...] = ()
    removed_retained: tuple[tuple[str, str], ...] = ()  # (mount, topic)
    position: int | None = None  # None: unchanged

    def __len__(self) -> int:
        return (len(self.dropped) + len(self.sessions) + len(self.subscriptions)
                + len(self.unsubscribed) + len(self.messages) + len(self.removed_messages)
                + len(self.retained) + len(self.removed_retained))


def ids_text(ids: Iterable[int]) -> str:
    """Numbers (packet ids, subscription identifiers) as a row holds them."""
    return " ".join(str(number) for number in ids)


def ids_of(text: str) -> tuple[int, ...]:
    """The numbers of ``ids_text``, in order (anything else in the text is skipped)."""
    return tuple(int(word) for word in text.split() if word.isdecimal())
