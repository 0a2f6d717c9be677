"""The router (broker.mqtt.routing) without sockets: delivery to the sessions whose
filters match and whose grant may read, QoS 1/2 within the in-flight window and the
session's bounds, acknowledgements, resume, subscriptions within their count and bytes,
a saved state restored within the same bounds, and the audit throttle."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest

from broker.core import audit
from broker.core.audit import DENIALS_PER_SECOND
from broker.mqtt import codec, props
from broker.mqtt.outbox import MessageProps, OutMessage
from broker.mqtt.routing import subscription_cost
from broker.mqtt.session import ClientLimits, KeySession
from broker.topics.mounts import mount_of
from tests.support.engine import APP, Engine, Journal, access_key, grant, link_of
from tests.support.links import FakeLink

KEY = access_key(devices=("d1", "d2"))
MOUNT = mount_of(APP)
QUOTA, DENIED = props.QUOTA_EXCEEDED, props.NOT_AUTHORIZED


def subscribe(engine: Engine, session: KeySession, *requests: tuple[str, int]) -> list[int]:
    return engine.subscribe(session, *requests)


def qos_of(filters: dict[str, int]) -> dict[str, int]:
    """filters_of's options, QoS only."""
    return {topic_filter: packed & 3 for topic_filter, packed in filters.items()}


def publish(topic: str, payload: bytes, qos: int, packet_id: int = 0, *, dup: bool = False,
            retain: bool = False) -> bytes:
    return codec.publish_packet(topic.encode(), payload, qos, retain, packet_id, dup)


# ------------------------------------------------------------------ delivery

async def test_qos0_goes_once_to_each_matching_session_of_the_application_only(
        engine: Engine) -> None:
    one, two = engine.session("d1", KEY), engine.session("d2", KEY)
    stranger = engine.session("d1x", access_key(devices=("d1",), app_id="app-2"))
    subscribe(engine, one, ("losant/+/state", 0))
    subscribe(engine, two, ("losant/d1/#", 0), ("losant/d1/state", 0))  # two filters match
    subscribe(engine, stranger, ("losant/+/state", 0))
    engine.router.route(MOUNT, "losant/d1/state", b"x", 0)
    expected = [publish("losant/d1/state", b"x", 0)]
    assert link_of(one).written == expected and link_of(two).written == expected
    assert link_of(stranger).written == []  # another application's topics are apart
    assert engine.router.traffic.msgs_out[0] == 2


async def test_a_session_whose_grant_may_not_read_the_topic_gets_nothing(engine: Engine) -> None:
    """Delivery is checked against the receiving session's grant, not its filters only."""
    narrow = engine.session("d3", access_key(devices=("d3",)))
    subscribe(engine, narrow, ("#", 1))
    engine.router.route(MOUNT, "losant/d1/state", b"x", 1)
    assert link_of(narrow).written == [] and len(narrow.outbox) == 0
    assert engine.router.traffic.denied["delivery"] == 1


@pytest.mark.parametrize(("published", "granted", "delivered"), [
    (0, 2, 0), (1, 0, 0), (1, 2, 1), (2, 1, 1), (2, 2, 2)])
async def test_the_delivered_qos_is_the_lower_of_published_and_granted(
        engine: Engine, published: int, granted: int, delivered: int) -> None:
    session = engine.session("d1", KEY)
    subscribe(engine, session, ("losant/d1/state", granted))
    engine.router.route(MOUNT, "losant/d1/state", b"x", published)
    assert link_of(session).written == [publish("losant/d1/state", b"x", delivered,
                                                1 if delivered else 0)]


async def test_offline_or_kicked_sessions_get_no_qos0_but_keep_qos1(engine: Engine) -> None:
    away = engine.session("d1", KEY, clean=False, online=False)
    leaving = engine.session("d2", KEY)
    leaving.kicked = "key_inactive"
    for session in (away, leaving):
        subscribe(engine, session, ("losant/d1/state", 1))
    engine.router.route(MOUNT, "losant/d1/state", b"zero", 0)
    engine.router.route(MOUNT, "losant/d1/state", b"one", 1)
    assert link_of(leaving).written == []
    assert [m.payload for m in away.outbox.waiting or ()] == [b"one"]
    assert [m.payload for m in leaving.outbox.waiting or ()] == [b"one"]


# ------------------------------------------------------------------ QoS 1/2

