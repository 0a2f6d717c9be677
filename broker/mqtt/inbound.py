"""What a session sends in: PUBLISH (with its acknowledgement), the Will, SUBSCRIBE checks.

Each PUBLISH is checked in order — its publish rate (when read: ``rate_exceeded``), the
session is not being kicked, the topic's syntax and limits, the session's policy — then
routed and retained, all synchronously (no await between the packet and the
subscribers' connections). QoS 2 is
MQTT's "method B" (§4.3.3): the message is passed on when it arrives and only its packet
id is kept until PUBREL, so a re-sent PUBLISH (DUP, also after a persistent session
reconnects) is recognised and not delivered twice (docs/delivery.md). With
``[persistence] sync`` the acknowledgement waits until what the PUBLISH changed is saved
(broker.state.recorder), and so does the PUBCOMP that ends an incoming QoS 2 flow.
"""

from __future__ import annotations

import enum
import time
from typing import NamedTuple

from amqtt.contexts import Action

from broker.core.audit import AuditLog
from broker.core.settings import Settings
from broker.mqtt import codec
from broker.mqtt import props as properties
from broker.mqtt.flow import Publisher
from broker.mqtt.keeper import StateKeeper
from broker.mqtt.link import Link
from broker.mqtt.outbox import MessageProps
from broker.mqtt.routing import Router
from broker.mqtt.session import KeySession, Will
from broker.policy.limits import take_token, topic_limit_problem
from broker.topics import validate_topic_name
from keystore.errors import ValidationError


class Verdict(enum.Enum):
    """What became of an incoming PUBLISH."""

    ACCEPTED = "accepted"
    DROPPED = "dropped"  # denied, acknowledged all the same (denied_publish = "drop")
    CLOSE = "close"  # the connection ends, without acknowledging


class Outcome(NamedTuple):
    verdict: Verdict
    code: int = 0  # the MQTT 5 reason code (refused, or why the connection ends)
    reason: str = ""  # the rule class, for an MQTT 5 reason string


ACCEPTED = Outcome(Verdict.ACCEPTED)

# PUBLISH topics found valid and within the topic limits, remembered (the limits do not
# change while the daemon runs; a device repeats its topics); past this many, all
# forgotten at once.
VALID_TOPICS_KEPT = 4096


