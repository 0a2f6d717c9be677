"""What a session sends in (broker.mqtt.inbound) without sockets: acknowledgements, QoS 2
method B with its duplicates (also of ids a restart brought back), the bound on unreleased
QoS 2 ids, the publish rate, a denied PUBLISH dropped or disconnecting, topics past the
limits, retained messages, the Will, SUBSCRIBE checks and acknowledgements held until
saved."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from broker.mqtt import codec, inbound, props
from broker.mqtt.inbound import Inbound, Outcome, Verdict, released
from broker.mqtt.session import KeySession, Will
from broker.topics.mounts import mount_of
from keystore.models import TopicMode
from tests.support.engine import APP, Engine, access_key, link_of

KEY = access_key(devices=("d1", "d2"))
MOUNT = mount_of(APP)


class Setup:
    """A publishing session d1 and a subscriber d2 (to every topic it may read)."""

    def __init__(self, engine: Engine, key=KEY, state: object = None) -> None:  # type: ignore[no-untyped-def]
        self.engine = engine
        self.inbound = Inbound(engine.settings, engine.router, engine.audit, state)  # type: ignore[arg-type]
        self.publisher = engine.session("d1", key)
        self.subscriber = engine.session("d2", key)
        engine.subscribe(self.subscriber, ("#", 2))

    def send(self, topic: str, payload: bytes = b"x", qos: int = 0, packet_id: int = 0, *,
             dup: bool = False, retain: bool = False) -> Outcome | None:
        """None when the connection goes on, else why it ends."""
        packet = codec.Publish(topic, payload, qos, retain, dup, packet_id)
        return self.inbound.publish_packet(self.publisher, link_of(self.publisher), packet)

    def acks(self) -> list[bytes]:
        return link_of(self.publisher).written

    def delivered(self) -> list[bytes]:
        """Payloads the subscriber was given (sent, or waiting in its outbox)."""
        sent = [codec.parse_publish(p[0], p[2:]).payload for p in link_of(self.subscriber).written]
        return sent + [m.payload for m in self.subscriber.outbox.waiting or ()]


def ack(kind: int, packet_id: int) -> bytes:
    return codec.ack_packet(kind, packet_id)


@pytest.fixture
async def setup(engine: Engine) -> Setup:
    return Setup(engine)


# ------------------------------------------------------------------ acknowledgements

async def test_qos0_is_routed_and_counted_without_an_acknowledgement(setup: Setup) -> None:
    assert setup.send("losant/d1/state", b"zero") is None
    assert setup.delivered() == [b"zero"] and setup.acks() == []
    traffic = setup.engine.router.traffic
    assert (traffic.msgs_in[0], traffic.bytes_in[0]) == (1, 4)


async def test_qos1_is_acknowledged_after_it_is_routed(setup: Setup) -> None:
    assert setup.send("losant/d1/state", b"one", 1, 5) is None
    assert setup.delivered() == [b"one"] and setup.acks() == [ack(codec.PUBACK, 5)]


async def test_qos2_is_passed_on_once_and_its_id_kept_until_released(setup: Setup) -> None:
    """Method B (MQTT 3.1.1 §4.3.3): passed on when it arrives; a re-send of the same id
    before PUBREL is answered, not delivered again."""
    assert setup.send("losant/d1/state", b"two", 2, 7) is None
    assert setup.send("losant/d1/state", b"two", 2, 7, dup=True) is None
    assert setup.delivered() == [b"two"]
    assert setup.acks() == [ack(codec.PUBREC, 7)] * 2
    assert setup.publisher.inflight_in == {7}
    released(setup.publisher, 7)  # PUBREL
    assert setup.publisher.inflight_in is None
    assert setup.send("losant/d1/state", b"again", 2, 7) is None  # the id is free: a new one
    assert setup.delivered() == [b"two", b"again"]


async def test_a_restored_id_reused_without_dup_is_a_new_message(setup: Setup) -> None:
    """After a restart a saved id may be one whose PUBREL was answered but not saved: the
    client may reuse it (DUP 0) for a new message; a DUP re-send is the old one."""
    session = setup.publisher
    session.inflight_in, session.restored_in = {8}, frozenset({8})
    assert setup.send("losant/d1/state", b"old", 2, 8, dup=True) is None
    assert setup.delivered() == []
    assert setup.send("losant/d1/state", b"new", 2, 8) is None
    assert setup.delivered() == [b"new"]
    assert session.restored_in == frozenset() and session.inflight_in == {8}
    assert setup.send("losant/d1/state", b"new", 2, 8) is None  # now a plain duplicate
    assert setup.delivered() == [b"new"]
    assert setup.acks() == [ack(codec.PUBREC, 8)] * 3


async def test_unreleased_qos2_ids_are_bounded(engine_with: Callable[..., Engine]) -> None:
    setup = Setup(engine_with(max_queued_messages=3))
    for packet_id in (1, 2, 3):
        assert setup.send("losant/d1/state", b"q", 2, packet_id) is None
    # The connection ends: the client sent more than the broker's Receive Maximum.
    ended = setup.send("losant/d1/state", b"one-too-many", 2, 4)
    assert ended is not None and ended.code == props.RECEIVE_MAXIMUM_EXCEEDED
    assert b"one-too-many" not in setup.delivered()
    (line,) = setup.engine.audit_events("bad_packet")
    assert "too many unacknowledged QoS 2 messages" in line["reason"]


class SyncState:
    """A broker state with ``[persistence] sync``: acknowledgements wait for a commit."""

    sync = True

    def __init__(self) -> None:
        self.waiting: list[tuple[Callable[[bytes], None], bytes]] = []

    def after_commit(self, write: Callable[[bytes], None], packet: bytes) -> None:
        self.waiting.append((write, packet))

    def commit(self) -> None:
        for write, packet in self.waiting:
            write(packet)
        self.waiting.clear()


async def test_with_sync_acknowledgements_wait_for_the_commit_in_order(engine: Engine) -> None:
    state = SyncState()
    setup = Setup(engine, state=state)
    assert setup.send("losant/d1/state", b"one", 1, 1) is None
    assert setup.send("losant/d1/state", b"two", 2, 2) is None
    assert setup.delivered() == [b"one", b"two"]  # passed on at once
    assert setup.acks() == []  # acknowledged only once saved
    state.commit()
    assert setup.acks() == [ack(codec.PUBACK, 1), ack(codec.PUBREC, 2)]


# ------------------------------------------------------------------ refusals

async def test_a_denied_publish_is_dropped_yet_acknowledged_by_default(setup: Setup) -> None:
    assert setup.send("losant/d9/state", b"not-yours", 1, 3) is None  # the connection goes on
    assert setup.delivered() == []
    assert setup.acks() == [ack(codec.PUBACK, 3)]
    (line,) = setup.engine.audit_events("publish_denied")
    assert line["topic"] == "losant/d9/state" and line["client_id"] == "d1"
    assert setup.engine.router.traffic.denied["publish"] == 1


async def test_a_denied_publish_disconnects_unacknowledged_when_configured(
        engine_with: Callable[..., Engine]) -> None:
    setup = Setup(engine_with(denied_publish="disconnect"))
    ended = setup.send("losant/d9/state", b"not-yours", 1, 3)
    assert ended is not None and ended.code == props.NOT_AUTHORIZED
    assert setup.acks() == [] and setup.delivered() == []
    assert len(setup.engine.audit_events("publish_denied")) == 1


@pytest.mark.parametrize(("topic", "problem"), [
    ("losant/d1/a/b", "4 levels, limit 3"),
    ("losant/d1/" + "x" * 40, "50 bytes, limit 40"),
    ("losant/d1/+", "invalid_topic"),
    ("", "invalid_topic"),
])
async def test_a_topic_past_the_limits_or_malformed_closes_the_connection(
        engine_with: Callable[..., Engine], topic: str, problem: str) -> None:
    setup = Setup(engine_with(max_topic_levels=3, max_topic_length=40))
    outcome = setup.inbound.publish(setup.publisher, topic, b"x", 1, False)
    assert outcome.verdict is Verdict.CLOSE and outcome.code == props.TOPIC_NAME_INVALID
    assert setup.delivered() == []
    (line,) = setup.engine.audit_events("publish_denied")
    assert line["reason"].startswith("invalid_topic: ") and problem in line["reason"]


async def test_nothing_more_is_taken_from_a_session_being_kicked(setup: Setup) -> None:
    setup.publisher.kicked = "key_inactive"
    assert setup.send("losant/d1/state", b"late", 1, 1) is not None
    assert setup.delivered() == [] and setup.acks() == []
    assert setup.engine.audit_events() == []


async def test_the_publish_rate_is_a_token_bucket_of_one_seconds_worth(
        engine_with: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch) -> None:
    now = [50.0]
    monkeypatch.setattr(inbound.time, "monotonic", lambda: now[0])
    setup = Setup(engine_with(max_publish_rate=2.0))
    packet = codec.publish_packet(b"losant/d1/state", b"x", 0, False)
    first, body = packet[0], packet[2:]
    exceeded = [setup.inbound.rate_exceeded(setup.publisher, first, body) for _ in range(3)]
    assert exceeded == [False, False, True]
    now[0] += 1.0  # two more tokens, one of them owed for the refused PUBLISH
    assert not setup.inbound.rate_exceeded(setup.publisher, first, body)
    assert setup.inbound.rate_exceeded(setup.publisher, first, body)
    assert setup.inbound.rate_exceeded(setup.publisher, 0x36, b"\x00")  # unparsable: no topic
    lines = setup.engine.audit_events("publish_denied")
    assert [(e["reason"], e["topic"]) for e in lines] == [
        ("rate_limited", "losant/d1/state"), ("rate_limited", "losant/d1/state"),
        ("rate_limited", "")]


async def test_without_a_rate_nothing_is_exceeded(setup: Setup) -> None:
    assert not any(setup.inbound.rate_exceeded(setup.publisher, 0x30, b"") for _ in range(1000))


# ------------------------------------------------------------------ retained

async def test_a_retained_publish_is_kept_and_a_refused_one_audited(
        engine_with: Callable[..., Engine]) -> None:
    engine = engine_with(max_retained_messages=1)
    setup = Setup(engine, access_key(devices=("d1", "d2"), topic_mode=TopicMode.ALL))
    assert setup.send("custom/a", b"kept", 1, 1, retain=True) is None
    assert setup.send("custom/b", b"refused", 1, 2, retain=True) is None
    assert setup.delivered() == [b"kept", b"refused"]  # delivered live either way
    assert [m.payload for _, m in engine.router.retained.store.matching(MOUNT + "#")] == [
        b"kept"]
    (line,) = engine.audit_events("retain_refused")
    assert line["topic"] == "custom/b" and "max_retained_messages 1" in line["reason"]


# ------------------------------------------------------------------ the Will

async def test_a_will_is_checked_like_a_publish_of_its_session(setup: Setup) -> None:
    setup.inbound.publish_will(setup.publisher, Will("losant/d1/state", b"gone", 1, True))
    setup.inbound.publish_will(setup.publisher, Will("losant/d9/state", b"theirs", 0, False))
    assert setup.delivered() == [b"gone"]
    assert len(setup.engine.router.retained) == 1
    (line,) = setup.engine.audit_events("publish_denied")
    assert line["topic"] == "losant/d9/state" and line["will"] is True


async def test_a_will_past_the_topic_limits_is_refused(
        engine_with: Callable[..., Engine]) -> None:
    setup = Setup(engine_with(max_topic_levels=3))
    setup.inbound.publish_will(setup.publisher, Will("losant/d1/a/b", b"gone", 0, False))
    assert setup.delivered() == []
    (line,) = setup.engine.audit_events("publish_denied")
    assert line["reason"] == "limit: 4 levels, limit 3"


# ------------------------------------------------------------------ SUBSCRIBE

async def test_a_filter_is_refused_for_its_limits_first_then_the_policy(
        engine_with: Callable[..., Engine]) -> None:
    setup = Setup(engine_with(max_topic_levels=3))
    session: KeySession = setup.publisher
    assert setup.inbound.subscribe_refusal(session, "losant/d1/#") is None
    assert setup.inbound.subscribe_refusal(session, "losant/d1/a/#") == "limit: 4 levels, limit 3"
    refusal = setup.inbound.subscribe_refusal(session, "losant/d9/#")
    assert refusal is not None and not refusal.startswith("limit")


# ------------------------------------------------------------------ MQTT 5 sessions

async def test_mqtt5_says_why_a_publish_was_refused_and_ends_a_refused_qos2_flow(
        setup: Setup) -> None:
    setup.publisher.version = 5
    assert setup.send("losant/d9/state", b"not-yours", 1, 3) is None
    assert setup.send("losant/d9/state", b"not-yours", 2, 4) is None
    puback, pubrec = setup.acks()
    assert (puback[0], puback[2:5]) == (0x40, b"\x00\x03" + bytes([props.NOT_AUTHORIZED]))
    assert props.decode(puback, 5, props.ACK_PROPS)[0][props.REASON_STRING]  # and why
    assert (pubrec[0], pubrec[4]) == (0x50, props.NOT_AUTHORIZED)
    assert setup.publisher.inflight_in is None  # no PUBREL follows a refused PUBREC
    assert setup.delivered() == []


async def test_mqtt5_reason_strings_may_be_turned_off(
        engine_with: Callable[..., Engine]) -> None:
    setup = Setup(engine_with(reason_strings=False))
    setup.publisher.version = 5
    assert setup.send("losant/d9/state", b"not-yours", 1, 3) is None
    assert setup.acks() == [codec.ack5(codec.PUBACK, 3, props.NOT_AUTHORIZED)]


async def test_valid_topics_are_remembered_and_invalid_ones_refused_every_time(
        engine_with: Callable[..., Engine]) -> None:
    setup = Setup(engine_with(max_topic_levels=3))
    for _ in range(2):
        assert setup.inbound.publish(setup.publisher, "losant/d1/state", b"ok", 0,
                                     False).verdict is Verdict.ACCEPTED
        refused = setup.inbound.publish(setup.publisher, "losant/d1/a/b", b"no", 0, False)
        assert refused.verdict is Verdict.CLOSE
    assert setup.delivered() == [b"ok", b"ok"]
    assert len(setup.engine.audit_events("publish_denied")) == 2
