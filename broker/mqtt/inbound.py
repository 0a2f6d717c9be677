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

from amqtt.contexts import Action

from broker.core.audit import AuditLog
from broker.core.settings import Settings
from broker.mqtt import codec
from broker.mqtt.flow import Publisher
from broker.mqtt.keeper import StateKeeper
from broker.mqtt.link import Link
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


class Inbound:
    def __init__(self, settings: Settings, router: Router, audit: AuditLog,
                 state: StateKeeper | None = None) -> None:
        self.settings = settings
        self.router = router
        self.audit = audit
        # Acknowledge once saved: with [persistence] sync only.
        self._saved_first = state if state is not None and state.sync else None

    def publish_packet(self, session: KeySession, link: Link, packet: codec.Publish,
                       source: Publisher | None = None) -> bool:
        """An incoming PUBLISH and its acknowledgement; False ends the connection.
        ``source``, the connection it came in on, waits while a session it fed is past
        its bounds (broker.mqtt.flow)."""
        qos, packet_id = packet.qos, packet.packet_id
        pending = session.inflight_in
        if qos == 2 and pending and packet_id in pending:  # seen: not passed on twice
            if packet.dup or packet_id not in session.restored_in:
                self.acknowledge(link, codec.ack_packet(codec.PUBREC, packet_id))
                return True
            # A restored id the client reuses without DUP: it had its PUBCOMP before the
            # daemon died and the release was not saved; this is a new message.
            released(session, packet_id)
        if qos == 2 and pending and len(pending) >= self.settings.max_queued_messages:
            # amqtt kept every unreleased QoS 2 message without limit.
            self.audit.event("bad_packet", reason="too many unacknowledged QoS 2 messages "
                             "(no PUBREL)", **session.audit_fields())
            return False
        verdict = self.publish(session, packet.topic, packet.payload, qos, packet.retain,
                               source)
        if verdict is Verdict.CLOSE:
            return False
        if qos == 1:
            self.acknowledge(link, codec.ack_packet(codec.PUBACK, packet_id))
        elif qos == 2:
            if session.inflight_in is None:
                session.inflight_in = set()
            session.inflight_in.add(packet_id)
            if session.journal is not None:
                session.journal.saved(session)
            self.acknowledge(link, codec.ack_packet(codec.PUBREC, packet_id))
        return True

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
                retain: bool, source: Publisher | None = None) -> Verdict:
        """Check, route and retain one incoming PUBLISH."""
        if session.kicked:
            return Verdict.CLOSE  # revoked or being disconnected: nothing more from it
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
            return Verdict.CLOSE
        decision = session.decide(topic, Action.PUBLISH)
        if not decision.allowed:
            self.router.audit_denied("publish_denied", session, topic, decision.reason)
            if self.settings.denied_publish == "disconnect":
                return Verdict.CLOSE  # no PUBACK: the client must not think it was accepted
            return Verdict.DROPPED
        self.accepted(session.mount, topic, data, qos, source)
        if retain:
            self.retain(session, topic, data, qos)
        return Verdict.ACCEPTED

    def accepted(self, mount: str, topic: str, data: bytes, qos: int,
                 source: Publisher | None = None) -> None:
        """A message let in (a PUBLISH that passed its checks, or device state over the
        HTTP API): routed to the application's subscribers and counted."""
        self.router.route(mount, topic, data, qos, source)
        traffic = self.router.traffic
        traffic.msgs_in[qos] += 1
        traffic.bytes_in[qos] += len(data)

    def retain(self, session: KeySession, topic: str, data: bytes, qos: int) -> None:
        refusal = self.router.retained.retain(session, topic, data, qos)
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
        self.router.route(session.mount, will.topic, will.payload, will.qos)
        if will.retain:
            self.retain(session, will.topic, will.payload, will.qos)

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