class Inbound:
    def __init__(self, settings: Settings, router: Router, audit: AuditLog,
                 state: StateKeeper | None = None) -> None:
        self.settings = settings
        self.router = router
        self.audit = audit
        # Acknowledge once saved: with [persistence] sync only.
        self._saved_first = state if state is not None and state.sync else None
        self._valid_topics: dict[str, None] = {}  # see VALID_TOPICS_KEPT

    def publish_packet(self, session: KeySession, link: Link, packet: codec.Publish,
                       source: Publisher | None = None,
                       props: MessageProps | None = None) -> Outcome | None:
        """An incoming PUBLISH and its acknowledgement: None, or the outcome that ends the
        connection, with its reason code and rule class (MQTT 5 says them in a
        DISCONNECT; 3.1.1 just closes).
        ``source``, the connection it came in on, waits while a session it fed is past
        its bounds (broker.mqtt.flow)."""
        qos, packet_id = packet.qos, packet.packet_id
        pending = session.inflight_in
        if qos == 2 and pending and packet_id in pending:  # seen: not passed on twice
            if packet.dup or packet_id not in session.restored_in:
                self.acknowledge(link, self._ack(session, codec.PUBREC, packet_id, ACCEPTED))
                return None
            # A restored id the client reuses without DUP: it had its PUBCOMP before the
            # daemon died and the release was not saved; this is a new message.
            released(session, packet_id)
        if qos == 2 and pending and len(pending) >= self.settings.max_queued_messages:
            # amqtt kept every unreleased QoS 2 message without limit.
            self.audit.event("bad_packet", reason="too many unacknowledged QoS 2 messages "
                             "(no PUBREL)", **session.audit_fields())
            return Outcome(Verdict.CLOSE, properties.RECEIVE_MAXIMUM_EXCEEDED,
                           "receive maximum")
        outcome = self.publish(session, packet.topic, packet.payload, qos, packet.retain,
                               source, props)
        if outcome.verdict is Verdict.CLOSE:
            return outcome if outcome.code else outcome._replace(
                code=properties.UNSPECIFIED_ERROR)
        if qos == 1:
            self.acknowledge(link, self._ack(session, codec.PUBACK, packet_id, outcome))
        elif qos == 2:
            if outcome.verdict is Verdict.ACCEPTED or session.version != 5:
                if session.inflight_in is None:
                    session.inflight_in = set()
                session.inflight_in.add(packet_id)
                if session.journal is not None:
                    session.journal.saved(session)
            # MQTT 5: a refused QoS 2 flow ends with the PUBREC (no PUBREL follows).
            self.acknowledge(link, self._ack(session, codec.PUBREC, packet_id, outcome))
        return None

    def _ack(self, session: KeySession, kind: int, packet_id: int, outcome: Outcome) -> bytes:
        """PUBACK or PUBREC: MQTT 3.1.1 acknowledges a denied message all the same; MQTT 5
        says 0x87 Not authorized, with its rule class as the reason string."""
        if session.version != 5 or outcome.verdict is Verdict.ACCEPTED:
            return codec.ack_packet(kind, packet_id)  # MQTT 5's short form is the same
        return codec.ack5(kind, packet_id, outcome.code, self.reason_props(session,
                                                                          outcome.reason))

    def reason_props(self, session: KeySession, reason: str) -> bytes:
        """A Reason String property for an MQTT 5 refusal, unless the reason strings are
        off, or the client asked for no problem information on acknowledgements."""
        limits = session.limits
        if not reason or not self.settings.reason_strings or (
                limits is not None and not limits.problem_info):
            return b""
        return properties.encode([(properties.REASON_STRING, reason_text(reason))])

    def rate_exceeded(self, session: KeySession, first: int, body: bytes) -> bool:
        """A PUBLISH just read is past ``max_publish_rate`` (audited; the connection
        ends). Counted as the client sends, not when a paused connection handles it."""
        rate = self.settings.max_publish_rate
        if not rate:
            return False
        allowed, session.bucket = take_token(session.bucket, rate, time.monotonic())
        if allowed:
            return False
        try:
            topic = codec.parse_publish(first, body).topic
        except codec.MalformedPacket:
            topic = ""
        self.router.audit_denied("publish_denied", session, topic, "rate_limited")
        return True

    def acknowledge(self, link: Link, packet: bytes) -> None:
        """PUBACK, PUBREC or PUBCOMP: at once, or with ``sync`` once what the packet
        changed is saved (the acknowledgements keep their order either way)."""
        if self._saved_first is None:
            link.write(packet)
        else:
            self._saved_first.after_commit(link.write, packet)

    def publish(self, session: KeySession, topic: str, data: bytes, qos: int,
                retain: bool, source: Publisher | None = None,
                props: MessageProps | None = None) -> Outcome:
        """Check, route and retain one incoming PUBLISH."""
        if session.kicked:
            return Outcome(Verdict.CLOSE)  # revoked or being disconnected: nothing more
        valid = self._valid_topics
        if topic not in valid:
            try:
                validate_topic_name(topic)
            except ValidationError as exc:
                problem: str | None = str(exc)
            else:
                problem = self._topic_limit(topic)
            if problem is not None:
                # MQTT-3.3.2-2 / 4.7.3-1: a malformed PUBLISH topic is a protocol error.
                self.router.audit_denied("publish_denied", session, topic,
                                         f"invalid_topic: {problem}")
                return Outcome(Verdict.CLOSE, properties.TOPIC_NAME_INVALID, "invalid_topic")
            if len(valid) >= VALID_TOPICS_KEPT:
                valid.clear()
            valid[topic] = None
        decision = session.decide(topic, Action.PUBLISH)
        if not decision.allowed:
            self.router.audit_denied("publish_denied", session, topic, decision.reason)
            if self.settings.denied_publish == "disconnect":
                # no PUBACK: the client must not think it was accepted
                return Outcome(Verdict.CLOSE, properties.NOT_AUTHORIZED, decision.reason)
            return Outcome(Verdict.DROPPED, properties.NOT_AUTHORIZED, decision.reason)
        self.accepted(session.mount, topic, data, qos, source, retain=retain, props=props,
                      origin=session.client_id)
        if retain:
            self.retain(session, topic, data, qos, props)
        return ACCEPTED

    def accepted(self, mount: str, topic: str, data: bytes, qos: int,
                 source: Publisher | None = None, *, retain: bool = False,
                 props: MessageProps | None = None, origin: str | None = None) -> None:
        """A message let in (a PUBLISH that passed its checks, or device state over the
        HTTP API): routed to the application's subscribers and counted."""
        self.router.route(mount, topic, data, qos, source, retain=retain, props=props,
                          origin=origin)
        traffic = self.router.traffic
        traffic.msgs_in[qos] += 1
        traffic.bytes_in[qos] += len(data)

    def retain(self, session: KeySession, topic: str, data: bytes, qos: int,
               props: MessageProps | None = None) -> None:
        refusal = self.router.retained.retain(session, topic, data, qos, props)
        if refusal is not None:
            self.router.audit_denied("retain_refused", session, topic, refusal)

    def publish_will(self, session: KeySession, will: Will) -> None:
        """The Will of a connection that ended without DISCONNECT, checked like a PUBLISH
        of the session that set it."""
        problem = self._topic_limit(will.topic)
        decision = session.decide(will.topic, Action.PUBLISH)
        if problem is not None or not decision.allowed:
            reason = f"limit: {problem}" if problem is not None else decision.reason
            self.router.audit_denied("publish_denied", session, will.topic, reason, will=True)
            return
        self.accepted(session.mount, will.topic, will.payload, will.qos,
                      retain=will.retain, props=will.props, origin=session.client_id)
        if will.retain:
            self.retain(session, will.topic, will.payload, will.qos, will.props)

    def subscribe_refusal(self, session: KeySession, topic_filter: str) -> str | None:
        """Why a SUBSCRIBE filter is refused (limits, then policy), or None."""
        problem = self._topic_limit(topic_filter)
        if problem is not None:
            return f"limit: {problem}"
        decision = session.decide(topic_filter, Action.SUBSCRIBE)
        return None if decision.allowed else decision.reason

    def _topic_limit(self, topic: str) -> str | None:
        return topic_limit_problem(topic, self.settings.max_topic_length,
                                   self.settings.max_topic_levels)


