"""Routing: subscriptions, retained messages and delivery to sessions, bounded per session.

One synchronous path from an accepted PUBLISH to the subscribers' connections: the
subscription trie gives the matching sessions, each delivery is checked against the
receiving session's policy (an in-memory lookup), then

* QoS 0 to an online session: the PUBLISH is encoded once per message and written to
  the session's link;
* QoS 1/2: the message joins the session's ``Outbox`` (queued while offline or while the
  in-flight window is full; see broker.mqtt.outbox) and is sent when the window has room.

Every session is bounded by ``max_queued_messages`` (QoS 1/2 held) and
``max_session_bytes`` (bytes held for it: waiting in its connection plus QoS 1/2 in
flight and queued). A live session past a bound makes the connections that feed it wait
(broker.flow: backpressure, and slow consumers); for an offline persistent session the
message is dropped and counted.

Retained messages live in a trie (a SUBSCRIBE walks only its filter's subtree) with
quotas: globally, per access key, and a small reserve per device for its own device
topics that no other key can take away. Retained messages for a SUBSCRIBE are sent by
one paced task per session (waiting for the client to read, yielding to other work), so
a SUBSCRIBE matching many retained messages cannot stall the broker or grow it.

With a broker state kept (broker.state), every change to the retained messages and to a
persistent session's subscriptions is marked for the next write-behind flush, and a
saved state comes back through the ``restore_*`` methods, within the same bounds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from amqtt.contexts import Action

from broker.audit import AuditLog
from broker.counters import Traffic
from broker.flow import FlowControl, Publisher
from broker.mqtt import codec
from broker.mqtt.link import LOW_WATER, Link
from broker.mqtt.outbox import OutMessage
from broker.mqtt.plugins import audit_fields, decide
from broker.mqtt.session import KeySession
from broker.periodic import spawn
from broker.settings import Settings
from broker.state.recorder import StateRecorder
from broker.topics import RetainedStore, SubscriptionTree, device_of, device_topic

logger = logging.getLogger(__name__)

DENIALS_AUDITED_PER_SECOND = 20
RETAINED_BATCH = 64  # retained messages sent between two yields to the event loop


class Retained:
    """One retained message (its topic as clients see it: unmounted), with the quota
    buckets it is counted in."""

    __slots__ = ("topic", "payload", "qos", "bucket", "app", "size")

    def __init__(self, topic: str, payload: bytes, qos: int, bucket: str,
                 app: str = "") -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.bucket = bucket  # "d:<device id>" (own-topic reserve) or "k:<key>"
        self.app = app  # "a:<application id>", counted with "k:" buckets
        self.size = len(topic.encode("utf-8", "surrogatepass")) + len(payload)


# Audit event of a denial -> the kind it is counted as (broker.metrics)
DENIAL_OF = {"publish_denied": "publish", "subscribe_denied": "subscribe",
             "retain_refused": "retain"}

@dataclass(slots=True)
class _Usage:
    count: int = 0
    size: int = 0


class Router:
    def __init__(self, settings: Settings, sessions: dict[str, KeySession], audit: AuditLog,
                 flow: FlowControl, state: StateRecorder | None = None,
                 traffic: Traffic | None = None) -> None:
        self.settings = settings
        self.state = state  # None: nothing is kept across restarts
        self.traffic = traffic if traffic is not None else Traffic()  # broker.metrics
        self.sessions = sessions
        self.audit = audit
        self.flow = flow
        # Subscribers are client ids: a session keeps its subscriptions across connections.
        self.subtree: SubscriptionTree[str] = SubscriptionTree()
        self.retained: RetainedStore[Retained] = RetainedStore()
        self._usage: dict[str, _Usage] = {}  # quota bucket -> retained count and bytes
        self._shared = _Usage()  # every retained message outside a device's own reserve
        self.retained_usage = _Usage()  # every retained message (for metrics)

    # ------------------------------------------------------------------ delivery
    def route(self, mount: str, topic: str, payload: bytes, qos: int,
              source: Publisher | None = None) -> None:
        """Deliver to every session of the application (``mount``: its topics' prefix in
        the trie) whose filters match and whose policy may read topic. ``source`` is the
        publishing connection, paused while a session it fed is past its bounds."""
        packet: bytes | None = None
        sessions = self.sessions
        for client_id, sub_qos in self.subtree.match(mount + topic).items():
            session = sessions.get(client_id)
            if session is None:
                continue
            if not decide(session, topic, Action.RECEIVE).allowed:
                self.traffic.denied["delivery"] += 1
                continue
            if qos and sub_qos:
                self.enqueue(session, OutMessage(topic, payload, min(qos, sub_qos)), source)
                continue
            link = session.link
            if link is None or session.kicked:
                continue
            if packet is None:
                packet = codec.publish_packet(topic.encode("utf-8", "surrogatepass"), payload,
                                              0, False)
            self.send_qos0(session, link, packet, source)

    def send_qos0(self, session: KeySession, link: Link, packet: bytes,
                  source: Publisher | None = None) -> None:
        """At most once: written unless the session already holds twice its byte bound
        (then dropped and counted); past the bound, ``source`` waits for it."""
        if link.is_closing():
            return
        held = session.outbox.held_bytes + link.buffered()
        dropped = held and held + len(packet) > 2 * self.settings.max_session_bytes
        if not dropped:
            link.write(packet)
            traffic = self.traffic
            traffic.msgs_out[0] += 1
            traffic.bytes_out[0] += len(packet)
        self.flow.delivered(session, source)
        if dropped:
            self.traffic.dropped["qos0_past_bounds"] += 1
            self.flow.qos0_dropped(session)

    def _over_budget(self, session: KeySession, size: int, buffered: int) -> bool:
        held = session.outbox.held_bytes + buffered
        return held > 0 and held + size > self.settings.max_session_bytes

    def enqueue(self, session: KeySession, message: OutMessage,
                source: Publisher | None = None) -> bool:
        """Hand a QoS 1/2 message to a session. A live session takes it whatever it holds
        (sent now if its in-flight window has room) and past its bounds makes ``source``
        wait (broker.flow); an offline one queues it within its bounds, else it is
        dropped and counted. False when dropped."""
        outbox = session.outbox
        link = session.link
        if link is None or session.kicked:
            if len(outbox) >= self.settings.max_queued_messages or \
                    self._over_budget(session, message.size, 0):
                self._dropped_offline(session, message)
                return False
            outbox.put(message)
            return True
        outbox.put(message)
        self.pump(session)
        self.flow.delivered(session, source)
        return True

    def _dropped_offline(self, session: KeySession, message: OutMessage) -> None:
        """Counted each time; logged once per episode (until the session reconnects or
        its queue has room again), with the count at its end."""
        self.traffic.dropped["offline_queue_full"] += 1
        if not session.dropped:
            logger.info("client %s is offline with its queue full (%d messages, %d bytes): "
                        "QoS %d messages for it are dropped until it reconnects",
                        session.client_id, len(session.outbox), session.outbox.held_bytes,
                        message.qos)
        session.dropped += 1

    def _end_drop_episode(self, session: KeySession) -> None:
        if session.dropped:
            logger.info("client %s: %d QoS 1/2 messages were dropped while it was offline "
                        "with its queue full", session.client_id, session.dropped)
            session.dropped = 0

    def pump(self, session: KeySession) -> None:
        """Send waiting messages while the session's in-flight window has room."""
        link = session.link
        if link is None or session.kicked:
            return
        write = link.write
        traffic = self.traffic
        for message in session.outbox.sendable(self.settings.max_inflight_messages):
            packet = codec.publish_packet(message.topic.encode("utf-8", "surrogatepass"),
                                          message.payload, message.qos, message.retain,
                                          message.packet_id)
            write(packet)
            traffic.msgs_out[message.qos] += 1
            traffic.bytes_out[message.qos] += len(packet)

    def resume(self, session: KeySession) -> None:
        """A session just (re)connected: drop what its new grant may not read, re-send
        what is unacknowledged (MQTT-4.4.0-1: same packet ids, DUP on PUBLISH), then send
        what waited, oldest first, before anything newer."""
        link = session.link
        if link is None:
            return
        self._end_drop_episode(session)
        self.regranted(session)
        write = link.write
        for packet_id, message in session.outbox.inflight.items():
            if message.released:
                write(codec.ack_packet(codec.PUBREL, packet_id))
            else:
                write(codec.publish_packet(message.topic.encode("utf-8", "surrogatepass"),
                                           message.payload, message.qos, message.retain,
                                           packet_id, dup=True))
        self.pump(session)
        self.flow.delivered(session, None)  # a long queue resumed: past its bounds?

    def regranted(self, session: KeySession) -> None:
        dropped = session.outbox.discard(
            lambda topic: not decide(session, topic, Action.RECEIVE).allowed)
        self.traffic.dropped["not_readable"] += dropped
        if session.congestion is not None:
            self.flow.acknowledged(session)  # fewer held: its publishers may go on

    def puback(self, session: KeySession, packet_id: int) -> None:
        if session.outbox.acknowledged(packet_id):
            self.pump(session)
            if session.congestion is not None:
                self.flow.acknowledged(session)

    def pubrec(self, session: KeySession, packet_id: int) -> None:
        if session.outbox.received(packet_id) and session.link is not None:
            session.link.write(codec.ack_packet(codec.PUBREL, packet_id))
            if session.congestion is not None:
                self.flow.acknowledged(session)

    def pubcomp(self, session: KeySession, packet_id: int) -> None:
        if session.outbox.completed(packet_id):
            self.pump(session)
            if session.congestion is not None:
                self.flow.acknowledged(session)

    # ------------------------------------------------------------------ subscriptions
    def forget(self, session: KeySession) -> None:
        """A session is gone: its subscriptions and anything held for it."""
        self.flow.release(session)
        self._end_drop_episode(session)
        self.subtree.remove_subscriber(session.client_id)
        session.outbox.clear()
        session.inflight_in = None
        session.retained_filters.clear()
        if session.journal is not None:
            session.journal.dropped()

    def subscribe(self, session: KeySession, requests: list[tuple[str, int]],
                  check: Callable[[KeySession, str], str | None]) -> list[int]:
        """Decide each filter of one SUBSCRIBE (the return codes, one per request), add
        the granted ones, and schedule their retained messages.

        A filter repeated in the packet, or already held, is one subscription: it is
        replaced (MQTT-3.8.4-3) and decided once. Past ``max_subscriptions`` the
        remaining new filters are refused without being looked at, and counted in one
        audit line, so an oversized SUBSCRIBE costs little. ``check`` returns the reason
        to refuse a filter (limits, policy), or None.
        """
        client_id, mount = session.client_id, session.mount
        limit = self.settings.max_subscriptions
        tree = self.subtree
        decided: dict[str, int] = {}
        granted: dict[str, int] = {}
        over_limit = 0
        for topic_filter, qos in requests:
            if topic_filter in decided:
                if decided[topic_filter] != codec.SUBACK_FAILURE:
                    decided[topic_filter] = granted[topic_filter] = qos
                    tree.add(mount + topic_filter, client_id, qos)
                continue
            if limit and tree.count_of(client_id) >= limit and not tree.has(
                    mount + topic_filter, client_id):
                decided[topic_filter] = codec.SUBACK_FAILURE
                over_limit += 1
                continue
            reason = check(session, topic_filter)
            if reason is not None:
                self.audit_denied("subscribe_denied", session, topic_filter, reason)
                decided[topic_filter] = codec.SUBACK_FAILURE
                continue
            tree.add(mount + topic_filter, client_id, qos)
            decided[topic_filter] = granted[topic_filter] = qos
        if over_limit:
            self.traffic.denied["subscribe"] += over_limit
            self.audit.event("subscribe_denied", reason=f"max_subscriptions {limit}: "
                             f"{over_limit} filters refused", **audit_fields(session))
        if granted:
            if session.journal is not None:
                for topic_filter, qos in granted.items():
                    session.journal.subscribed(topic_filter, qos)
            self._send_retained(session, granted)
        return [decided[topic_filter] for topic_filter, _ in requests]

    def unsubscribe(self, session: KeySession, filters: list[str]) -> None:
        for topic_filter in filters:
            self.subtree.remove(session.mount + topic_filter, session.client_id)
            session.retained_filters.pop(topic_filter, None)
            if session.journal is not None:
                session.journal.unsubscribed(topic_filter)

    def filters_of(self, session: KeySession) -> dict[str, int]:
        """The session's subscriptions as the client made them (unmounted)."""
        cut = len(session.mount)
        return {f[cut:]: qos for f, qos in self.subtree.filters_of(session.client_id).items()}

    # ------------------------------------------------------------------ retained
    def retain(self, session: KeySession, topic: str, payload: bytes, qos: int) -> str | None:
        """Keep (or, for an empty payload, delete [MQTT-3.3.1-10]) the retained message on
        ``topic`` in the session's application; returns why it was not kept, or None. The
        message is delivered live either way."""
        mounted = session.mount + topic
        old = self.retained.get(mounted)
        if not payload:
            if old is not None:
                self._release(old)
                self.retained.delete(mounted)
                self._saved(session.mount, topic, None)
            return None
        key = session.grant.key.key if session.grant else ""
        message = Retained(topic, payload, qos, f"k:{key}", f"a:{session.mount}")
        if old is not None:
            self._release(old)
        settings = self.settings
        refusal = None
        if device_of(topic, settings.device_prefix) == session.client_id and \
                settings.device_retained_reserve and self._fits(
                    self._usage.get(f"d:{session.client_id}"), message.size,
                    settings.device_retained_reserve, settings.device_retained_reserve_bytes):
            message.bucket, message.app = f"d:{session.client_id}", ""  # its own reserve
        else:
            refusal = self._shared_refusal(message)
        if refusal is not None:
            if old is not None:
                self._charge(old)  # the previous message stays retained
            return refusal
        self._charge(message)
        self.retained.set(mounted, message)
        self._saved(session.mount, topic, message)
        return None

    def _saved(self, mount: str, topic: str, message: Retained | None) -> None:
        if self.state is not None:
            self.state.retained_changed(mount, topic, message)

    @staticmethod
    def _fits(usage: _Usage | None, size: int, max_count: int, max_bytes: int) -> bool:
        count, used = (usage.count, usage.size) if usage is not None else (0, 0)
        return (not max_count or count < max_count) and (not max_bytes or used + size <= max_bytes)

    def _shared_refusal(self, message: Retained) -> str | None:
        settings, size = self.settings, message.size
        if not self._fits(self._usage.get(message.bucket), size, settings.max_retained_per_key,
                          settings.max_retained_bytes_per_key):
            return (f"key quota reached (max_retained_per_key {settings.max_retained_per_key},"
                    f" max_retained_bytes_per_key {settings.max_retained_bytes_per_key})")
        if not self._fits(self._usage.get(message.app), size, settings.max_retained_per_app,
                          settings.max_retained_bytes_per_app):
            return (f"application quota reached (max_retained_per_app "
                    f"{settings.max_retained_per_app}, max_retained_bytes_per_app "
                    f"{settings.max_retained_bytes_per_app})")
        if not self._fits(self._shared, size, settings.max_retained_messages,
                          settings.max_retained_bytes):
            return (f"max_retained_messages {settings.max_retained_messages} or "
                    f"max_retained_bytes {settings.max_retained_bytes} reached")
        return None

    def _charge(self, message: Retained, sign: int = 1) -> None:
        buckets = [message.bucket, message.app] if message.app else [message.bucket]
        for bucket in buckets:
            usage = self._usage.setdefault(bucket, _Usage())
            usage.count += sign
            usage.size += sign * message.size
            if not usage.count:
                del self._usage[bucket]
        self.retained_usage.count += sign
        self.retained_usage.size += sign * message.size
        if message.app:  # outside a device's reserve: the global limits count it
            self._shared.count += sign
            self._shared.size += sign * message.size

    def _release(self, message: Retained) -> None:
        self._charge(message, -1)

    def _drop_retained(self, topic_filter: str) -> int:
        doomed = [topic for topic, _ in self.retained.matching(topic_filter)]
        for topic in doomed:
            message = self.retained.get(topic)
            if message is not None:
                self._release(message)
                self.retained.delete(topic)
                self._saved(topic[:len(topic) - len(message.topic)], message.topic, None)
        return len(doomed)

    def drop_device_retained(self, device_id: str) -> int:
        """Delete the retained messages on a removed device's topics (in whichever
        application: '+' is the mount level). Returns how many."""
        return self._drop_retained(
            "+/" + device_topic(self.settings.device_prefix, device_id) + "/#")

    def drop_app_retained(self, mount: str) -> int:
        """Delete every retained message of a deleted application."""
        return self._drop_retained(mount + "#")

    # ------------------------------------------------------------------ saved state
    def restore_retained(self, mount: str, topic: str, payload: bytes, qos: int,
                         bucket: str) -> bool:
        """A saved retained message, counted in its quota buckets; False (not kept) when
        the quotas in force no longer leave room for it."""
        settings = self.settings
        reserve = bucket.startswith("d:")
        message = Retained(topic, payload, qos, bucket, "" if reserve else f"a:{mount}")
        if reserve:
            fits = bool(settings.device_retained_reserve) and self._fits(
                self._usage.get(bucket), message.size, settings.device_retained_reserve,
                settings.device_retained_reserve_bytes)
        else:
            fits = self._shared_refusal(message) is None
        if fits:  # one message per topic in a saved state: nothing to replace
            self._charge(message)
            self.retained.set(mount + topic, message)
            return True
        return False

    def restore_subscriptions(self, session: KeySession, filters: dict[str, int]) -> int:
        """A saved session's subscriptions, up to ``max_subscriptions``; returns how many
        did not fit."""
        limit = self.settings.max_subscriptions
        left_out = 0
        for topic_filter, qos in filters.items():
            if limit and self.subtree.count_of(session.client_id) >= limit:
                left_out += 1
                if session.journal is not None:
                    session.journal.unsubscribed(topic_filter)
                continue
            self.subtree.add(session.mount + topic_filter, session.client_id, qos)
        return left_out

    def restore_message(self, session: KeySession, message: OutMessage) -> bool:
        """A saved message of an offline session, in its order, within the session's
        bounds (as ``enqueue`` would for an offline session); False when it no longer
        fits."""
        if len(session.outbox) >= self.settings.max_queued_messages or \
                self._over_budget(session, message.size, 0):
            return False
        session.outbox.restored(message)
        return True

    def _send_retained(self, session: KeySession, granted: dict[str, int]) -> None:
        pending = session.retained_filters
        for topic_filter, qos in granted.items():
            pending[topic_filter] = qos
        if not session.retained_sending and session.link is not None:
            session.retained_sending = True
            spawn(self._retained_sender(session))

    async def _retained_sender(self, session: KeySession) -> None:
        """Send the retained messages of the session's newly granted filters, one filter
        at a time, waiting whenever the client has not taken what was sent."""
        link = session.link
        try:
            while session.retained_filters and link is not None:
                topic_filter = next(iter(session.retained_filters))
                qos = session.retained_filters.pop(topic_filter)
                sent = 0
                for _, message in self.retained.matching(session.mount + topic_filter):
                    if session.link is not link or session.kicked:
                        return
                    if not decide(session, message.topic, Action.RECEIVE).allowed:
                        continue
                    await self._send_one_retained(session, link, message,
                                                  min(qos, message.qos))
                    sent += 1
                    if sent % RETAINED_BATCH == 0:
                        await asyncio.sleep(0)
        finally:
            session.retained_sending = False

    async def _send_one_retained(self, session: KeySession, link: Link, message: Retained,
                                 qos: int) -> None:
        settings = self.settings
        if qos == 0:
            packet = codec.publish_packet(message.topic.encode("utf-8", "surrogatepass"),
                                          message.payload, 0, True)
            # Wait until the packet fits the session's budget beside what is still
            # buffered (a large message waits for an empty link): a reader that keeps up
            # is never taken for a slow consumer by its own retained messages.
            room = settings.max_session_bytes - session.outbox.held_bytes - len(packet)
            await link.writable(min(LOW_WATER, max(room, 0)))
            self.send_qos0(session, link, packet)
            return
        # QoS 1/2: wait for room in the in-flight window rather than fill the queue
        # (which would crowd out live messages and trip the slow-consumer bound).
        outbox = session.outbox
        while not link.is_closing() and (
                len(outbox) >= settings.max_inflight_messages
                or self._over_budget(session, message.size + 64, link.buffered())):
            await asyncio.sleep(0.005)
        if not link.is_closing():
            self.enqueue(session, OutMessage(message.topic, message.payload, qos, True))

    # ------------------------------------------------------------------ audit
    def audit_denied(self, event: str, session: KeySession, topic: str, reason: str,
                     **extra: object) -> None:
        """Audit a denial; at most DENIALS_AUDITED_PER_SECOND per session, so a client
        flooding denied PUBLISHes cannot fill the disk or stall the loop with writes
        (the excess is counted in an ``audit_suppressed`` event)."""
        self.traffic.denied[DENIAL_OF[event]] += 1
        now = time.monotonic()
        start, count, suppressed = session.denials or (now, 0, 0)
        if now - start >= 1.0:
            if suppressed:
                self.audit.suppressed += suppressed
                self.audit.event("audit_suppressed", **audit_fields(session),
                                 reason=f"{suppressed} denials not logged in 1 s")
            start, count, suppressed = now, 0, 0
        if count >= DENIALS_AUDITED_PER_SECOND:
            session.denials = (start, count, suppressed + 1)
            return
        session.denials = (start, count + 1, suppressed)
        logger.info("%s: client %s topic %r: %s", event, session.client_id, topic, reason)
        self.audit.event(event, reason=reason, topic=topic, **audit_fields(session), **extra)
