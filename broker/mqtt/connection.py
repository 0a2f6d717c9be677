"""One client connection: whole packets handled as the bytes arrive, synchronously.

amqtt's broker handler started a reader task per connection, a task per packet, a task
plus futures per QoS 1/2 message (given up after 5 s), and a message loop waiting on four
futures. Here a TCP or TLS connection is an asyncio Protocol: ``data_received`` hands
the bytes to its ``Framer`` (size, time and string checks) and each whole packet is
handled in place: PUBLISH is routed, acknowledgements move the session's outbox,
SUBSCRIBE is answered, all without awaiting and without a task, a future or a coroutine
frame per connection. The only task is the one that authenticates a CONNECT. A WebSocket
connection's task feeds it the messages it receives the same way. Packet handling is in
``handle``, the only code that sees packets.

Backpressure (broker.mqtt.flow): while a session this connection's PUBLISHes feed is past its
bounds, the connection is *paused*. It keeps reading, and handles acknowledgements and
PINGREQ at once, but holds PUBLISH, SUBSCRIBE, UNSUBSCRIBE and DISCONNECT, in order,
until it resumes; once the packets held reach ``max_session_bytes`` (or a DISCONNECT or
the end of the stream is read) it stops reading (``pause_reading``), so the client's own
window and TCP slow it down. A client whose own session is past its bounds is waited for
by others: its acknowledgements must be read, so its connection holds up to 16 times as
much (a whole window of a client publishing to itself or to a client feeding it back),
and past that what it holds goes through at once (bounded by the sessions' ceiling)
rather than the connection stop being read: clients feeding each other never deadlock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Protocol

from broker.core.counters import FlowCounters
from broker.mqtt import codec
from broker.mqtt import props as properties
from broker.mqtt.framing import Framer, PacketError
from broker.mqtt.inbound import Inbound, released
from broker.mqtt.link import Link, TransportLink
from broker.mqtt.outbox import MessageProps
from broker.mqtt.routing import Router
from broker.mqtt.session import ConnectionInfo, KeySession, session_expiry

logger = logging.getLogger(__name__)

# Handled at once even while paused: they drain sessions and never add to them.
PASS_WHILE_PAUSED = frozenset({codec.PUBACK, codec.PUBREC, codec.PUBCOMP, codec.PUBREL,
                               codec.PINGREQ})


CLOSED_POLL = 0.1  # seconds between looks at a connection that stopped reading
# What a held packet costs beyond its body (the tuple, the bytes object, the deque slot).
HELD_OVERHEAD = 100
# Times max_session_bytes a connection holds before what it holds is forced through,
# while its own session is past its bounds (others wait for the acknowledgements it sends
# behind them: a client's whole window of 1,000 PUBLISHes of 4 KiB fits), as long as all
# connections together hold less than HELD_IN_ALL.
HOLD_WHILE_WAITED_ON = 16
HELD_IN_ALL = 256 * 1024 * 1024


class Reading(Protocol):
    """How a connection stops and restarts reading: its transport (TCP, TLS) or the task
    feeding it (WebSocket)."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class ConnectionHost(Protocol):
    """What a connection asks of the broker (broker.mqtt.broker.KeyBroker)."""

    inbound: Inbound
    router: Router

    def opened(self, connection: MqttConnection) -> bool:
        """A new connection: admitted (counted, watched), or False (closed at once)."""

    def connect_packet(self, connection: MqttConnection, first: int,
                       body: bytes) -> KeySession | None:
        """Its first packet: the session a valid CONNECT asks for, or None (refused or
        invalid: audited, a refusing CONNACK written)."""

    def authenticate(self, connection: MqttConnection, incoming: KeySession) -> None:
        """Authenticate the CONNECT and take the session over (a task), then call
        ``connection.started``."""

    def ended(self, connection: MqttConnection) -> None:
        """The connection is over: its session goes offline, it is counted no more."""


