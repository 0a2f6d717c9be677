"""Routing: subscriptions and delivery to sessions, bounded per session.

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
(broker.mqtt.flow: backpressure, and slow consumers); for an offline persistent session the
message is dropped and counted.

Retained messages (kept within quotas, sent paced after a SUBSCRIBE) are
broker.mqtt.retained's, which the router owns as ``retained``.

With a broker state kept (broker.state), every change to a persistent session's
subscriptions is marked for the next write-behind flush, and a saved state comes back
through the ``restore_*`` methods, within the same bounds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from amqtt.contexts import Action

from broker.core.audit import AuditLog
from broker.core.counters import Traffic
from broker.core.settings import Settings
from broker.mqtt import codec
from broker.mqtt.flow import FlowControl, Publisher
from broker.mqtt.keeper import StateKeeper
from broker.mqtt.link import Link
from broker.mqtt.outbox import OutMessage
from broker.mqtt.quotas import Limit, Quotas
from broker.mqtt.retained import RetainedMessages
from broker.mqtt.session import KeySession
from broker.topics import SubscriptionTree

logger = logging.getLogger(__name__)

# What one level of a subscription may cost in the trie and its indexes (a node, its
# children's dict, the level's string; measured: 1,000 filters of 31 distinct levels
# took 12.4 MiB, about 410 bytes a level). Shared levels cost less: an upper bound.
SUBSCRIPTION_LEVEL_BYTES = 400


def subscription_cost(topic_filter: str) -> int:
    """The bytes a subscription is counted as: its filter and its levels in the trie."""
    return (len(topic_filter.encode("utf-8", "surrogatepass"))
            + SUBSCRIPTION_LEVEL_BYTES * (topic_filter.count("/") + 1))


# Audit event of a denial -> the kind it is counted as (broker.services.metrics)
DENIAL_OF = {"publish_denied": "publish", "subscribe_denied": "subscribe",
             "retain_refused": "retain"}

class Router:
    def __init__(self, settings: Settings, sessions: dict[str, KeySession], audit: AuditLog,
                 flow: FlowControl, state: StateKeeper | None = None,
                 traffic: Traffic | None = None) -> None:
        self.settings = settings
        self.state = state  # None: nothing is kept across restarts
        self.traffic = traffic if traffic is not None else Traffic()  # broker.services.metrics
        self.sessions = sessions
        self.audit = audit
        self.flow = flow
        # Subscribers are client ids: a session keeps its subscriptions across connections.
        self.subtree: SubscriptionTree[str] = SubscriptionTree()
        self.retained = RetainedMessages(settings, self, state)
        # Subscription bytes (``subscription_cost``) by session, key and application.
        self.subscription_quotas = Quotas()
        self.subscription_limits = (
            Limit(0, settings.max_subscription_bytes, ("", "max_subscription_bytes")),
            Limit(0, settings.max_subscription_bytes_per_key,
                  ("", "max_subscription_bytes_per_key")),
            Limit(0, settings.max_subscription_bytes_per_app,
                  ("", "max_subscription_bytes_per_app")))

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
            if not session.decide(topic, Action.RECEIVE).allowed:
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

    def over_budget(self, session: KeySession, size: int, buffered: int) -> bool:
        held = session.outbox.held_bytes + buffered
        return held > 0 and held + size > self.settings.max_session_bytes

    def enqueue(self, session: KeySession, message: OutMessage,
                source: Publisher | None = None) -> bool:
        """Hand a QoS 1/2 message to a session. A live session takes it (sent now if its
        in-flight window has room) and past its bounds makes ``source`` wait
        (broker.mqtt.flow); what cannot wait (no ``source``: the HTTP API, a Will) is dropped
        and counted past the session's ceiling. An offline session queues it within its
        bounds, else it is dropped and counted. False when dropped."""
        outbox = session.outbox
        link = session.link
        if link is None or session.kicked:
            if len(outbox) >= self.settings.max_queued_messages or \
                    self.over_budget(session, message.size, 0):
                self._dropped_offline(session, message)
                return False
            outbox.put(message)
            return True
        if (source is None or not source.pausable) and self.flow.past_ceiling(session):
            self.traffic.dropped["live_queue_full"] += 1
            self.flow.live_dropped(session)
            return False
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
        settings = self.settings
        for message in session.outbox.sendable(settings.max_inflight_messages,
                                               settings.max_session_bytes):
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

    def went_offline(self, session: KeySession) -> None:
        """A persistent session's connection ended: it queues within its bounds from now
        on, and what a live session held past them (backpressure lets it) is trimmed,
        newest first, counted as offline drops."""
        trimmed = session.outbox.trim(self.settings.max_queued_messages,
                                      self.settings.max_session_bytes)
        if trimmed:
            self.traffic.dropped["offline_queue_full"] += trimmed
            session.dropped += trimmed
            logger.info("client %s went offline holding more than its bounds: %d queued "
                        "messages dropped, newest first", session.client_id, trimmed)

    def regranted(self, session: KeySession) -> None:
        dropped = session.outbox.discard(
            lambda topic: not session.decide(topic, Action.RECEIVE).allowed)
        self.traffic.dropped["not_readable"] += dropped
        if dropped and session.congestion is not None:
            self.flow.acknowledged(session)  # fewer held: its publishers may go on

    def puback(self, session: KeySession, packet_id: int) -> None:
        if session.outbox.acknowledged(packet_id):
            self.pump(session)
            if session.congestion is not None:
                self.flow.acknowledged(session)

    def pubrec(self, session: KeySession, packet_id: int) -> None:
        held = session.outbox.held_bytes
        if session.outbox.received(packet_id) and session.link is not None:
            session.link.write(codec.ack_packet(codec.PUBREL, packet_id))
            # Progress only when the payload was let go (a repeated PUBREC drains nothing).
            if session.congestion is not None and session.outbox.held_bytes < held:
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
        self._release_subscriptions(session)
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
        replaced (MQTT-3.8.4-3) and decided once. Past ``max_subscriptions``, or past
        the subscription bytes of the session, its key or its application, the
        remaining new filters are refused before the policy looks at them, and counted
        in one audit line: a refused filter costs its length, a granted one what the
        policy check costs. ``check`` returns the reason to refuse a filter (limits,
        policy), or None.
        """
        client_id, mount = session.client_id, session.mount
        limit = self.settings.max_subscriptions
        tree = self.subtree
        decided: dict[str, int] = {}
        granted: dict[str, int] = {}
        over_limit = 0
        over_bytes: list[str] = []
        for topic_filter, qos in requests:
            if topic_filter in decided:
                if decided[topic_filter] != codec.SUBACK_FAILURE:
                    decided[topic_filter] = granted[topic_filter] = qos
                    tree.add(mount + topic_filter, client_id, qos)
                continue
            held = tree.has(mount + topic_filter, client_id)
            if limit and not held and tree.count_of(client_id) >= limit:
                decided[topic_filter] = codec.SUBACK_FAILURE
                over_limit += 1
                continue
            cost = 0 if held else subscription_cost(topic_filter)
            refusal = self._subscription_bytes_refusal(session, cost) if cost else None
            if refusal is not None:
                decided[topic_filter] = codec.SUBACK_FAILURE
                over_bytes.append(refusal)
                continue
            reason = check(session, topic_filter)
            if reason is not None:
                self.audit_denied("subscribe_denied", session, topic_filter, reason)
                decided[topic_filter] = codec.SUBACK_FAILURE
                continue
            tree.add(mount + topic_filter, client_id, qos)
            if cost:  # a filter already held is replaced, not counted again
                self._charge_subscriptions(session, cost)
            decided[topic_filter] = granted[topic_filter] = qos
        for count, reason in ((over_limit, f"max_subscriptions {limit}"),
                              (len(over_bytes), over_bytes[0] if over_bytes else "")):
            if count:
                self.traffic.denied["subscribe"] += count
                self.audit.event("subscribe_denied", reason=f"{reason}: {count} filters "
                                 "refused", **session.audit_fields())
        if granted:
            if session.journal is not None:
                for topic_filter, qos in granted.items():
                    session.journal.subscribed(topic_filter, qos)
            self.retained.send_for(session, granted)
        return [decided[topic_filter] for topic_filter, _ in requests]

    def unsubscribe(self, session: KeySession, filters: list[str]) -> None:
        for topic_filter in filters:
            if self.subtree.remove(session.mount + topic_filter, session.client_id):
                self._charge_subscriptions(session, -subscription_cost(topic_filter), -1)
            session.retained_filters.pop(topic_filter, None)
            if session.journal is not None:
                session.journal.unsubscribed(topic_filter)

    def _subscription_buckets(self, session: KeySession) -> tuple[str, str, str]:
        """Where a session's subscriptions are counted: itself, its access key (the one
        it is connected with now: see ``rekeyed``), its application."""
        key = session.grant.key.key if session.grant is not None else ""
        return f"s:{session.client_id}", f"k:{key}", f"a:{session.mount}"

    def _subscription_bytes_refusal(self, session: KeySession, cost: int) -> str | None:
        quotas = self.subscription_quotas
        for bucket, limit, what in zip(self._subscription_buckets(session),
                                       self.subscription_limits,
                                       ("session", "key", "application"), strict=True):
            refusal = limit.refusal(quotas.get(bucket), cost, f"{what} subscription")
            if refusal is not None:
                return refusal
        return None

    def _charge_subscriptions(self, session: KeySession, cost: int, count: int = 1) -> None:
        for bucket in self._subscription_buckets(session):
            self.subscription_quotas.charge(bucket, cost, count)

    def _release_subscriptions(self, session: KeySession) -> None:
        usage = self.subscription_quotas.get(f"s:{session.client_id}")
        if usage is not None:
            self._charge_subscriptions(session, -usage.size, -usage.count)

    def rekeyed(self, session: KeySession, new_key: str) -> None:
        """A stored session resumed under another access key: its subscriptions count
        against that key from now on."""
        old = session.grant.key.key if session.grant is not None else ""
        usage = self.subscription_quotas.get(f"s:{session.client_id}")
        if usage is not None and old != new_key:
            self.subscription_quotas.charge(f"k:{old}", -usage.size, -usage.count)
            self.subscription_quotas.charge(f"k:{new_key}", usage.size, usage.count)

    def filters_of(self, session: KeySession) -> dict[str, int]:
        """The session's subscriptions as the client made them (unmounted)."""
        cut = len(session.mount)
        return {f[cut:]: qos for f, qos in self.subtree.filters_of(session.client_id).items()}

    # ------------------------------------------------------------------ saved state
    def restore_subscriptions(self, session: KeySession, filters: dict[str, int]) -> int:
        """A saved session's subscriptions, within ``max_subscriptions`` and the
        subscription bytes; returns how many did not fit."""
        limit = self.settings.max_subscriptions
        left_out = 0
        for topic_filter, qos in filters.items():
            cost = subscription_cost(topic_filter)
            if (limit and self.subtree.count_of(session.client_id) >= limit) or \
                    self._subscription_bytes_refusal(session, cost) is not None:
                left_out += 1
                if session.journal is not None:
                    session.journal.unsubscribed(topic_filter)
                continue
            self.subtree.add(session.mount + topic_filter, session.client_id, qos)
            self._charge_subscriptions(session, cost)
        return left_out

    def restore_message(self, session: KeySession, message: OutMessage) -> bool:
        """A saved message of an offline session, in its order, within the session's
        bounds (as ``enqueue`` would for an offline session); False when it no longer
        fits."""
        if len(session.outbox) >= self.settings.max_queued_messages or \
                self.over_budget(session, message.size, 0):
            return False
        session.outbox.restored(message)
        return True

    # ------------------------------------------------------------------ audit
    def audit_denied(self, event: str, session: KeySession, topic: str, reason: str,
                     **extra: object) -> None:
        """A denial, counted (metrics) and audited (throttled per session: AuditLog)."""
        self.traffic.denied[DENIAL_OF[event]] += 1
        self.audit.denied(event, session, topic, reason, **extra)
