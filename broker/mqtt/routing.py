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
import math
import time
from collections.abc import Callable, Sequence

from amqtt.contexts import Action

from broker.core.audit import AuditLog
from broker.core.counters import Traffic
from broker.core.settings import Settings
from broker.mqtt import codec
from broker.mqtt import props as properties
from broker.mqtt.flow import FlowControl, Publisher
from broker.mqtt.keeper import StateKeeper
from broker.mqtt.link import Link
from broker.mqtt.outbox import MessageProps, OutMessage
from broker.mqtt.quotas import Limit, Quotas
from broker.mqtt.retained import RetainedMessages
from broker.mqtt.session import KeySession
from broker.mqtt.shared import SHARE_MARK, SharedSubscriptions, group_key, parse_shared
from broker.topics import SubscriptionTree
from broker.topics.trie import RETAIN_AS_PUBLISHED, options

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
        self.shared = SharedSubscriptions(self, lambda s: s.congestion is not None)
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
              source: Publisher | None = None, *, retain: bool = False,
              props: MessageProps | None = None, origin: str | None = None) -> None:
        """Deliver to every session of the application (``mount``: its topics' prefix in
        the trie) whose filters match and whose policy may read topic. ``source`` is the
        publishing connection, paused while a session it fed is past its bounds;
        ``origin`` its client id (No Local); ``retain`` the PUBLISH's flag (kept for
        subscriptions with Retain As Published); ``props`` its MQTT 5 properties."""
        plain: bytes | None = None  # the QoS 0 packet of MQTT 3.1.1, built once
        plain5: bytes | None = None  # and of MQTT 5, for a message without properties
        sessions = self.sessions
        matched, more = self.subtree.match(mount + topic, origin)
        for client_id, packed in matched.items():
            if client_id[0] == SHARE_MARK:  # a shared subscription: one member gets it
                self.shared.route(client_id, topic, payload, qos, packed, source, retain,
                                  props)
                continue
            session = sessions.get(client_id)
            if session is None:
                continue
            if not session.decide(topic, Action.RECEIVE).allowed:
                self.traffic.denied["delivery"] += 1
                continue
            keep = retain and bool(packed & RETAIN_AS_PUBLISHED)
            ids: tuple[int, ...] = ()
            if packed >> 6:
                ids = (packed >> 6, *more[client_id]) if more and client_id in more else (
                    packed >> 6,)
            if qos and packed & 3:
                self.enqueue(session, OutMessage(topic, payload, min(qos, packed & 3), keep,
                                                 props, ids), source)
                continue
            link = session.link
            if link is None or session.kicked:
                continue
            if session.version == 4 and not keep:
                if plain is None:
                    plain = codec.publish_packet(topic.encode("utf-8", "surrogatepass"),
                                                 payload, 0, False)
                packet: bytes | None = plain
            elif props is None and not ids and not keep and not (
                    session.limits is not None and session.limits.max_packet):
                if plain5 is None:
                    plain5 = codec.publish5(topic.encode("utf-8", "surrogatepass"), payload,
                                            0, False)
                packet = plain5
            else:
                packet = self.publish_bytes(session, topic, payload, 0, keep, props=props,
                                            ids=ids)
                if packet is None:
                    continue
            self.send_qos0(session, link, packet, source)  # type: ignore[arg-type]

    def publish_bytes(self, session: KeySession, topic: str, payload: bytes, qos: int,
                      retain: bool, packet_id: int = 0, dup: bool = False,
                      props: MessageProps | None = None, ids: tuple[int, ...] = (),
                      check_expiry: bool = True) -> bytes | None:
        """The PUBLISH a session gets, in its protocol version: with MQTT 5, the
        properties it carries, its remaining lifetime and the subscription identifiers it
        matched. None (counted) when it must not be sent: it has expired (MQTT-3.3.2-5),
        or it is larger than the client takes (MQTT-3.1.2-25)."""
        now = 0.0
        if props is not None and props.expires is not None:
            now = time.time()
            if check_expiry and props.expired(now):
                self.traffic.dropped["expired"] += 1
                return None
        encoded = topic.encode("utf-8", "surrogatepass")
        if session.version != 5:
            return codec.publish_packet(encoded, payload, qos, retain, packet_id, dup)
        body = b""
        if props is not None:
            body = props.forward
            if props.expires is not None:
                left = max(1, math.ceil(props.expires - now))
                body = properties.encode_body([(properties.MESSAGE_EXPIRY, left)]) + body
        if ids:
            body += properties.encode_body([(properties.SUBSCRIPTION_ID, list(ids))])
        packet = codec.publish5(encoded, payload, qos, retain, packet_id, dup,
                                properties.framed(body) if body else properties.EMPTY)
        limits = session.limits
        if limits is not None and limits.max_packet and len(packet) > limits.max_packet:
            self.traffic.dropped["too_large_for_client"] += 1
            return None
        return packet

    def send_qos0(self, session: KeySession, link: Link, packet: bytes,
                  source: Publisher | None = None) -> None:
        """At most once: written unless the session already holds twice its byte bound
        (then dropped and counted); past the bound, ``source`` waits for it."""
        if link.is_closing():
            return
        flow = self.flow
        held = flow.held_bytes(session)
        size = len(packet)
        dropped = held and held + size > 2 * self.settings.max_session_bytes
        if not dropped:
            link.write(packet)
            traffic = self.traffic
            traffic.msgs_out[0] += 1
            traffic.bytes_out[0] += size
        held = held if dropped else held + size
        if session.congestion is not None or flow.past_bounds(session, held):
            flow.delivered(session, source, held)  # within its bounds it has nothing to do
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
        if link is None or session.kicked or not session.outbox.waiting:
            return
        write = link.write
        traffic = self.traffic
        settings = self.settings
        window = settings.max_inflight_messages
        limits = session.limits
        if limits is not None and limits.receive_max < window:
            window = limits.receive_max  # the client's Receive Maximum (MQTT-4.9.0-2)
        outbox = session.outbox
        v5 = session.version == 5
        message_fits = not (v5 and limits is not None and limits.max_packet)
        for message in outbox.sendable(window, settings.max_session_bytes):
            if message.props is None and not message.sub_ids and message_fits:
                encode = codec.publish5 if v5 else codec.publish_packet
                packet: bytes | None = encode(
                    message.topic.encode("utf-8", "surrogatepass"), message.payload,
                    message.qos, message.retain, message.packet_id)
            else:
                packet = self.publish_bytes(session, message.topic, message.payload,
                                            message.qos, message.retain, message.packet_id,
                                            props=message.props, ids=message.sub_ids)
                if packet is None:  # expired, or too large for the client: not sent
                    outbox.drop(message)
                    continue
            assert packet is not None
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
        for packet_id, message in list(session.outbox.inflight.items()):
            if message.released:
                write(codec.ack_packet(codec.PUBREL, packet_id))
                continue
            packet = self.publish_bytes(session, message.topic, message.payload, message.qos,
                                        message.retain, packet_id, True, message.props,
                                        message.sub_ids, check_expiry=False)
            if packet is None:  # larger than what the client now takes
                session.outbox.drop(message)
            else:
                write(packet)
        self.pump(session)
        self.flow.delivered(session, None)  # a long queue resumed: past its bounds?

    def went_offline(self, session: KeySession) -> None:
        """A persistent session's connection ended: what waits for it of shared
        subscriptions goes to the other members of their groups; it queues within its
        bounds from now on, and what a live session held past them (backpressure lets it)
        is trimmed, newest first, counted as offline drops."""
        waiting = session.outbox.take_waiting(lambda message: message.share is not None)
        self.shared.hand_over(session, waiting)
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

    def pubrec_refused(self, session: KeySession, packet_id: int) -> None:
        """An MQTT 5 PUBREC with an error code: the client will not take the message, and
        the QoS 2 flow ends there (no PUBREL)."""
        message = session.outbox.inflight.get(packet_id)
        if message is not None and message.qos == 2 and not message.released:
            session.outbox.drop(message)
            self.pump(session)
            if session.congestion is not None:
                self.flow.acknowledged(session)

    def pubcomp(self, session: KeySession, packet_id: int) -> None:
        if session.outbox.completed(packet_id):
            self.pump(session)
            if session.congestion is not None:
                self.flow.acknowledged(session)

    # ------------------------------------------------------------------ subscriptions
    def forget(self, session: KeySession) -> None:
        """A session is gone: its subscriptions and anything held for it (what it held
        of shared subscriptions goes to the other members of their groups)."""
        self.flow.release(session)
        self._end_drop_episode(session)
        self.subtree.remove_subscriber(session.client_id)
        for key, topic_filter in self.shared.memberships(session.client_id).items():
            self._leave_group(session, key, topic_filter)
        held = list(session.outbox.inflight.values()) + list(session.outbox.waiting or ())
        session.outbox.clear()
        self.shared.hand_over(session, [m for m in held if m.share and not m.released])
        self._release_subscriptions(session)
        session.inflight_in = None
        session.retained_filters.clear()
        if session.journal is not None:
            session.journal.dropped()

    def subscribe(self, session: KeySession, requests: Sequence[codec.Subscription],
                  check: Callable[[KeySession, str], str | None],
                  sub_id: int = 0) -> tuple[list[int], str | None]:
        """Decide each filter of one SUBSCRIBE: the codes, one per request, as MQTT 5
        reason codes (the granted QoS, or why not: 0x87 not authorized, 0x8F invalid,
        0x97 a limit, 0x9E shared subscriptions off, 0xA2 wildcards off; an MQTT 3.1.1
        SUBACK says 0x80 for each of those), and the first refusal's reason. Adds the
        granted ones (with their options, and ``sub_id``), and schedules their retained
        messages (per Retain Handling; never for a shared subscription).

        A filter repeated in the packet, or already held, is one subscription: it is
        replaced (MQTT-3.8.4-3) and decided once. Past ``max_subscriptions``, or past
        the subscription bytes of the session, its key or its application, the
        remaining new filters are refused before the policy looks at them, and counted
        in one audit line: a refused filter costs its length, a granted one what the
        policy check costs. ``check`` returns the reason to refuse a filter (limits,
        policy), or None.
        """
        settings = self.settings
        limit = settings.max_subscriptions
        decided: dict[str, int] = {}
        granted: dict[str, int] = {}  # of those, the filters whose retained messages go
        over_limit = 0
        over_bytes: list[str] = []
        first_refusal: str | None = None
        for request in requests:
            topic_filter, qos = request.topic_filter, request.qos
            packed = options(qos, request.no_local, request.retain_as_published,
                             request.retain_handling, sub_id)
            if topic_filter in decided:
                if decided[topic_filter] < 0x80:
                    decided[topic_filter] = qos
                    self._add(session, topic_filter, packed)
                    if topic_filter in granted:
                        granted[topic_filter] = qos
                continue
            code, reason = self._subscribable(topic_filter, request)
            if code:
                decided[topic_filter] = code
                first_refusal = first_refusal or reason
                self.audit_denied("subscribe_denied", session, topic_filter, reason or "")
                continue
            held = self._holds(session, topic_filter)
            if limit and not held and self._count(session) >= limit:
                decided[topic_filter] = properties.QUOTA_EXCEEDED
                over_limit += 1
                continue
            cost = 0 if held else subscription_cost(topic_filter)
            refusal = self._subscription_bytes_refusal(session, cost) if cost else None
            if refusal is not None:
                decided[topic_filter] = properties.QUOTA_EXCEEDED
                over_bytes.append(refusal)
                continue
            shared = parse_shared(topic_filter)
            reason = check(session, shared[1] if shared else topic_filter)
            if reason is not None:
                self.audit_denied("subscribe_denied", session, topic_filter, reason)
                decided[topic_filter] = (
                    properties.QUOTA_EXCEEDED if reason.startswith("limit:") else
                    properties.TOPIC_FILTER_INVALID if reason == "invalid_filter" else
                    properties.NOT_AUTHORIZED)
                first_refusal = first_refusal or reason
                continue
            self._add(session, topic_filter, packed)
            if cost:  # a filter already held is replaced, not counted again
                self._charge_subscriptions(session, cost)
            decided[topic_filter] = qos
            handling = request.retain_handling
            if shared is None and (handling == 0 or (handling == 1 and not held)):
                granted[topic_filter] = qos
        for count, reason in ((over_limit, f"max_subscriptions {limit}"),
                              (len(over_bytes), over_bytes[0] if over_bytes else "")):
            if count:
                self.traffic.denied["subscribe"] += count
                first_refusal = first_refusal or reason
                self.audit.event("subscribe_denied", reason=f"{reason}: {count} filters "
                                 "refused", **session.audit_fields())
        if session.journal is not None:
            for topic_filter, code in decided.items():
                if code < 0x80:
                    session.journal.subscribed(topic_filter, self._options_of(session,
                                                                              topic_filter))
        if granted:
            self.retained.send_for(session, granted)
        return [decided[request.topic_filter] for request in requests], first_refusal

    def _subscribable(self, topic_filter: str,
                      request: codec.Subscription) -> tuple[int, str | None]:
        """A reason code and its reason for a filter the broker takes from nobody (its
        form, or what the settings turn off); (0, None) otherwise."""
        try:
            shared = parse_shared(topic_filter)
        except ValueError:
            return properties.TOPIC_FILTER_INVALID, "invalid_filter"
        if shared is not None:
            if not self.settings.shared_subscriptions:
                return properties.SHARED_SUBS_NOT_SUPPORTED, "shared subscriptions are off"
            if request.no_local:  # MQTT-3.8.3-4
                raise codec.ProtocolViolation("No Local on a shared subscription")
        inner = shared[1] if shared else topic_filter
        if not self.settings.wildcard_subscriptions and ("+" in inner or "#" in inner):
            return properties.WILDCARD_SUBS_NOT_SUPPORTED, "wildcard subscriptions are off"
        return 0, None

    def _holds(self, session: KeySession, topic_filter: str) -> bool:
        shared = parse_shared(topic_filter)
        if shared is None:
            return self.subtree.has(session.mount + topic_filter, session.client_id)
        return group_key(session.mount, *shared) in self.shared.memberships(
            session.client_id)

    def _count(self, session: KeySession) -> int:
        return self.subtree.count_of(session.client_id) + len(
            self.shared.memberships(session.client_id))

    def _add(self, session: KeySession, topic_filter: str, packed: int) -> None:
        shared = parse_shared(topic_filter)
        if shared is None:
            self.subtree.add(session.mount + topic_filter, session.client_id, packed)
            return
        key = group_key(session.mount, *shared)
        if self.shared.join(session, key, topic_filter, packed):
            self.subtree.add(session.mount + shared[1], key, 2)  # members' QoS apply

    def _leave_group(self, session: KeySession, key: str, topic_filter: str) -> bool:
        left, empty = self.shared.leave(session.client_id, key)
        if empty:
            shared = parse_shared(topic_filter)
            assert shared is not None
            self.subtree.remove(session.mount + shared[1], key)
        return left

    def _options_of(self, session: KeySession, topic_filter: str) -> int:
        shared = parse_shared(topic_filter)
        if shared is None:
            return self.subtree.filters_of(session.client_id).get(
                session.mount + topic_filter, 0)
        return self.shared.options_of(session.client_id, group_key(session.mount, *shared))

    def unsubscribe(self, session: KeySession, filters: list[str]) -> list[int]:
        """Remove the filters; for each, 0x00, or 0x11 when it was not subscribed."""
        codes = []
        for topic_filter in filters:
            try:
                shared = parse_shared(topic_filter)
            except ValueError:
                shared = None
            if shared is None:
                removed = self.subtree.remove(session.mount + topic_filter, session.client_id)
            else:
                removed = self._leave_group(session, group_key(session.mount, *shared),
                                            topic_filter)
            if removed:
                self._charge_subscriptions(session, -subscription_cost(topic_filter), -1)
            codes.append(properties.SUCCESS if removed else properties.NO_SUBSCRIPTION_EXISTED)
            session.retained_filters.pop(topic_filter, None)
            if session.journal is not None:
                session.journal.unsubscribed(topic_filter)
        return codes

    def deliver_qos0(self, session: KeySession, topic: str, payload: bytes, retain: bool,
                     props: MessageProps | None, ids: tuple[int, ...],
                     source: Publisher | None = None) -> None:
        """One QoS 0 message to one live session (a shared subscription's member)."""
        link = session.link
        if link is None or session.kicked:
            return
        packet = self.publish_bytes(session, topic, payload, 0, retain, props=props, ids=ids)
        if packet is not None:
            self.send_qos0(session, link, packet, source)

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
        """The session's subscriptions as the client made them (unmounted), with their
        options (``options``), shared ones included."""
        cut = len(session.mount)
        out = {f[cut:]: packed
               for f, packed in self.subtree.filters_of(session.client_id).items()}
        for key, topic_filter in self.shared.memberships(session.client_id).items():
            out[topic_filter] = self.shared.options_of(session.client_id, key)
        return out

    # ------------------------------------------------------------------ saved state
    def restore_subscriptions(self, session: KeySession, filters: dict[str, int]) -> int:
        """A saved session's subscriptions, within ``max_subscriptions`` and the
        subscription bytes; returns how many did not fit."""
        limit = self.settings.max_subscriptions
        left_out = 0
        for topic_filter, packed in filters.items():
            cost = subscription_cost(topic_filter)
            if (limit and self._count(session) >= limit) or \
                    self._subscription_bytes_refusal(session, cost) is not None:
                left_out += 1
                if session.journal is not None:
                    session.journal.unsubscribed(topic_filter)
                continue
            self._add(session, topic_filter, packed)
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