async def test_qos1_is_sent_within_the_inflight_window_and_each_puback_sends_the_next(
        engine_with: Callable[..., Engine]) -> None:
    engine = engine_with(max_inflight_messages=2)
    session = engine.session("d1", KEY)
    link = link_of(session)
    for n in range(3):
        engine.router.enqueue(session, OutMessage("losant/d1/c", bytes([n]), 1))
    assert link.written == [publish("losant/d1/c", bytes([n]), 1, n + 1) for n in range(2)]
    engine.router.puback(session, 99)  # not in flight: nothing moves
    assert len(link.written) == 2
    engine.router.puback(session, 1)
    assert link.written[2:] == [publish("losant/d1/c", b"\x02", 1, 3)]
    assert list(session.outbox.inflight) == [2, 3]


async def test_qos2_pubrec_is_answered_with_pubrel_and_pubcomp_ends_it(
        engine_with: Callable[..., Engine]) -> None:
    engine = engine_with(max_inflight_messages=1)
    session = engine.session("d1", KEY)
    link = link_of(session)
    engine.router.enqueue(session, OutMessage("losant/d1/c", b"first", 2))
    engine.router.enqueue(session, OutMessage("losant/d1/c", b"second", 2))
    assert link.written == [publish("losant/d1/c", b"first", 2, 1)]
    engine.router.puback(session, 1)  # the wrong acknowledgement for QoS 2: ignored
    engine.router.pubrec(session, 1)
    engine.router.pubrec(session, 1)  # repeated: the PUBREL is owed again
    pubrel = codec.ack_packet(codec.PUBREL, 1)
    assert link.written[1:] == [pubrel, pubrel]
    assert session.outbox.inflight[1].payload == b""  # let go once the client has it
    engine.router.pubcomp(session, 1)
    assert link.written[3:] == [publish("losant/d1/c", b"second", 2, 2)]


async def test_an_offline_queue_holds_its_count_then_drops_logging_once_per_episode(
        engine_with: Callable[..., Engine], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="broker.mqtt.routing")
    engine = engine_with(max_queued_messages=3)
    session = engine.session("d1", KEY, clean=False, online=False)
    kept = [engine.router.enqueue(session, OutMessage("losant/d1/c", bytes([n]), 1))
            for n in range(5)]
    assert kept == [True, True, True, False, False]
    assert [m.payload[0] for m in session.outbox.waiting or ()] == [0, 1, 2]
    assert engine.router.traffic.dropped["offline_queue_full"] == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "offline with its queue full" in lines[0]
    session.link = FakeLink(0)
    engine.router.resume(session)  # the episode ends with its count
    assert caplog.records[-1].getMessage() == (
        "client d1: 2 QoS 1/2 messages were dropped while it was offline with its queue full")
    assert session.dropped == 0


async def test_an_offline_queue_holds_its_bytes_and_one_message_of_any_size(
        engine_with: Callable[..., Engine]) -> None:
    engine = engine_with(max_session_bytes=100)
    session = engine.session("d1", KEY, clean=False, online=False)
    topic = "losant/d1/c"
    assert engine.router.enqueue(session, OutMessage(topic, b"x" * 500, 1))  # alone: fits
    assert not engine.router.enqueue(session, OutMessage(topic, b"y", 1))
    engine.router.forget(session)
    session = engine.session("d1", KEY, clean=False, online=False)
    assert engine.router.enqueue(session, OutMessage(topic, b"x" * (100 - len(topic)), 1))
    assert not engine.router.enqueue(session, OutMessage(topic, b"", 1))


async def test_what_cannot_wait_is_dropped_past_the_live_ceiling(
        engine_with: Callable[..., Engine]) -> None:
    """No publisher to pause (the HTTP API, a Will): a live session takes it up to four
    times its bounds."""
    engine = engine_with(max_queued_messages=2, max_inflight_messages=1)
    session = engine.session("d1", KEY)
    kept = [engine.router.enqueue(session, OutMessage("losant/d1/c", b"x", 1))
            for _ in range(10)]
    assert kept == [True] * 8 + [False] * 2
    assert engine.router.traffic.dropped["live_queue_full"] == 2


