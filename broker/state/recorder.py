"""Write-behind: the broker's changes recorded as they happen, saved once per interval.

The message path only marks what changed, in dicts keyed by what it is (a retained
topic; a session; one of its subscriptions; an outbox that has new messages, or one of
its saved messages), so a value changed many times between two flushes is written once,
and a QoS 1/2 message acknowledged before the next flush is never written at all. Every
``flush_interval`` (and at a clean shutdown) one flush turns the marks into rows —
reading the current values, on the event loop, in one synchronous pass — and the store
writes them in one transaction on its own thread. The event loop never waits for the
disk: a crash loses at most the last interval.

With ``sync`` (``[persistence] sync = true``) an incoming QoS 1/2 PUBLISH is acknowledged
only after the flush that holds its effects commits (``after_commit``); such a waiter
starts a flush at once, and all that waited meanwhile share the next one (group commit).
Acknowledgements stay in the order the PUBLISHes came (MQTT-4.6.0-2).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable

from broker.mqtt.keeper import RetainedMessage
from broker.mqtt.outbox import Outbox, OutMessage
from broker.mqtt.session import KeySession
from broker.state.model import (
    Batch,
    MessageRow,
    RetainedRow,
    SessionRow,
    SubscriptionRow,
    ids_text,
)
from broker.state.store import StateStore

logger = logging.getLogger(__name__)


class Marks:
    """What changed since the last flush, keyed by what changed (the latest value wins)."""

    __slots__ = ("retained", "dropped", "sessions", "subs", "messages", "outboxes")

    def __init__(self) -> None:
        self.retained: dict[tuple[str, str], RetainedMessage | None] = {}  # (mount, topic)
        self.dropped: set[str] = set()  # client ids whose whole saved session goes first
        self.sessions: dict[str, KeySession] = {}
        # client id -> filter -> its options (broker.topics.trie.options), None: removed
        self.subs: dict[str, dict[str, int | None]] = {}
        # client id -> seq -> a saved message that changed, or None (removed)
        self.messages: dict[str, dict[int, OutMessage | None]] = {}
        self.outboxes: dict[str, Outbox] = {}  # client id -> outbox with new messages

    def __bool__(self) -> bool:
        return bool(self.retained or self.dropped or self.sessions or self.subs
                    or self.messages or self.outboxes)

    def drop(self, client_id: str) -> None:
        self.dropped.add(client_id)
        self.sessions.pop(client_id, None)
        self.subs.pop(client_id, None)
        self.messages.pop(client_id, None)
        self.outboxes.pop(client_id, None)

    def take_back(self, older: Marks) -> None:
        """The marks of a flush that failed return, under the newer ones (its outboxes'
        new messages are among its ``messages`` by then: see ``batch``). A session
        dropped since takes none of its older marks back: its drop supersedes them."""
        for key, value in older.retained.items():
            self.retained.setdefault(key, value)
        gone = set(self.dropped)
        self.dropped |= older.dropped
        for client_id, session in older.sessions.items():
            if client_id not in gone:
                self.sessions.setdefault(client_id, session)
        for client_id, subs in older.subs.items():
            if client_id not in gone:
                newer_subs = self.subs.setdefault(client_id, {})
                for topic_filter, packed in subs.items():
                    newer_subs.setdefault(topic_filter, packed)
        for client_id, messages in older.messages.items():
            if client_id not in gone:
                newer_messages = self.messages.setdefault(client_id, {})
                for seq, message in messages.items():
                    newer_messages.setdefault(seq, message)

    def batch(self, position: int) -> Batch:
        """The marks as rows, with the current values of what they name."""
        for client_id, outbox in self.outboxes.items():
            added = self.messages.setdefault(client_id, {})
            for new in outbox.unsaved():
                added[new.seq] = new
        message_rows: list[MessageRow] = []
        removed_messages: list[tuple[str, int]] = []
        for client_id, changed in self.messages.items():
            for seq, message in changed.items():
                if message is None:
                    removed_messages.append((client_id, seq))
                    continue
                message.stored = True  # from now on its changes must be written too
                if message.props is None and not message.sub_ids:  # MQTT 3.1.1 (or alike)
                    message_rows.append(MessageRow(
                        client_id, seq, message.topic, message.payload, message.qos,
                        message.retain, message.packet_id, message.released, None, None, "",
                        message.share))
                else:
                    message_rows.append(_message5_row(client_id, seq, message))
        subs = [(client_id, topic_filter, packed) for client_id, changed in self.subs.items()
                for topic_filter, packed in changed.items()]
        retained = self.retained.items()
        return Batch(
            dropped=tuple(self.dropped),
            sessions=tuple(_session_row(session) for session in self.sessions.values()),
            subscriptions=tuple(SubscriptionRow(client_id, topic_filter, packed)
                                for client_id, topic_filter, packed in subs
                                if packed is not None),
            unsubscribed=tuple((client_id, topic_filter)
                               for client_id, topic_filter, packed in subs if packed is None),
            messages=tuple(message_rows),
            removed_messages=tuple(removed_messages),
            retained=tuple(_retained_row(mount, topic, m)
                           for (mount, topic), m in retained if m is not None),
            removed_retained=tuple(key for key, m in retained if m is None),
            position=position,
        )


class StateRecorder:
    def __init__(self, store: StateStore, *, interval: float, sync: bool,
                 position: Callable[[], int], saved_position: int = 0) -> None:
        """``position()`` is the last keystore change applied to the broker (saved with
        each flush, so a restart knows what changed while it was down)."""
        self.store = store
        self.interval = interval
        self.sync = sync
        self.position = position
        self.saved_position = saved_position  # as of the last committed flush
        self.marks = Marks()
        self._waiters: deque[tuple[Callable[[bytes], None], bytes]] = deque()
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ recording
    def journal(self, client_id: str) -> Journal:
        """The journal of a persistent session (given to its KeySession)."""
        return Journal(self, client_id)

    def retained_changed(self, mount: str, topic: str, message: RetainedMessage | None) -> None:
        """The retained message on ``topic`` of an application was set (or deleted: None)."""
        self.marks.retained[(mount, topic)] = message

    def after_commit(self, write: Callable[[bytes], None], packet: bytes) -> None:
        """``write(packet)`` once everything recorded so far is saved (at once when nothing
        is waiting to be), in the order asked."""
        if not self._waiters and not self.marks:
            write(packet)
            return
        self._waiters.append((write, packet))
        self._wake.set()

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        """Save now (what a restore left out, and the change-feed position it caught up
        to), then every interval."""
        await self.flush()
        self._task = asyncio.create_task(self._run(), name="keybroker-state-writer")

    async def stop(self) -> None:
        """Stop flushing on the interval, then save what is left (a clean shutdown loses
        nothing)."""
        if self._task is not None:
            self._stopping = True
            self._wake.set()
            await self._task
            self._task = None
        if not await self.flush():
            logger.error("broker state: the last changes could not be saved at shutdown")

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> bool:
        """Save what changed since the last flush in one transaction; False (logged) when
        the store failed: the changes are kept and tried again by the next flush."""
        async with self._flushing:
            waiting = len(self._waiters)
            position = self.position()
            if not self.marks and position == self.saved_position and not waiting:
                return True
            marks, self.marks = self.marks, Marks()
            batch = marks.batch(position)
            try:
                await self.store.write(batch)
            except Exception:
                logger.exception("broker state: saving %d changes to %s failed; retrying at "
                                 "the next flush", len(batch), self.store.location)
                self.marks.take_back(marks)
                return False
            self.saved_position = position
            for _ in range(waiting):
                write, packet = self._waiters.popleft()
                write(packet)
            return True


class Journal:
    """One persistent session's journal (broker.mqtt.session.SessionJournal): marks its
    changes in the recorder's current marks."""

    __slots__ = ("_recorder", "client_id")

    def __init__(self, recorder: StateRecorder, client_id: str) -> None:
        self._recorder = recorder
        self.client_id = client_id

    def messages_added(self, outbox: Outbox) -> None:
        self._recorder.marks.outboxes[self.client_id] = outbox

    def message_changed(self, message: OutMessage) -> None:
        self._recorder.marks.messages.setdefault(self.client_id, {})[message.seq] = message

    def message_removed(self, message: OutMessage) -> None:
        self._recorder.marks.messages.setdefault(self.client_id, {})[message.seq] = None

    def saved(self, session: KeySession) -> None:
        self._recorder.marks.sessions[self.client_id] = session

    def subscribed(self, topic_filter: str, qos: int) -> None:
        """``qos``: the subscription's options, packed (broker.topics.trie.options)."""
        self._recorder.marks.subs.setdefault(self.client_id, {})[topic_filter] = qos

    def unsubscribed(self, topic_filter: str) -> None:
        self._recorder.marks.subs.setdefault(self.client_id, {})[topic_filter] = None

    def dropped(self) -> None:
        self._recorder.marks.drop(self.client_id)


def _session_row(session: KeySession) -> SessionRow:
    grant, conn = session.grant, session.conn
    return SessionRow(
        session.client_id, session.mount, grant.key.key if grant is not None else "",
        conn.listener, conn.client_ip, conn.peer_ip,
        None if session.link is not None else session.disconnected_at,
        ids_text(sorted(session.inflight_in or ())), session.expiry)


def _message5_row(client_id: str, seq: int, message: OutMessage) -> MessageRow:
    """The row of a message with MQTT 5 properties or subscription identifiers."""
    props = None if message.released else message.props  # a PUBREL carries none
    return MessageRow(client_id, seq, message.topic, message.payload, message.qos,
                      message.retain, message.packet_id, message.released,
                      None if props is None else props.forward,
                      None if props is None else props.expires, ids_text(message.sub_ids),
                      message.share)


def _retained_row(mount: str, topic: str, message: RetainedMessage) -> RetainedRow:
    props = message.props
    if props is None:
        return RetainedRow(mount, topic, message.payload, message.qos, message.bucket)
    return RetainedRow(mount, topic, message.payload, message.qos, message.bucket,
                       props.forward, props.expires)
