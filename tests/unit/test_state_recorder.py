"""The write-behind recorder (broker.state.recorder) against a store kept in memory: what
a flush writes, what it never writes, a failed flush retried, and acknowledgements held
until their flush commits (sync). No disk and no sockets: the store is a list."""

from __future__ import annotations

from broker.mqtt.outbox import MessageProps, OutMessage
from broker.mqtt.retained import Retained
from broker.mqtt.session import ConnectionInfo, KeySession
from broker.state.model import Batch, MessageRow, RetainedRow, Snapshot
from broker.state.recorder import StateRecorder


class MemoryStore:
    location = "memory"

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.fail = False

    async def load(self) -> Snapshot:
        return Snapshot([], [], 0)

    async def write(self, batch: Batch) -> None:
        if self.fail:
            raise OSError("disk full")
        self.batches.append(batch)

    async def close(self) -> None:
        pass


def recorder(store: MemoryStore, sync: bool = False) -> StateRecorder:
    return StateRecorder(store, interval=60.0, sync=sync, position=lambda: 7)


def session(state: StateRecorder, client_id: str = "dev") -> KeySession:
    return KeySession(client_id, False, ConnectionInfo("tcp", "127.0.0.1", "127.0.0.1"),
                      state.journal(client_id))


async def test_a_message_acknowledged_before_the_flush_is_never_written() -> None:
    store = MemoryStore()
    state = recorder(store)
    outbox = session(state).outbox
    quick, slow = OutMessage("t", b"quick", 1), OutMessage("t", b"slow", 1)
    outbox.put(quick)
    outbox.put(slow)
    for _ in outbox.sendable(10):
        pass
    assert outbox.acknowledged(quick.packet_id)
    assert await state.flush()
    (batch,) = store.batches
    assert [(m.payload, m.packet_id) for m in batch.messages] == [(b"slow", slow.packet_id)]
    assert batch.removed_messages == () and batch.position == 7
    assert outbox.acknowledged(slow.packet_id)  # written: its removal is written too
    assert await state.flush()
    assert store.batches[1].removed_messages == (("dev", slow.seq),)


async def test_a_failed_flush_is_written_by_the_next_one_unless_dropped_since() -> None:
    store = MemoryStore()
    state = recorder(store)
    kept, gone = session(state, "kept"), session(state, "gone")
    for item in (kept, gone):
        item.journal.subscribed("a/#", 1)
        item.outbox.put(OutMessage("a/b", b"x", 1))
    store.fail = True
    assert not await state.flush()
    gone.journal.dropped()  # supersedes what the failed flush held for it
    store.fail = False
    assert await state.flush()
    (batch,) = store.batches
    assert batch.dropped == ("gone",)
    assert [(s.client_id, s.filter) for s in batch.subscriptions] == [("kept", "a/#")]
    assert [m.client_id for m in batch.messages] == ["kept"]


async def test_with_sync_acknowledgements_wait_for_their_flush_in_order() -> None:
    store = MemoryStore()
    state = recorder(store, sync=True)
    sent: list[bytes] = []
    state.after_commit(sent.append, b"nothing to save: at once")
    assert sent == [b"nothing to save: at once"]
    session(state).outbox.put(OutMessage("t", b"x", 1))
    state.after_commit(sent.append, b"first")
    state.after_commit(sent.append, b"second")  # nothing new, but never before "first"
    assert sent == [b"nothing to save: at once"]
    store.fail = True
    assert not await state.flush()
    assert len(sent) == 1  # not saved: not acknowledged
    store.fail = False
    assert await state.flush()
    assert sent[1:] == [b"first", b"second"]



async def test_what_mqtt5_adds_is_in_the_rows_a_flush_writes() -> None:
    """A session's Session Expiry Interval, a message's properties, expiry, subscription
    identifiers and shared group, a retained message's properties; a released QoS 2
    message keeps neither payload nor properties (only its PUBREL is owed)."""
    store = MemoryStore()
    state = recorder(store)
    dev = session(state)
    dev.expiry = 3600.0
    dev.journal.saved(dev)
    props = MessageProps(b"\x26\x00\x01k\x00\x01v", 1700000300.5)
    shared = OutMessage("jobs/1", b"job", 2, False, props, (9,), "\x00app/g\x00jobs/#")
    both = OutMessage("a/b", b"x", 1, True, None, (7, 268435455))
    plain = OutMessage("a/c", b"y", 1)
    for message in (shared, both, plain):
        dev.outbox.put(message)
    for _ in dev.outbox.sendable(1):
        pass
    state.retained_changed("app/", "cfg", Retained("cfg", b"z", 1, ("k:key", "a:app/"),
                                                   props))
    assert await state.flush()
    (batch,) = store.batches
    assert [row.expiry for row in batch.sessions] == [3600.0]
    assert batch.messages == (
        MessageRow("dev", 1, "jobs/1", b"job", 2, False, shared.packet_id, False,
                   props.forward, props.expires, "9", shared.share),
        MessageRow("dev", 2, "a/b", b"x", 1, True, 0, False, None, None, "7 268435455"),
        MessageRow("dev", 3, "a/c", b"y", 1, False, 0, False))
    assert batch.retained == (RetainedRow("app/", "cfg", b"z", 1, "k:key", props.forward,
                                          props.expires),)

    assert dev.outbox.received(shared.packet_id)  # PUBREC: released
    assert await state.flush()
    assert store.batches[1].messages == (
        MessageRow("dev", 1, "jobs/1", b"", 2, False, shared.packet_id, True, None, None,
                   "9", shared.share),)