async def test_resume_resends_what_is_unacknowledged_then_what_waited(engine: Engine) -> None:
    session = engine.session("d1", KEY, clean=False)
    engine.router.enqueue(session, OutMessage("losant/d1/a", b"one", 1))
    engine.router.enqueue(session, OutMessage("losant/d1/b", b"two", 2))
    engine.router.pubrec(session, 2)
    session.link = None  # the connection ended
    engine.router.enqueue(session, OutMessage("losant/d1/c", b"three", 1))
    link = session.link = FakeLink(0)
    engine.router.resume(session)
    # MQTT-4.4.0-1: the same ids, DUP on PUBLISH, PUBREL for the released; then the queue.
    assert link.written == [publish("losant/d1/a", b"one", 1, 1, dup=True),
                            codec.ack_packet(codec.PUBREL, 2),
                            publish("losant/d1/c", b"three", 1, 3)]


async def test_resume_drops_what_the_new_grant_may_not_read(engine: Engine) -> None:
    session = engine.session("d1", KEY, clean=False, online=False)
    engine.router.enqueue(session, OutMessage("losant/d2/state", b"theirs", 1))
    engine.router.enqueue(session, OutMessage("losant/d1/c", b"mine", 1))
    session.grant = grant(access_key(devices=("d1",)))  # resumed under a narrower key
    link = session.link = FakeLink(0)
    engine.router.resume(session)
    assert link.written == [publish("losant/d1/c", b"mine", 1, 1)]
    assert engine.router.traffic.dropped["not_readable"] == 1


async def test_going_offline_trims_what_a_live_session_held_past_its_bounds_newest_first(
        engine_with: Callable[..., Engine]) -> None:
    engine = engine_with(max_queued_messages=3, max_inflight_messages=1)
    session = engine.session("d1", KEY, clean=False)
    for n in range(6):
        session.outbox.put(OutMessage("losant/d1/c", bytes([n]), 1))
    engine.router.pump(session)  # one in flight, five waiting
    engine.router.went_offline(session)
    assert list(session.outbox.inflight) == [1]
    assert [m.payload[0] for m in session.outbox.waiting or ()] == [1, 2]  # the oldest
    assert engine.router.traffic.dropped["offline_queue_full"] == 3
    assert session.dropped == 3


# ------------------------------------------------------------------ subscriptions

async def test_past_max_subscriptions_new_filters_are_refused_in_one_audit_line(
        engine_with: Callable[..., Engine]) -> None:
    engine = engine_with(max_subscriptions=2)
    session = engine.session("d1", KEY)
    codes = subscribe(engine, session, ("a/1", 0), ("a/2", 1), ("a/3", 0), ("a/4", 2))
    assert codes == [0, 1, QUOTA, QUOTA]
    assert subscribe(engine, session, ("a/1", 2)) == [2]  # held: replaced, not counted
    assert qos_of(engine.router.filters_of(session)) == {"a/1": 2, "a/2": 1}
    usage = engine.router.subscription_quotas.get("s:d1")
    assert usage is not None and usage.count == 2
    assert usage.size == subscription_cost("a/1") + subscription_cost("a/2")
    (line,) = engine.audit_events("subscribe_denied")
    assert line["reason"] == "max_subscriptions 2: 2 filters refused"
    assert line["client_id"] == "d1" and engine.router.traffic.denied["subscribe"] == 2


async def test_a_filter_repeated_in_one_subscribe_is_one_subscription_with_the_last_qos(
        engine_with: Callable[..., Engine]) -> None:
    engine = engine_with(max_subscriptions=1)
    session = engine.session("d1", KEY)
    assert subscribe(engine, session, ("a/#", 0), ("a/#", 2)) == [2, 2]  # MQTT-3.8.4-3
    assert qos_of(engine.router.filters_of(session)) == {"a/#": 2}
    usage = engine.router.subscription_quotas.get("s:d1")
    assert usage is not None and (usage.count, usage.size) == (1, subscription_cost("a/#"))


async def test_a_filter_the_check_refuses_is_audited_and_not_added(engine: Engine) -> None:
    session = engine.session("d1", KEY)
    codes = engine.subscribe(
        session, ("ok/#", 1), ("no/#", 1),
        check=lambda _s, topic_filter: "not_allowed" if topic_filter.startswith("no") else None)
    assert codes == [1, DENIED]
    assert qos_of(engine.router.filters_of(session)) == {"ok/#": 1}
    (line,) = engine.audit_events("subscribe_denied")
    assert (line["topic"], line["reason"]) == ("no/#", "not_allowed")


