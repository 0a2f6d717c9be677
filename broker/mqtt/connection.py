"""One client connection after CONNECT: read whole packets, handle each synchronously.

amqtt's broker handler started a reader task per connection, a task per packet, a task
plus futures per QoS 1/2 message (given up after 5 s), and a message loop waiting on four
futures. Here the connection's own task reads a packet (``FramedReader``: size, time and
string checks done) and handles it in place: PUBLISH is routed, acknowledgements move the
session's outbox, SUBSCRIBE is answered, all without awaiting; the only waits are for
the next packet. Packet handling is in ``handle``, the only code that sees packets.

Backpressure (broker.mqtt.flow): while a session this connection's PUBLISHes feed is past its
bounds, the connection is *paused*. It keeps reading, and handles acknowledgements and
PINGREQ at once, but holds PUBLISH, SUBSCRIBE, UNSUBSCRIBE and DISCONNECT, in order,
until it resumes; once the packets held reach ``max_session_bytes`` (or a DISCONNECT or
the end of the stream is read) it stops reading, so the client's own window and TCP slow
it down. A client whose own session is past its bounds is waited for by others: its
acknowledgements must be read, so its connection holds up to 16 times as much (a whole
window of a client publishing to itself or to a client feeding it back), and past that
what it holds goes through at once (bounded by the sessions' ceiling) rather than the
connection stop being read: clients feeding each other never deadlock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from broker.core.counters import FlowCounters
from broker.mqtt import codec
from broker.mqtt import props as properties
from broker.mqtt.framing import FramedReader, PacketError
from broker.mqtt.inbound import Inbound, released
from broker.mqtt.link import Link
from broker.mqtt.outbox import MessageProps
from broker.mqtt.routing import Router
from broker.mqtt.session import ConnectionInfo, KeySession, session_expiry

logger = logging.getLogger(__name__)

# Handled at once even while paused: they drain sessions and never add to them.
PASS_WHILE_PAUSED = frozenset({codec.PUBACK, codec.PUBREC, codec.PUBREL, codec.PUBCOMP,
                               codec.PINGREQ})


CLOSED_POLL = 0.1  # seconds between looks at the link while waiting to resume
# What a held packet costs beyond its body (the tuple, the bytes object, the deque slot).
HELD_OVERHEAD = 100
# Times max_session_bytes a connection holds before what it holds is forced through,
# while its own session is past its bounds (others wait for the acknowledgements it sends
# behind them: a client's whole window of 1,000 PUBLISHes of 4 KiB fits), as long as all
# connections together hold less than HELD_IN_ALL.
HOLD_WHILE_WAITED_ON = 16
HELD_IN_ALL = 256 * 1024 * 1024


class MqttConnection:
    __slots__ = ("inbound", "router", "link", "reader", "info", "session", "clean_exit",
                 "ended_by", "waits", "held", "held_bytes", "paused_at", "wake",
                 "run_scheduled", "over", "forcing", "held_qos", "ending", "handler")

    def __init__(self, inbound: Inbound, router: Router, link: Link,
                 info: ConnectionInfo) -> None:
        self.inbound = inbound
        self.router = router
        self.link = link
        self.reader: FramedReader | None = None  # set by whoever opens the connection
        self.info = info
        self.session: KeySession | None = None
        self.clean_exit = False  # the client sent DISCONNECT (its Will is discarded)
        self.ended_by: str | None = None  # why the watchdog ended it ("idle", "slow_packet")
        self.waits = 0  # congested sessions this connection waits for (paused when > 0)
        # Packets read while paused, handled in order once it resumes (None: none, and
        # not paused; an empty deque is 600 bytes).
        self.held: deque[tuple[int, bytes]] | None = None
        self.held_bytes = 0
        self.paused_at = 0.0
        self.wake: asyncio.Future[None] | None = None  # the task waits for a resume
        self.run_scheduled = False
        self.over = False  # serve() has returned
        self.forcing = False  # held packets are being forced through (see _run_held)
        self.held_qos = 0  # of the packets held, QoS 1/2 PUBLISHes (not acknowledged yet)
        self.ending: tuple[int, str] | None = None  # why the broker ends it (MQTT 5 code)
        self.handler = self.handle

    def expired(self, reason: str) -> None:
        """The watchdog's verdict (see FramedReader.expire): end the connection now (an
        MQTT 5 client silent past its keep-alive is told so, if it still reads)."""
        self.ended_by = reason
        session = self.session
        if reason == "idle" and session is not None and session.version == 5:
            self.link.write(codec.disconnect5(properties.KEEP_ALIVE_TIMEOUT,
                                              self.inbound.reason_props(session, "keep_alive")))
            self.link.flush()
        self.link.abort()

    async def serve(self, session: KeySession) -> None:
        """Handle packets until the connection ends (DISCONNECT, EOF, error, kick)."""
        self.session = session
        reader = self.reader
        assert reader is not None
        settings = self.inbound.settings
        limit = settings.max_session_bytes
        v5 = session.version == 5
        self.handler = self.handle5 if v5 else self.handle
        try:
            while True:
                try:
                    packet = await reader.packet()
                except PacketError as exc:  # audited by the reader's on_violation
                    if exc.reason == "packet_too_large":
                        self.end(properties.PACKET_TOO_LARGE, "packet_too_large")
                    else:
                        self.end(properties.MALFORMED_PACKET, "malformed_packet")
                    return
                except (ConnectionError, OSError):
                    return
                if packet is None:  # the end of the stream: what it sent first still counts
                    if self.held:
                        await self._until_resumed()
                    return
                first, body = packet
                kind = first >> 4
                if kind == codec.PUBLISH:
                    if self.inbound.rate_exceeded(session, first, body):
                        # counted when read: a pause must not make a burst of it
                        self.end(properties.MESSAGE_RATE_TOO_HIGH, "rate_limited")
                        return
                    if v5 and first & 6 and self.held_qos + len(session.inflight_in or ()) \
                            >= settings.receive_maximum:  # MQTT-3.3.4-7
                        self.end(properties.RECEIVE_MAXIMUM_EXCEEDED, "receive maximum")
                        return
                held = self.held
                if held is None or kind in PASS_WHILE_PAUSED:
                    if not self.dispatch(session, first, body):
                        return
                    continue
                if kind == codec.DISCONNECT:
                    self.clean_exit = True  # the Will is discarded now (MQTT-3.14.4-3)
                held.append(packet)
                self._held(len(body) + HELD_OVERHEAD)
                if kind == codec.PUBLISH and first & 6:
                    self.held_qos += 1
                if not self.waits and not self.run_scheduled:
                    self._schedule_run()
                if kind == codec.DISCONNECT or self.held_bytes >= self._hold_limit(limit):
                    if session.congestion is not None and kind != codec.DISCONNECT:
                        # Others wait for this client's acknowledgements, which follow
                        # what it holds: stopping to read could deadlock (two clients
                        # feeding each other). What it holds goes through now instead.
                        if not self._run_held(force=True):
                            return
                        continue
                    if not await self._until_resumed() or self.clean_exit:
                        return
        finally:
            self.goodbye()
            self._ended()

    def _hold_limit(self, limit: int) -> int:
        """Bytes held before the connection stops being read: more while its own session
        is congested, so that its acknowledgements behind a full window are reached."""
        session = self.session
        if session is not None and session.congestion is not None and \
                self._counters().held < HELD_IN_ALL:
            return limit * HOLD_WHILE_WAITED_ON
        return limit

    def _held(self, size: int) -> None:
        """``size`` bytes more held (negative: fewer), here and in all."""
        self.held_bytes += size
        self._counters().held += size

    def dispatch(self, session: KeySession, first: int, body: bytes) -> bool:
        """``handle`` (or ``handle5``), with a malformed packet audited; False when the
        connection is to end."""
        try:
            return self.handler(session, first, body)
        except (codec.MalformedPacket, codec.ProtocolViolation) as exc:
            self.inbound.audit.event("bad_packet", reason=str(exc), **session.audit_fields())
            if isinstance(exc, codec.MalformedPacket):
                return self.end(properties.MALFORMED_PACKET, "malformed_packet")
            return self.end(properties.PROTOCOL_ERROR, "protocol_error")

    # ------------------------------------------------------------------ backpressure
    def pause(self) -> None:
        """A session this connection fed is past its bounds (broker.mqtt.flow)."""
        self.waits += 1
        if self.waits == 1 and not self.over:
            if self.held is None:
                self.held = deque()
            self.paused_at = asyncio.get_running_loop().time()
            counters = self._counters()
            counters.paused += 1
            counters.pauses += 1

    def resume(self) -> None:
        """One session fewer to wait for; at none, the held packets are handled."""
        self.waits -= 1
        if self.waits or self.over:
            return
        self._unpaused()
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)  # the task handles them
        elif self.held:
            self._schedule_run()
        else:
            self.held = None

    def _unpaused(self) -> None:
        counters = self._counters()
        counters.paused -= 1
        counters.pause_seconds += asyncio.get_running_loop().time() - self.paused_at

    def _counters(self) -> FlowCounters:
        return self.router.flow.counters

    def _schedule_run(self) -> None:
        self.run_scheduled = True
        asyncio.get_running_loop().call_soon(self._run_soon)

    def _run_soon(self) -> None:
        """Held packets handled outside the task (it is reading meanwhile)."""
        self.run_scheduled = False
        if self.over:
            return
        try:
            ended = not self._run_held()
        except Exception:  # noqa: BLE001 - one client's packets never kill the daemon
            logger.exception("client %s: handling held packets failed",
                             self.session.client_id if self.session else "?")
            ended = True
        if ended:
            self.link.abort()  # a bad packet among them, or the session was taken over

    @property
    def pausable(self) -> bool:
        """False while held packets are forced through (broker.mqtt.flow: not paused for them,
        and what they deliver is bounded by the sessions' ceiling instead)."""
        return not self.forcing

    def _run_held(self, force: bool = False) -> bool:
        """Handle held packets in order until none is left or the connection is paused
        again (``force``: until none is left); False when the connection is to end."""
        held, session = self.held, self.session
        assert session is not None
        self.forcing = force
        try:
            while held and (force or not self.waits):
                first, body = held.popleft()
                self._held(-len(body) - HELD_OVERHEAD)
                if first >> 4 == codec.PUBLISH and first & 6:
                    self.held_qos -= 1
                if session.link is not self.link or self.link.is_closing() or \
                        not self.dispatch(session, first, body):
                    held.clear()
                    self._held(-self.held_bytes)
                    self.held_qos = 0
                    return False
        finally:
            self.forcing = False
        if not held and not self.waits:
            self.held = None
        return True

    async def _until_resumed(self) -> bool:
        """Stop reading until every held packet is handled; False when the connection is
        to end. The keep-alive watchdog does not count this wait: it is the broker's."""
        reader = self.reader
        assert reader is not None
        reader.held_back = True
        loop = asyncio.get_running_loop()
        try:
            while self.held:
                if not self.waits:
                    if not self._run_held():
                        return False
                    continue
                if self.link.is_closing():  # kicked or taken over meanwhile
                    return False
                session = self.session
                if session is not None and session.congestion is not None and \
                        not self.clean_exit:
                    # Others now wait for this client's acknowledgements: read on, up to
                    # the larger hold (what it holds is forced through past that).
                    limit = self.inbound.settings.max_session_bytes
                    if self.held_bytes < self._hold_limit(limit):
                        return True
                    return self._run_held(force=True)
                self.wake = loop.create_future()
                # Woken by resume(); the timeout notices a connection ended meanwhile.
                await asyncio.wait((self.wake,), timeout=CLOSED_POLL)
                self.wake = None
            return True
        finally:
            self.wake = None
            reader.held_back = False
            reader.last_packet = asyncio.get_running_loop().time()

    def _ended(self) -> None:
        self.over = True
        if self.waits:
            self._unpaused()
        self.held = None
        self._held(-self.held_bytes)
        self.held_qos = 0

    def handle(self, session: KeySession, first: int, body: bytes) -> bool:
        """Handle one MQTT 3.1.1 packet; False when the connection is to end."""
        kind = first >> 4
        router = self.router
        if kind == codec.PUBLISH:
            return self.inbound.publish_packet(session, self.link,
                                               codec.parse_publish(first, body), self) is None
        if kind == codec.PUBACK:
            router.puback(session, codec.packet_id_of(body))
        elif kind == codec.PUBREC:
            router.pubrec(session, codec.packet_id_of(body))
        elif kind == codec.PUBREL:
            packet_id = codec.packet_id_of(body)
            released(session, packet_id)
            self.inbound.acknowledge(self.link, codec.ack_packet(codec.PUBCOMP, packet_id))
        elif kind == codec.PUBCOMP:
            router.pubcomp(session, codec.packet_id_of(body))
        elif kind == codec.SUBSCRIBE:
            packet_id, requests = codec.parse_subscribe(body)
            codes, _ = router.subscribe(
                session, [codec.Subscription(f, qos, False, False, 0) for f, qos in requests],
                self.inbound.subscribe_refusal)
            self.link.write(codec.suback_packet(packet_id, [min(c, 0x80) for c in codes]))
        elif kind == codec.UNSUBSCRIBE:
            packet_id, filters = codec.parse_unsubscribe(body)
            router.unsubscribe(session, filters)
            self.link.write(codec.ack_packet(codec.UNSUBACK, packet_id))
        elif kind == codec.PINGREQ:
            self.link.write(codec.PINGRESP_PACKET)
        elif kind == codec.DISCONNECT:
            self.clean_exit = True
            return False
        elif kind == codec.CONNECT:
            raise codec.ProtocolViolation("second CONNECT")  # MQTT-3.1.0-2
        else:
            raise codec.ProtocolViolation(f"packet type {kind} is not sent by clients")
        return True

    def handle5(self, session: KeySession, first: int, body: bytes) -> bool:
        """Handle one MQTT 5 packet; False when the connection is to end (with the reason
        code to say in a DISCONNECT left in ``ending``)."""
        kind = first >> 4
        router = self.router
        if kind == codec.PUBLISH:
            return self._publish5(session, first, body)
        if kind in (codec.PUBACK, codec.PUBREC, codec.PUBCOMP):
            packet_id, reason = codec.parse_ack5(body)
            if kind == codec.PUBACK:
                router.puback(session, packet_id)
            elif kind == codec.PUBCOMP:
                router.pubcomp(session, packet_id)
            elif reason >= 0x80:  # the client refuses the QoS 2 message: the flow ends
                router.pubrec_refused(session, packet_id)
            else:
                router.pubrec(session, packet_id)
        elif kind == codec.PUBREL:
            packet_id, _ = codec.parse_ack5(body)
            known = bool(session.inflight_in and packet_id in session.inflight_in)
            released(session, packet_id)
            self.inbound.acknowledge(self.link, codec.ack5(
                codec.PUBCOMP, packet_id, 0 if known else properties.PACKET_ID_NOT_FOUND))
        elif kind == codec.SUBSCRIBE:
            packet_id, sub_id, requests = codec.parse_subscribe5(body)
            codes, refusal = router.subscribe(session, requests,
                                              self.inbound.subscribe_refusal, sub_id)
            self.link.write(codec.suback5(packet_id, codes, self.inbound.reason_props(
                session, refusal or "") or properties.EMPTY))
        elif kind == codec.UNSUBSCRIBE:
            packet_id, filters = codec.parse_unsubscribe5(body)
            self.link.write(codec.unsuback5(packet_id, router.unsubscribe(session, filters)))
        elif kind == codec.PINGREQ:
            self.link.write(codec.PINGRESP_PACKET)
        elif kind == codec.DISCONNECT:
            return self._disconnect5(session, body)
        elif kind == codec.CONNECT:
            raise codec.ProtocolViolation("second CONNECT")  # MQTT-3.1.0-2
        elif kind == codec.AUTH:
            raise codec.ProtocolViolation("AUTH without an authentication method")  # MQTT-4.12.0-1
        else:
            raise codec.ProtocolViolation(f"packet type {kind} is not sent by clients")
        return True

    def _publish5(self, session: KeySession, first: int, body: bytes) -> bool:
        packet, props = codec.parse_publish5(first, body)
        limits = session.limits
        assert limits is not None
        alias = props.get(properties.TOPIC_ALIAS)
        topic = packet.topic
        if alias is not None:
            if not 0 < alias <= self.inbound.settings.topic_alias_maximum:
                return self.end(properties.TOPIC_ALIAS_INVALID, "topic alias out of range")
            if topic:
                limits.aliases[alias] = topic  # bounded: topic_alias_maximum of them
            else:
                known = limits.aliases.get(alias)
                if known is None:
                    return self.end(properties.PROTOCOL_ERROR, "unknown topic alias")
                topic = known
        elif not topic:
            return self.end(properties.PROTOCOL_ERROR, "no topic and no topic alias")
        if topic is not packet.topic:
            packet = packet._replace(topic=topic)
        ended = self.inbound.publish_packet(session, self.link, packet, self,
                                            message_props(props) if props else None)
        return ended is None or self.end(ended.code, ended.reason)

    def _disconnect5(self, session: KeySession, body: bytes) -> bool:
        """The client's DISCONNECT: 0x04 keeps its Will; a Session Expiry Interval may
        change the one of CONNECT, but not from 0 (MQTT-3.14.2-2)."""
        reason, props = codec.parse_disconnect5(body)
        expiry = props.get(properties.SESSION_EXPIRY)
        if expiry is not None:
            if session.clean_session and expiry:
                return self.end(properties.PROTOCOL_ERROR, "session expiry set after 0")
            session.expiry = session_expiry(expiry, self.inbound.settings.session_expiry)
            session.clean_session = not session.expiry
        self.clean_exit = reason != properties.DISCONNECT_WITH_WILL
        return False

    def end(self, code: int, reason: str = "") -> bool:
        """The connection ends (handling returns False); an MQTT 5 client is told why."""
        self.ending = (code, reason)
        return False

    def goodbye(self) -> None:
        """The MQTT 5 DISCONNECT that says why the broker ends the connection (written
        before it closes; the client may be reading it or not)."""
        session = self.session
        if session is None or session.version != 5 or self.ending is None:
            return
        code, reason = self.ending
        self.link.write(codec.disconnect5(code, self.inbound.reason_props(session, reason)))


def message_props(props: properties.Props) -> MessageProps | None:
    """What of a PUBLISH's (or Will's) properties its subscribers get: None for none."""
    forward = properties.forwarded(props) if props else b""
    expiry = props.get(properties.MESSAGE_EXPIRY) if props else None
    if not forward and expiry is None:
        return None
    return MessageProps(forward, time.time() + expiry if expiry is not None else None)
