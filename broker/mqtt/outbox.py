"""A session's outgoing QoS 1/2 messages: in flight, and waiting their turn (pure, no I/O).

MQTT 3.1.1 §4.3-4.4: a QoS 1/2 PUBLISH stays the server's responsibility until the client
acknowledges it (PUBACK; PUBREC then PUBCOMP), however long that takes, and when a
persistent session reconnects the server re-sends every unacknowledged PUBLISH with its
original packet id and DUP set, and every PUBREL (MQTT-4.4.0-1). amqtt kept that state in
a task per message that gave up after a 5 s timeout (the message was then lost) and did
not re-send on resume. Here it is plain data:

* ``inflight``: packet id -> message, in the order sent (at most ``window`` of them);
* ``waiting``: messages not yet sent, in arrival order — queued while the session is
  offline, or while the window is full. They are sent before anything newer, so
  messages queued while offline reach the client before later live ones.

Bounds are the caller's (count and bytes are kept here so that checking is O(1)).

A persistent session's outbox has a ``journal`` (broker.state saves it, written behind).
Messages are numbered in order of arrival (``seq``), so the journal takes the ones that
arrived since it last looked from the tail (``unsaved``) when it flushes, and is told
only of changes to messages it has already saved: a message acknowledged before the
next flush costs the journal nothing. A clean session's outbox has no journal.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol


class OutboxJournal(Protocol):
    def messages_added(self, outbox: Outbox) -> None:
        """The first message since the journal last took the new ones (``unsaved``)."""

    def message_changed(self, message: OutMessage) -> None:
        """A saved message was sent (packet id) or released (QoS 2)."""

    def message_removed(self, message: OutMessage) -> None:
        """A saved message is no longer held."""


class MessageProps:
    """What an MQTT 5 message carries beside its topic and payload: the properties its
    subscribers get as they came (encoded: Payload Format Indicator, Content Type,
    Response Topic, Correlation Data, User Properties) and when it expires (wall clock;
    None: never). One per published message, shared by every copy of it."""

    __slots__ = ("forward", "expires")

    def __init__(self, forward: bytes, expires: float | None = None) -> None:
        self.forward = forward
        self.expires = expires

    def expired(self, now: float) -> bool:
        """Has its Message Expiry passed at ``now`` (wall clock)? Then it is not sent
        (MQTT-3.3.2-5)."""
        return self.expires is not None and self.expires <= now

    def __repr__(self) -> str:
        return f"MessageProps({len(self.forward)} bytes, expires={self.expires})"


class OutMessage:
    __slots__ = ("topic", "payload", "qos", "retain", "packet_id", "released", "size", "seq",
                 "stored", "props", "sub_ids", "share")

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool = False,
                 props: MessageProps | None = None, sub_ids: tuple[int, ...] = (),
                 share: str | None = None) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.packet_id = 0
        self.released = False  # QoS 2: PUBREC received and PUBREL sent, PUBCOMP awaited
        self.size = len(topic) + len(payload) + (len(props.forward) if props else 0)
        self.seq = 0  # order of arrival in its outbox
        self.stored = False  # in the saved state (or being saved): changes are saved too
        self.props = props  # MQTT 5 properties, None for most
        self.sub_ids = sub_ids  # MQTT 5 subscription identifiers it matched
        self.share = share  # the shared subscription it came through (broker.mqtt.shared)

    def __repr__(self) -> str:
        return (f"OutMessage({self.topic!r}, {len(self.payload)} bytes, qos={self.qos}, "
                f"id={self.packet_id}, released={self.released})")


class Outbox:
    __slots__ = ("inflight", "waiting", "held_bytes", "inflight_bytes", "_last_id", "journal",
                 "last_seq", "saved_seq", "added")

    def __init__(self, journal: OutboxJournal | None = None) -> None:
        self.inflight: dict[int, OutMessage] = {}
        # None until a message waits (an empty deque is 600 bytes; most sessions of an
        # idle fleet never queue anything), and again once the queue drains.
        self.waiting: deque[OutMessage] | None = None
        self.held_bytes = 0
        self.inflight_bytes = 0  # of held_bytes, those of the messages in flight
        self._last_id = 0
        self.journal = journal
        self.last_seq = 0  # of the newest message put
        self.saved_seq = 0  # messages up to this one were taken by the journal
        self.added = False  # a message was put since the journal last took them

    def __len__(self) -> int:
        """Messages held: in flight plus waiting."""
        return len(self.inflight) + (len(self.waiting) if self.waiting else 0)

    def put(self, message: OutMessage) -> None:
        self.last_seq += 1
        message.seq = self.last_seq
        if self.waiting is None:
            self.waiting = deque()
        self.waiting.append(message)
        self.held_bytes += message.size
        if self.journal is not None and not self.added:
            self.added = True
            self.journal.messages_added(self)

    def restored(self, message: OutMessage) -> None:
        """A message of a saved state (``stored``), in its order: in flight when it has a
        packet id."""
        if message.packet_id:
            self.inflight[message.packet_id] = message
            self.inflight_bytes += message.size
            self._last_id = message.packet_id
        else:
            if self.waiting is None:
                self.waiting = deque()
            self.waiting.append(message)
        self.held_bytes += message.size
        self.last_seq = self.saved_seq = message.seq

    def unsaved(self) -> list[OutMessage]:
        """The messages held that were put since the last call, oldest first (for the
        journal, which saves them from then on). They are the newest: at the end of
        ``waiting``, and of ``inflight`` when every waiting one is new."""
        saved, new = self.saved_seq, []
        for message in reversed(self.waiting or ()):
            if message.seq <= saved:
                break
            new.append(message)
        else:
            for message in reversed(self.inflight.values()):
                if message.seq <= saved:
                    break
                new.append(message)
        new.reverse()
        self.saved_seq, self.added = self.last_seq, False
        return new

    def sendable(self, window: int, max_bytes: int = 0) -> Iterator[OutMessage]:
        """Move waiting messages into flight while the window has room (``window``
        messages, and ``max_bytes`` unless nothing is in flight), giving each a packet
        id; yields each one to be written (in order)."""
        while self.waiting and len(self.inflight) < window and not (
                max_bytes and self.inflight
                and self.inflight_bytes + self.waiting[0].size > max_bytes):
            message = self.waiting.popleft()
            if not self.waiting:
                self.waiting = None
            message.packet_id = self._new_id()
            self.inflight[message.packet_id] = message
            self.inflight_bytes += message.size
            if message.stored and self.journal is not None:
                self.journal.message_changed(message)
            yield message

    def _new_id(self) -> int:
        packet_id = self._last_id
        while True:  # at most len(inflight) + 1 steps: the window is far below 65535
            packet_id = packet_id % 65535 + 1
            if packet_id not in self.inflight:
                self._last_id = packet_id
                return packet_id

    def acknowledged(self, packet_id: int) -> bool:
        """PUBACK: the QoS 1 message is delivered. False if no such message was in flight."""
        message = self.inflight.get(packet_id)
        if message is None or message.qos != 1:
            return False
        self._forget(packet_id, message)
        return True

    def received(self, packet_id: int) -> bool:
        """PUBREC: the QoS 2 message is stored by the client; a PUBREL is owed (also for a
        repeated PUBREC). False if no such QoS 2 message was in flight."""
        message = self.inflight.get(packet_id)
        if message is None or message.qos != 2:
            return False
        if not message.released:
            message.released = True
            # The payload is no longer needed: only the PUBREL may have to be re-sent.
            self.held_bytes -= message.size - len(message.topic)
            self.inflight_bytes -= message.size - len(message.topic)
            message.size = len(message.topic)
            message.payload = b""
            if message.stored and self.journal is not None:
                self.journal.message_changed(message)
        return True

    def completed(self, packet_id: int) -> bool:
        """PUBCOMP: the QoS 2 flow is over."""
        message = self.inflight.get(packet_id)
        if message is None or not message.released:
            return False
        self._forget(packet_id, message)
        return True

    def _forget(self, packet_id: int, message: OutMessage) -> None:
        del self.inflight[packet_id]
        self.held_bytes -= message.size
        self.inflight_bytes -= message.size
        if message.stored and self.journal is not None:
            self.journal.message_removed(message)

    def take_waiting(self, which: Callable[[OutMessage], bool]) -> list[OutMessage]:
        """Remove the waiting messages ``which`` picks (to go elsewhere), in order."""
        taken: list[OutMessage] = []
        if not self.waiting:
            return taken
        kept: deque[OutMessage] = deque()
        for message in self.waiting:
            if which(message):
                taken.append(message)
                self.held_bytes -= message.size
                if message.stored and self.journal is not None:
                    self.journal.message_removed(message)
            else:
                kept.append(message)
        self.waiting = kept or None
        return taken

    def drop(self, message: OutMessage) -> None:
        """A message moved into flight that is not to be sent after all (expired, too
        large for the client): gone, as if acknowledged."""
        if self.inflight.get(message.packet_id) is message:
            self._forget(message.packet_id, message)

    def discard(self, unreadable: Callable[[str], bool]) -> int:
        """Drop messages (in flight or waiting) whose topic the session may no longer read,
        e.g. a persistent session resumed under a narrower key. Released QoS 2 messages are
        kept: the client already has them and only needs the PUBREL. Returns how many."""
        dropped = 0
        for packet_id, message in list(self.inflight.items()):
            if not message.released and unreadable(message.topic):
                self._forget(packet_id, message)
                dropped += 1
        kept: deque[OutMessage] = deque()
        for message in self.waiting or ():
            if unreadable(message.topic):
                self.held_bytes -= message.size
                dropped += 1
                if message.stored and self.journal is not None:
                    self.journal.message_removed(message)
            else:
                kept.append(message)
        self.waiting = kept or None
        return dropped

    def trim(self, max_messages: int, max_bytes: int) -> int:
        """Drop waiting messages, newest first, until at most ``max_messages`` are held
        and ``max_bytes`` (one message fits whatever its size); in-flight ones stay (the
        client may have them; the window keeps them within the bounds too). Returns how
        many were dropped."""
        dropped = 0
        waiting = self.waiting
        while waiting and (len(self) > max_messages or (
                self.held_bytes > max_bytes and len(self) > 1)):
            message = waiting.pop()
            self.held_bytes -= message.size
            dropped += 1
            if message.stored and self.journal is not None:
                self.journal.message_removed(message)
        if not waiting:
            self.waiting = None
        return dropped

    def clear(self) -> None:
        if self.journal is not None:
            for message in [*self.inflight.values(), *(self.waiting or ())]:
                if message.stored:
                    self.journal.message_removed(message)
        self.inflight.clear()
        self.waiting = None
        self.held_bytes = self.inflight_bytes = 0