async def test_subscription_bytes_are_bounded_per_session_key_and_application(
        engine_with: Callable[..., Engine]) -> None:
    cost = subscription_cost("a/0")
    engine = engine_with(max_subscription_bytes=2 * cost,
                         max_subscription_bytes_per_key=3 * cost,
                         max_subscription_bytes_per_app=4 * cost)
    first, second = engine.session("d1", KEY), engine.session("d2", KEY)
    other = access_key("o" * 32, devices=("d3",))
    third = engine.session("d3", other)
    assert subscribe(engine, first, ("a/0", 0), ("a/1", 0), ("a/2", 0)) == [0, 0, QUOTA]
    assert subscribe(engine, second, ("a/3", 0), ("a/4", 0)) == [0, QUOTA]  # the key's 3
    assert subscribe(engine, third, ("a/5", 0), ("a/6", 0)) == [0, QUOTA]  # the app's 4
    reasons = [e["reason"] for e in engine.audit_events("subscribe_denied")]
    assert reasons == [
        f"session subscription quota reached (max_subscription_bytes {2 * cost}): "
        "1 filters refused",
        f"key subscription quota reached (max_subscription_bytes_per_key {3 * cost}): "
        "1 filters refused",
        f"application subscription quota reached (max_subscription_bytes_per_app {4 * cost}): "
        "1 filters refused"]


async def test_unsubscribing_or_leaving_gives_the_subscription_bytes_back(
        engine_with: Callable[..., Engine]) -> None:
    cost = subscription_cost("a/0")
    engine = engine_with(max_subscription_bytes_per_key=2 * cost)
    first, second = engine.session("d1", KEY), engine.session("d2", KEY)
    assert subscribe(engine, first, ("a/0", 0), ("a/1", 0)) == [0, 0]
    assert subscribe(engine, second, ("a/2", 0)) == [QUOTA]
    engine.router.unsubscribe(first, ["a/0", "never/held"])
    assert subscribe(engine, second, ("a/2", 0)) == [0]
    engine.router.forget(first)
    assert subscribe(engine, second, ("a/3", 0)) == [0]
    assert engine.router.subscription_quotas.get("s:d1") is None
    engine.router.forget(second)
    assert engine.router.subscription_quotas.buckets == {}
    assert len(engine.router.subtree) == 0


async def test_a_session_resumed_under_another_key_counts_against_that_key(engine: Engine) -> None:
    session = engine.session("d1", KEY, clean=False)
    subscribe(engine, session, ("a/0", 0), ("a/1", 0))
    engine.router.rekeyed(session, "n" * 32)
    quotas = engine.router.subscription_quotas
    assert quotas.get(f"k:{KEY.key}") is None
    moved = quotas.get("k:" + "n" * 32)
    assert moved is not None and moved.count == 2


async def test_subscriptions_and_their_removal_are_journaled(engine: Engine) -> None:
    session = engine.session("d1", KEY, clean=False)
    journal = session.journal = Journal()
    subscribe(engine, session, ("a/#", 1))
    engine.router.unsubscribe(session, ["a/#"])
    engine.router.forget(session)
    assert journal.changes == [("subscribed", "a/#", 1), ("unsubscribed", "a/#"), ("dropped",)]


# ------------------------------------------------------------------ saved state

async def test_restored_subscriptions_stay_within_the_limits_in_force(
        engine_with: Callable[..., Engine]) -> None:
    engine = engine_with(max_subscriptions=2)
    session = engine.session("d1", KEY, clean=False, online=False)
    journal = session.journal = Journal()
    left_out = engine.router.restore_subscriptions(session, {"a/0": 0, "a/1": 1, "a/2": 2})
    assert left_out == 1
    assert qos_of(engine.router.filters_of(session)) == {"a/0": 0, "a/1": 1}
    assert journal.changes == [("unsubscribed", "a/2")]  # the saved state forgets it too
    usage = engine.router.subscription_quotas.get(f"k:{KEY.key}")
    assert usage is not None and usage.count == 2


async def test_restored_messages_stay_within_the_session_bounds(
        engine_with: Callable[..., Engine]) -> None:
    engine = engine_with(max_queued_messages=2)
    session = engine.session("d1", KEY, clean=False, online=False)
    sent = OutMessage("losant/d1/c", b"in flight", 1)
    sent.packet_id, sent.seq = 7, 1
    waiting = OutMessage("losant/d1/c", b"waiting", 1)
    waiting.seq = 2
    assert engine.router.restore_message(session, sent)
    assert engine.router.restore_message(session, waiting)
    assert not engine.router.restore_message(session, OutMessage("losant/d1/c", b"late", 1))
    assert list(session.outbox.inflight) == [7]
    assert [m.payload for m in session.outbox.waiting or ()] == [b"waiting"]


