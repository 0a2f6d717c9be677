"""The session registry (broker.mqtt.sessions) without sockets: take-over, sessions going
online and offline, kicks, expiry of sessions and of keys, the rechecks of CONNECTs that
raced a change, and the removal of devices and applications."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import pytest

from broker.mqtt import codec, props
from broker.mqtt import sessions as sessions_module
from broker.mqtt.outbox import OutMessage
from broker.mqtt.session import Grant, KeySession, Will
from broker.mqtt.sessions import KICK_TEXT, RECENT, Rechecks
from tests.support.engine import INFO, NOW, Engine, Journal, access_key, grant, link_of
from tests.support.links import FakeLink
from tests.support.waiting import async_wait_until

KEY = access_key(devices=("d1", "d2"))
OTHER_KEY = access_key("o" * 32, devices=("d1", "d2"))


class Observer:
    def __init__(self) -> None:
        self.heard: list[tuple[str, str]] = []

    def session_started(self, client_id: str, grant: Grant) -> None:
        self.heard.append(("started", client_id))

    def session_ended(self, client_id: str) -> None:
        self.heard.append(("ended", client_id))


def incoming(client_id: str, key=KEY, *, clean: bool = True) -> KeySession:  # type: ignore[no-untyped-def]
    """A CONNECT just authenticated with ``key``."""
    session = KeySession(client_id, clean, INFO)
    session.grant = grant(key)
    session.mount = "app-1/"
    session.link = FakeLink(0)
    return session


class Connection:
    """A session's connection as the registry sees it: over once its link is aborted
    (the daemon's MqttConnection marks its session offline, then is closed)."""

    def __init__(self, engine: Engine, session: KeySession) -> None:
        self.engine, self.session = engine, session
        self.over = asyncio.get_running_loop().create_future()
        self.ended_now = False

    def closed(self) -> asyncio.Future[None]:
        return self.over

    def end_now(self) -> None:
        self.ended_now = True
        self.finish()

    def finish(self) -> None:
        if not self.over.done():
            self.engine.registry.went_offline(self.session, self)
            self.over.set_result(None)


async def connected(engine: Engine, session: KeySession) -> asyncio.Future[None]:
    """The session online on a connection that ends (offline) once its link is aborted;
    the future is done then."""
    connection = Connection(engine, session)
    engine.registry.went_online(session, connection)
    link = session.link
    assert link is not None

    async def watch() -> None:
        await link.writable(-1)  # returns once the link is closing
        connection.finish()

    asyncio.ensure_future(watch())
    return connection.over


# ------------------------------------------------------------------ take-over

async def test_a_new_connection_ends_the_old_one_before_it_is_registered(
        engine: Engine) -> None:
    old = incoming("d1")
    old_link = link_of(old)
    old_task = await connected(engine, old)
    engine.subscribe(old, ("a/#", 0))
    new = incoming("d1")
    chosen = await engine.registry.take_over(new)
    assert old_task.done()  # it can no longer mark anything offline
    assert old_link.closing
    assert chosen is new and not chosen.present
    assert engine.router.filters_of(new) == {}  # a clean session starts empty


async def test_a_persistent_session_is_resumed_under_the_new_connections_grant(
        engine: Engine) -> None:
    old = incoming("d1", clean=False)
    old_task = await connected(engine, old)
    engine.subscribe(old, ("a/#", 1))
    old.kicked = "operator_kick"
    new = incoming("d1", OTHER_KEY, clean=False)
    new.will = None
    new.keep_alive = 45
    chosen = await engine.registry.take_over(new)
    assert old_task.done()
    assert chosen is old and chosen.present
    assert chosen.grant is new.grant and chosen.keep_alive == 45 and chosen.kicked is None
    assert engine.router.filters_of(chosen) == {"a/#": 1}
    quotas = engine.router.subscription_quotas  # its subscriptions count against the new key
    assert quotas.get(f"k:{KEY.key}") is None and quotas.get(f"k:{OTHER_KEY.key}") is not None


async def test_a_clean_connect_drops_the_stored_persistent_session(engine: Engine) -> None:
    stored = engine.session("d1", KEY, clean=False, online=False)
    engine.subscribe(stored, ("a/#", 1))
    engine.router.enqueue(stored, OutMessage("losant/d1/c", b"queued", 1))
    new = incoming("d1")
    assert await engine.registry.take_over(new) is new
    assert engine.registry.get("d1") is None and len(engine.router.subtree) == 0
    assert len(stored.outbox) == 0


async def test_an_old_connection_that_does_not_end_is_ended_at_once(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions_module, "TAKE_OVER_WAIT", 0.05)
    old = incoming("d1")
    old_link = link_of(old)
    stuck = Connection(engine, old)  # its link aborted, it does not notice
    engine.registry.went_online(old, stuck)
    chosen = await engine.registry.take_over(incoming("d1"))
    assert stuck.ended_now and stuck.over.done()
    assert old_link.closing and engine.registry.get("d1") is not old
    assert chosen is not old


async def test_connects_with_one_client_id_take_turns(engine: Engine) -> None:
    order: list[str] = []
    release = asyncio.Event()

    async def connect(name: str) -> None:
        async with engine.registry.connect_lock("d1"):
            order.append(f"{name} in")
            if name == "first":
                await release.wait()  # e.g. waiting for the old connection to end
            order.append(f"{name} out")

    first = asyncio.ensure_future(connect("first"))
    await async_wait_until(lambda: order == ["first in"])
    second = asyncio.ensure_future(connect("second"))
    locks = engine.registry._connect_locks
    await async_wait_until(lambda: locks["d1"][1] == 2)  # the second one waits its turn
    assert order == ["first in"]
    release.set()
    await asyncio.gather(first, second)
    assert order == ["first in", "first out", "second in", "second out"]
    assert locks == {}  # nothing left per client id


# ------------------------------------------------------------------ online, offline

async def test_going_online_and_offline_is_heard_and_indexed_by_key(
        engine_with: Callable[..., Engine]) -> None:
    observer = Observer()
    engine = engine_with(observers=(observer,))
    first, second = incoming("d1"), incoming("d2", OTHER_KEY)
    tasks = [await connected(engine, s) for s in (first, second)]
    assert engine.registry.sessions_of_key(KEY.key) == ["d1"]
    link_of(first).abort()
    await tasks[0]
    assert engine.registry.sessions_of_key(KEY.key) == []
    assert engine.registry.get("d1") is None  # a clean session is forgotten
    assert observer.heard == [("started", "d1"), ("started", "d2"), ("ended", "d1")]
    link_of(second).abort()
    await tasks[1]


async def test_a_persistent_session_stays_offline_with_its_subscriptions(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions_module.time, "time", lambda: 1234.5)
    session = incoming("d1", clean=False)
    session.journal = journal = Journal()
    task = await connected(engine, session)
    engine.subscribe(session, ("a/#", 1))
    link_of(session).abort()
    await task
    assert engine.registry.get("d1") is session and not session.online
    assert session.disconnected_at == 1234.5
    assert engine.router.filters_of(session) == {"a/#": 1}
    assert journal.changes == [("saved", "d1"), ("subscribed", "a/#", 1), ("saved", "d1")]


# ------------------------------------------------------------------ kick

async def test_a_kick_aborts_the_link_audits_counts_and_suppresses_the_will(
        engine: Engine) -> None:
    session = engine.session("d1", KEY)
    assert engine.registry.kick("d1", "key_inactive")
    assert link_of(session).closing and session.kicked == "key_inactive"
    assert session.suppress_will
    assert not engine.registry.kick("d1", "key_deleted")  # once
    assert engine.registry.kicks == {"key_inactive": 1}
    (line,) = engine.audit_events("kick")
    assert (line["reason"], line["client_id"], line["key"]) == ("key_inactive", "d1", KEY.key)


async def test_a_kick_may_let_the_will_go_and_misses_offline_sessions(engine: Engine) -> None:
    live = engine.session("d1", KEY)
    engine.session("d2", KEY, clean=False, online=False)
    assert engine.registry.kick("d1", "operator_kick", publish_will=True)
    assert not live.suppress_will
    assert not engine.registry.kick("d2", "operator_kick")
    assert not engine.registry.kick("nobody", "operator_kick")
    assert len(engine.audit_events("kick")) == 1


# ------------------------------------------------------------------ expiry

async def test_only_sessions_offline_for_longer_than_the_expiry_are_dropped(
        engine: Engine) -> None:
    old = engine.session("d1", KEY, clean=False, online=False)
    old.disconnected_at = 1000.0
    recent = engine.session("d2", KEY, clean=False, online=False)
    recent.disconnected_at = 1061.0
    live = engine.session("d3", access_key(devices=("d3",)), clean=False)
    live.disconnected_at = 0.0  # an earlier connection's: it is online now
    assert engine.registry.expire(60, now=1061.0) == 1
    assert engine.registry.get("d1") is None
    assert engine.registry.get("d2") is recent and engine.registry.get("d3") is live


async def test_a_live_session_ends_when_its_key_expires_and_not_before(engine: Engine) -> None:
    expires = NOW + timedelta(hours=1)
    session = incoming("d1", access_key(devices=("d1",), expires_at=expires))
    task = await connected(engine, session)
    assert engine.registry.expire_keys(expires.timestamp() - 1) == 0
    assert engine.registry.expire_keys(expires.timestamp()) == 1
    assert session.kicked == "key_expired"
    await task


async def test_a_regrant_with_a_later_expiry_replaces_the_earlier_one(engine: Engine) -> None:
    soon, later = NOW + timedelta(hours=1), NOW + timedelta(hours=2)
    session = incoming("d1", access_key(devices=("d1",), expires_at=soon))
    task = await connected(engine, session)
    engine.registry.regrant(session, grant(access_key(devices=("d1",), expires_at=later)))
    assert engine.registry.expire_keys(soon.timestamp()) == 0  # the stale entry is skipped
    assert session.kicked is None
    assert engine.registry.expire_keys(later.timestamp()) == 1
    await task


async def test_a_regrant_drops_what_the_session_may_no_longer_read(engine: Engine) -> None:
    session = engine.session("d1", KEY, clean=False, online=False)
    engine.router.enqueue(session, OutMessage("losant/d2/state", b"theirs", 1))
    engine.router.enqueue(session, OutMessage("losant/d1/c", b"mine", 1))
    engine.registry.regrant(session, grant(access_key(devices=("d1",))))
    assert [m.payload for m in session.outbox.waiting or ()] == [b"mine"]


# ------------------------------------------------------------------ rechecks

def test_a_connect_that_read_its_key_before_a_change_is_checked_again() -> None:
    rechecks = Rechecks()
    rechecks.applied("key-a", 10.0)
    rechecks.applied("d9", 10.0, device=True)
    rechecks.went_online("c1", "key-a", auth_started=9.5)  # read before the change
    rechecks.went_online("c2", "key-a", auth_started=10.5)  # after it: saw it
    rechecks.went_online("d9", "key-b", auth_started=9.0)  # its device was removed
    rechecks.went_online("c3", "key-c", auth_started=0.0)  # nothing changed for it
    assert rechecks.take(11.0) == [("c1", "key-a", False), ("d9", "key-b", True)]
    assert rechecks.take(11.0) == []


def test_changes_are_remembered_for_a_while_only() -> None:
    rechecks = Rechecks()
    rechecks.applied("key-a", 10.0)
    rechecks.take(10.0 + RECENT + 1)
    rechecks.went_online("c1", "key-a", auth_started=0.0)
    assert rechecks.take(10.0 + RECENT + 2) == []


async def test_the_registry_queues_the_recheck_when_a_session_goes_online(
        engine: Engine) -> None:
    session = incoming("d1")
    session.auth_started = 5.0
    engine.registry.rechecks.applied(KEY.key, 6.0)
    task = await connected(engine, session)
    assert engine.registry.rechecks.take(7.0) == [("d1", KEY.key, False)]
    link_of(session).abort()
    await task


# ------------------------------------------------------------------ removal

async def test_a_removed_device_loses_its_session_and_its_retained_messages(
        engine: Engine) -> None:
    offline = engine.session("d1", KEY, clean=False, online=False)
    live = engine.session("d2", KEY, clean=False)
    for session in (offline, live):
        topic = f"losant/{session.client_id}/state"
        assert engine.router.retained.retain(session, topic, b"kept", 0) is None
    engine.registry.device_removed("d1")
    engine.registry.device_removed("d2")
    assert engine.registry.get("d1") is None  # offline: forgotten now
    assert live.kicked == "device_deleted" and live.clean_session  # forgotten when it ends
    assert len(engine.router.retained) == 0


async def test_a_removed_application_loses_its_sessions_and_retained_messages_only(
        engine: Engine) -> None:
    offline = engine.session("d1", KEY, clean=False, online=False)
    live = engine.session("d2", KEY, clean=False)
    elsewhere = engine.session("e1", access_key("e" * 32, ("e1",), app_id="app-2"))
    for session in (offline, live, elsewhere):
        topic = f"losant/{session.client_id}/state"
        assert engine.router.retained.retain(session, topic, b"kept", 0) is None
    engine.registry.app_removed("app-1")
    assert engine.registry.get("d1") is None
    assert live.kicked == "app_deleted" and live.clean_session
    assert elsewhere.kicked is None and engine.registry.get("e1") is elsewhere
    assert [m.topic for _, m in engine.router.retained.store.matching("#")] == [
        "losant/e1/state"]


# ------------------------------------------------------------------ MQTT 5 sessions

async def test_an_mqtt5_session_is_told_why_it_is_disconnected(engine: Engine) -> None:
    kicked, slow = engine.session("d1", KEY), engine.session("d2", KEY)
    kicked.version = slow.version = 5
    engine.registry.kick("d1", "key_inactive")
    engine.registry.kick("d2", "slow_consumer")
    reason = props.encode([(props.REASON_STRING, KICK_TEXT["key_inactive"])])
    assert link_of(kicked).written == [codec.disconnect5(props.ADMINISTRATIVE_ACTION, reason)]
    assert link_of(slow).written[0][2] == props.QUOTA_EXCEEDED
    await async_wait_until(lambda: link_of(kicked).closing)


async def test_an_mqtt5_session_expires_by_its_own_interval(engine: Engine) -> None:
    own = engine.session("d1", KEY, clean=False, online=False)
    own.version, own.expiry, own.disconnected_at = 5, 10.0, 1000.0
    default = engine.session("d2", KEY, clean=False, online=False)
    default.disconnected_at = 1000.0
    assert engine.registry.expire(60, now=1011.0) == 1  # its 10 s, not the default 60
    assert engine.registry.get("d1") is None and engine.registry.get("d2") is default
    assert engine.registry.expire(0, now=10**9) == 0  # default 0: kept for ever


async def test_a_delayed_will_waits_is_cancelled_by_a_resume_and_sent_when_dropped(
        engine: Engine) -> None:
    published: list[str] = []
    session = engine.session("d1", KEY, clean=False, online=False)
    will = Will("losant/d1/state", b"gone", 0, False, delay=3600)
    engine.registry.will_due(session, will, lambda s, w: published.append(w.topic))
    assert published == []  # waits its delay
    handle = engine.registry._wills["d1"][0]
    await engine.registry.take_over(incoming("d1", clean=False))
    assert handle.cancelled() and published == []  # resumed in time: never sent
    engine.registry.will_due(session, will, lambda s, w: published.append(w.topic))
    engine.registry.drop(session)  # the session ends first: the Will goes now
    assert published == ["losant/d1/state"]
    clean = engine.session("d2", KEY)
    engine.registry.will_due(clean, Will("losant/d2/state", b"x", 0, False, delay=3600),
                             lambda s, w: published.append(w.topic))
    assert published[-1] == "losant/d2/state"  # a clean session's Will does not wait