def released(session: KeySession, packet_id: int) -> None:
    """An incoming QoS 2 packet id is free again (PUBREL, or see ``publish_packet``)."""
    if session.inflight_in:
        session.inflight_in.discard(packet_id)
        if not session.inflight_in:
            session.inflight_in = None
    if packet_id in session.restored_in:
        session.restored_in = session.restored_in - {packet_id}
    if session.journal is not None:
        session.journal.saved(session)


# The rule classes a refusal names in an MQTT 5 reason string: never a key's lists, ids
# or topics, only what kind of rule said no.
REASON_TEXT = {
    "not_in_scope": "device not in the key's scope",
    "device_prefix": "topic under the device prefix is not a device's",
    "dollar_topic": "$ topics are not available",
    "topic_mode_none": "key has no custom topics",
    "not_in_list": "topic not in the key's topic list",
    "in_except_list": "topic in the key's excluded topics",
    "invalid_topic": "invalid topic name",
    "invalid_filter": "invalid topic filter",
    "inactive": "key inactive",
    "expired": "key expired",
    "unknown_device": "client id is not a device",
    "device_not_in_scope": "device not in the key's scope",
    "ip_denied": "address not allowed by the key",
    "ip_not_in_list": "address not allowed by the key",
    "ip_in_except_list": "address not allowed by the key",
    "will_denied": "Will topic not allowed",
    "bad_credentials": "bad user name or password",
    "banned": "address banned after failed attempts",
    "rate_limited": "publish rate limit",
    "malformed_packet": "malformed packet",
    "protocol_error": "protocol error",
    "packet_too_large": "packet too large",
    "keep_alive": "keep alive timeout",
    "topic_aliases": "topic aliases past the session's bytes",
}


def reason_text(reason: str) -> str:
    """The short reason string for a rule class (a limit names the limit)."""
    if reason.startswith("limit: "):
        return reason.removeprefix("limit: ")
    return REASON_TEXT.get(reason, reason.replace("_", " "))