# ------------------------------------------------------------------ audit throttle

async def test_denials_are_audited_at_most_twenty_a_second_per_session_the_rest_counted(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(audit.time, "monotonic", lambda: now[0])
    session = engine.session("d1", KEY)
    for _ in range(DENIALS_PER_SECOND + 5):
        engine.router.audit_denied("publish_denied", session, "x/y", "not_allowed")
    assert len(engine.audit_events("publish_denied")) == DENIALS_PER_SECOND
    assert engine.audit_events("audit_suppressed") == []  # told when the second is over
    now[0] += 0.99
    engine.router.audit_denied("publish_denied", session, "x/y", "not_allowed")
    assert len(engine.audit_events("publish_denied")) == DENIALS_PER_SECOND
    now[0] += 0.01
    engine.router.audit_denied("publish_denied", session, "x/y", "not_allowed")
    (suppressed,) = engine.audit_events("audit_suppressed")
    assert suppressed["reason"] == "6 denials not logged in 1 s"
    assert len(engine.audit_events("publish_denied")) == DENIALS_PER_SECOND + 1
    assert engine.audit.suppressed == 6
    assert engine.router.traffic.denied["publish"] == DENIALS_PER_SECOND + 7


# ------------------------------------------------------------------ MQTT 5 sessions

def mqtt5(session: KeySession, receive_max: int = 65535, max_packet: int = 0) -> KeySession:
    session.version = 5
    session.limits = ClientLimits(receive_max, max_packet, True)
    return session


async def test_no_local_keeps_a_publishers_own_messages_from_it(engine: Engine) -> None:
    me, other = engine.session("d1", KEY), engine.session("d2", KEY)
    engine.subscribe(me, codec.Subscription("losant/+/state", 0, True, False, 0))
    engine.subscribe(other, codec.Subscription("losant/+/state", 0, True, False, 0))
    engine.router.route(MOUNT, "losant/d1/state", b"x", 0, origin="d1")
    assert link_of(me).written == [] and len(link_of(other).written) == 1


async def test_the_window_is_the_clients_receive_maximum_when_smaller(engine: Engine) -> None:
    session = mqtt5(engine.session("d1", KEY), receive_max=1)
    for n in range(2):
        engine.router.enqueue(session, OutMessage("losant/d1/c", bytes([n]), 1))
    assert list(session.outbox.inflight) == [1]  # MQTT-4.9.0-2
    engine.router.puback(session, 1)
    assert list(session.outbox.inflight) == [2]


async def test_an_expired_message_or_one_too_large_for_the_client_is_not_sent(
        engine: Engine) -> None:
    session = mqtt5(engine.session("d1", KEY), max_packet=100)
    gone = MessageProps(b"", expires=time.time() - 1)
    engine.router.enqueue(session, OutMessage("losant/d1/c", b"old", 1, props=gone))
    engine.router.enqueue(session, OutMessage("losant/d1/c", b"x" * 200, 1))
    engine.router.enqueue(session, OutMessage("losant/d1/c", b"fits", 1))
    (packet,) = link_of(session).written
    assert packet.endswith(b"fits") and packet[0] == 0x32
    assert engine.router.traffic.dropped["expired"] == 1  # MQTT-3.3.2-5
    assert engine.router.traffic.dropped["too_large_for_client"] == 1  # MQTT-3.1.2-25
    assert len(session.outbox) == 1  # the dropped ones are not held


async def test_a_refused_pubrec_ends_the_qos2_flow_and_the_next_goes(
        engine_with: Callable[..., Engine]) -> None:
    engine = engine_with(max_inflight_messages=1)
    session = mqtt5(engine.session("d1", KEY))
    for payload in (b"refused", b"next"):
        engine.router.enqueue(session, OutMessage("losant/d1/c", payload, 2))
    engine.router.pubrec_refused(session, 1)
    assert list(session.outbox.inflight) == [2]
    assert link_of(session).written[-1].endswith(b"next")
    assert codec.ack_packet(codec.PUBREL, 1) not in link_of(session).written


async def test_unsubscribe_says_which_filters_were_held(engine: Engine) -> None:
    session = engine.session("d1", KEY)
    engine.subscribe(session, ("a/#", 1))
    assert engine.router.unsubscribe(session, ["a/#", "b/#"]) == [
        props.SUCCESS, props.NO_SUBSCRIPTION_EXISTED]
    assert engine.router.filters_of(session) == {}