class MqttConnection(asyncio.Protocol):
    __slots__ = ("host", "inbound", "router", "link", "framer", "reading", "listener",
                 "proxied", "info", "session", "clean_exit", "ended_by", "waits", "held",
                 "held_bytes", "paused_at", "run_scheduled", "over", "forcing", "held_qos",
                 "ending", "handler", "stopped", "eof_seen", "lost", "starting", "retry",
                 "closed_waiter", "connect_read")

    def __init__(self, host: ConnectionHost, listener: str, proxied: str | None = None) -> None:
        self.host = host
        self.inbound = host.inbound
        self.router = host.router
        self.listener = listener
        self.proxied = proxied  # the client IP a trusted proxy's PROXY header gave
        # Set when the connection opens (connection_made, or by the WebSocket handler).
        self.link: Link = NO_LINK
        self.framer: Framer | None = None
        self.reading: Reading = NOT_READING
        self.info = NO_INFO
        self.session: KeySession | None = None
        self.clean_exit = False  # the client sent DISCONNECT (its Will is discarded)
        # why it ended from outside ("idle", "slow_packet", "evicted") or on a bad packet
        self.ended_by: str | None = None
        self.waits = 0  # congested sessions this connection waits for (paused when > 0)
        # Packets read while paused, handled in order once it resumes (None: none, and
        # not paused; an empty deque is 600 bytes).
        self.held: deque[tuple[int, bytes]] | None = None
        self.held_bytes = 0
        self.paused_at = 0.0
        self.run_scheduled = False
        self.over = False  # ended: nothing more is handled
        self.forcing = False  # held packets are being forced through (see _run_held)
        self.held_qos = 0  # of the packets held, QoS 1/2 PUBLISHes (not acknowledged yet)
        self.ending: tuple[int, str] | None = None  # why the broker ends it (MQTT 5 code)
        self.handler = self.handle
        self.stopped = False  # not reading: authenticating, or holding packets back
        self.eof_seen = False  # the client sent all it will send
        self.lost = False  # the transport is gone
        self.starting = False  # its CONNECT is being authenticated
        self.retry: asyncio.TimerHandle | None = None  # the next look while holding back
        self.closed_waiter: asyncio.Future[None] | None = None  # see ``closed``
        self.connect_read = False  # its first packet was read

    # ------------------------------------------------------------------ transport (TCP, TLS)
    def connection_made(self, transport: Any) -> None:
        self.link = TransportLink(transport)
        self.reading = transport
        if not self.host.opened(self):
            self.over = True
            transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.over:
            return
        framer = self.framer
        assert framer is not None
        framer.feed(data)
        if not self.stopped:
            self._pump()

    def eof_received(self) -> bool:
        """The client sent all it will: what it sent first still counts (a CONNECT being
        authenticated, packets held back), then the connection ends."""
        self.eof_seen = True
        if not self.over and not self.stopped:
            self._stream_ended()
        return not self.over  # open for the answers until then

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.link.writing_resumed()  # nobody waits for it to drain any longer
        if not self.starting:  # else the CONNECT's task ends it when done
            self._finish()

    def pause_writing(self) -> None:
        self.link.writing_paused()

    def resume_writing(self) -> None:
        self.link.writing_resumed()

    # ------------------------------------------------------------------ packets in
    def _pump(self) -> None:
        """Handle the whole packets read, in order, until none is left or the connection
        stops reading (or ends)."""
        framer = self.framer
        assert framer is not None
        try:
            while not self.stopped and not self.over:
                try:
                    packet = framer.next()
                except PacketError as exc:  # audited by the framer's on_violation
                    self.ended_by = "bad_packet"
                    if exc.reason == "packet_too_large":
                        self.end(properties.PACKET_TOO_LARGE, "packet_too_large")
                    else:
                        self.end(properties.MALFORMED_PACKET, "malformed_packet")
                    self._finish()
                    return
                if packet is None:
                    if self.eof_seen:
                        self._stream_ended()
                    return
                first, body = packet
                if self.session is None:
                    self._connect(first, body)
                elif not self._packet(self.session, first, body):
                    return
        except Exception:  # noqa: BLE001 - one client's bytes never kill the daemon
            logger.exception("connection on %s ended with an internal error", self.listener)
            self.link.abort()
            self._finish()

    def _stream_ended(self) -> None:
        """Every packet read was handled or held, and no more will come: the connection
        ends once the held ones are handled (they wait for the sessions they feed)."""
        if self.held:
            self._stop_reading(held_back=True)
            if not self._look_at_held():
                return  # looked at again as those sessions drain
        self._finish()

    def _connect(self, first: int, body: bytes) -> None:
        """The first packet: a valid CONNECT is authenticated while nothing more is read."""
        self.connect_read = True
        incoming = self.host.connect_packet(self, first, body)
        if incoming is None:
            self._finish()  # what it was told (a refusing CONNACK) goes out first
            return
        self._stop_reading()
        self.starting = True
        self.host.authenticate(self, incoming)

    def started(self, session: KeySession | None) -> None:
        """The CONNECT's outcome: the session it now serves (CONNACK sent), or None
        (refused: told so)."""
        self.starting = False
        if session is None or self.lost:
            if session is not None:
                self.session = session
            self._finish()
            return
        self.session = session
        self.handler = self.handle5 if session.version == 5 else self.handle
        framer = self.framer
        assert framer is not None
        framer.idle_limit = session.keep_alive
        framer.version = session.version
        framer.publish_parsed = True
        self._read_on(pump=True)

    def _packet(self, session: KeySession, first: int, body: bytes) -> bool:
        """One packet of a connected client; False once it stops reading or ends."""
        kind = first >> 4
        if kind == codec.PUBLISH:
            if self.inbound.rate_exceeded(session, first, body):
                # counted when read: a pause must not make a burst of it
                self.end(properties.MESSAGE_RATE_TOO_HIGH, "rate_limited")
                self._finish()
                return False
            if session.version == 5 and first & 6 and self.held_qos + len(
                    session.inflight_in or ()) >= self.inbound.settings.receive_maximum:
                self.end(properties.RECEIVE_MAXIMUM_EXCEEDED, "receive maximum")  # -3.3.4-7
                self._finish()
                return False
        held = self.held
        if held is None or kind in PASS_WHILE_PAUSED:
            if not self.dispatch(session, first, body):
                self._finish()
                return False
            return True
        if kind == codec.DISCONNECT:
            self.clean_exit = True  # the Will is discarded now (MQTT-3.14.4-3)
        held.append((first, body))
        self._held(len(body) + HELD_OVERHEAD)
        if kind == codec.PUBLISH and first & 6:
            self.held_qos += 1
        if not self.waits and not self.run_scheduled:
            self._schedule_run()
        limit = self.inbound.settings.max_session_bytes
        if kind == codec.DISCONNECT or self.held_bytes >= self._hold_limit(limit):
            if session.congestion is not None and kind != codec.DISCONNECT:
                # Others wait for this client's acknowledgements, which follow what it
                # holds: stopping to read could deadlock (two clients feeding each
                # other). What it holds goes through now instead.
                if not self._run_held(force=True):
                    self._finish()
                    return False
                return True
            self._stop_reading(held_back=True)
            if self._look_at_held():
                self._read_on(pump=False)
                return True
            return False
        return True

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

    # ------------------------------------------------------------------ reading on and off
    def _stop_reading(self, held_back: bool = False) -> None:
        """Nothing more is handled, nor read, until ``_read_on``; ``held_back``: for the
        broker's own wait (backpressure), which the keep-alive does not count."""
        self.stopped = True
        if held_back:
            framer = self.framer
            assert framer is not None
            framer.held_back = True
        if not self.link.is_closing():
            self.reading.pause_reading()

    def _read_on(self, pump: bool) -> None:
        self.stopped = False
        framer = self.framer
        assert framer is not None
        if framer.held_back:
            framer.reading_again()
        if not self.eof_seen and not self.link.is_closing():
            self.reading.resume_reading()
        if pump:
            self._pump()

    def _look_at_held(self) -> bool:
        """While reading is stopped for held packets: handle them as the sessions waited
        for drain. True when the connection reads on; False when it waits (looked at
        again on ``resume``, or in CLOSED_POLL) or has ended."""
        while self.held:
            if not self.waits:
                if not self._run_held():
                    self._finish()
                    return False
                continue
            if self.link.is_closing():  # kicked or taken over meanwhile
                self._finish()
                return False
            session = self.session
            if session is not None and session.congestion is not None and \
                    not self.clean_exit:
                # Others now wait for this client's acknowledgements: read on, up to the
                # larger hold (what it holds is forced through past that, or at once
                # when nothing more will be read).
                limit = self.inbound.settings.max_session_bytes
                if self.eof_seen or self.held_bytes >= self._hold_limit(limit):
                    if not self._run_held(force=True):
                        self._finish()
                        return False
                    continue
                return True
            if self.retry is None:
                self.retry = asyncio.get_running_loop().call_later(CLOSED_POLL,
                                                                   self._look_again)
            return False
        if self.clean_exit:
            self._finish()
            return False
        return True

    def _look_again(self) -> None:
        self.retry = None
        framer = self.framer
        if self.over or not self.stopped or framer is None or not framer.held_back:
            return
        try:
            reads_on = self._look_at_held()
        except Exception:  # noqa: BLE001 - one client's packets never kill the daemon
            logger.exception("client %s: handling held packets failed",
                             self.session.client_id if self.session else "?")
            self.link.abort()
            self._finish()
            return
        if reads_on:
            self._read_on(pump=True)

    # ------------------------------------------------------------------ the end
    def _finish(self) -> None:
        """The connection is over (once): an MQTT 5 client is told why the broker ends
        it, its session goes offline, and what was written goes out before it closes."""
        if self.over:
            return
        self.over = True
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        if self.waits:
            self._unpaused()
        self.held = None
        self._held(-self.held_bytes)
        self.held_qos = 0
        self.goodbye()
        try:
            self.host.ended(self)
        finally:
            self.link.shut()
            waiter = self.closed_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def closed(self) -> asyncio.Future[None]:
        """Done once the connection is over (a take-over waits for it)."""
        if self.closed_waiter is None:
            self.closed_waiter = asyncio.get_running_loop().create_future()
            if self.over:
                self.closed_waiter.set_result(None)
        return self.closed_waiter

    def end_now(self) -> None:
        """Drop the connection and end it at once."""
        self.link.abort()
        self._finish()

    def expired(self, reason: str) -> None:
        """The watchdog's verdict (see Framer.expire): end the connection now (an
        MQTT 5 client silent past its keep-alive is told so, if it still reads)."""
        self.ended_by = reason
        session = self.session
        if reason == "idle" and session is not None and session.version == 5:
            self.link.write(codec.disconnect5(properties.KEEP_ALIVE_TIMEOUT,
                                              self.inbound.reason_props(session, "keep_alive")))
            self.link.flush()
        self.link.abort()

    # ------------------------------------------------------------------ backpressure
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
        if self.held:
            self._schedule_run()
        else:
            self.held = None
            framer = self.framer
            if self.stopped and framer is not None and framer.held_back:
                self._schedule_run()  # reading stopped with nothing left: it reads on

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
        """Held packets handled outside the reading of packets (a session drained)."""
        self.run_scheduled = False
        if self.over:
            return
        framer = self.framer
        if self.stopped and framer is not None and framer.held_back:
            self._look_again()  # reading stopped for them: it reads on when they are done
            return
        try:
            ended = not self._run_held()
        except Exception:  # noqa: BLE001 - one client's packets never kill the daemon
            logger.exception("client %s: handling held packets failed",
                             self.session.client_id if self.session else "?")
            ended = True
        if ended:
            self.link.abort()  # a bad packet among them, or the session was taken over
            self._finish()

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
        if kind == codec.PUBACK and len(body) == 2:  # Success, no properties: the usual one
            router.puback(session, codec.packet_id_of(body))
        elif kind in (codec.PUBACK, codec.PUBREC, codec.PUBCOMP):
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
                cost = limits.alias_cost(alias, topic)
                if cost > self.inbound.settings.max_session_bytes // 4:
                    # the table counts in the session's bytes, within a quarter of them
                    return self.end(properties.QUOTA_EXCEEDED, "topic_aliases")
                limits.aliases[alias] = topic  # topic_alias_maximum of them at most
                limits.alias_bytes = cost
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


class _NoLink(Link):
    """The link of a connection not opened yet: writes nothing."""

    __slots__ = ()

    def write(self, data: bytes) -> None:
        pass

    def buffered(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return True

    def abort(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def peer(self) -> tuple[str, int] | None:
        return None


class _NotReading:
    __slots__ = ()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


NO_LINK = _NoLink()
NOT_READING = _NotReading()
NO_INFO = ConnectionInfo(listener="", peer_ip="", client_ip="")
