"""Admission: who may open a connection, and the CONNECT packet up to authentication.

Connection caps are checked before anything is read (per source: ``SourceCaps``, which
closes a source's idle pending connections rather than refuse its new ones); the CONNECT
packet is read whole (``Framer``), parsed by ``codec.parse_connect`` and checked in
amqtt's order (protocol level -> CONNACK 1, credential flags -> 4, a persistent session
without client id -> 2). A connection that sends bytes that are no valid CONNECT (garbage,
a CONNECT never completed) counts as a failure in the brute-force guard; one that sends
nothing until the timeout, or is closed by a cap, does not. Every such event is audited
within the per-source limit. Every refused or invalid CONNECT is also one INFO line of the
daemon's log (client id, key tried, source address, CONNACK code and reason; never the
secret), within the same per-source limit, so one source cannot flood the log.
"""

from __future__ import annotations

import logging
import math
import time

from amqtt.mqtt.connack import (
    BAD_USERNAME_PASSWORD,
    IDENTIFIER_REJECTED,
    UNACCEPTABLE_PROTOCOL_VERSION,
)

from broker.core.audit import AuditLog, PerSourceLimit
from broker.core.settings import Settings
from broker.mqtt import codec
from broker.mqtt import props as properties
from broker.mqtt.caps import SourceCaps
from broker.mqtt.connection import MqttConnection, message_props
from broker.mqtt.keeper import StateKeeper
from broker.mqtt.session import ClientLimits, ConnectionInfo, KeySession, Will, session_expiry
from broker.policy.addresses import source_of
from broker.policy.guard import BruteForceGuard

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = "connect_timeout"
EVICTED = "evicted"  # MqttConnection.ended_by of a connection closed by a per-source cap
SHOWN_CHARS = 64  # of a client id or key in the log: both come from an unauthenticated client


class Admission:
    def __init__(self, settings: Settings, audit: AuditLog, guard: BruteForceGuard | None,
                 state: StateKeeper | None = None) -> None:
        self.settings = settings
        self.audit = audit
        self.guard = guard
        self.state = state  # gives persistent sessions their journal (None: not kept)
        self.connections: set[MqttConnection] = set()  # every open one, CONNECT or not
        self.caps = SourceCaps(settings.max_connections_per_source,
                               settings.max_unauthenticated_per_source, self._evicted)
        self.invalid: dict[str, int] = {}  # connections without a valid CONNECT, by kind
        # CONNACKs sent, by (protocol level, code): accepted (0) and refused (metrics)
        self.connacks: dict[tuple[int, int], int] = {}
        self._logged = PerSourceLimit(self._log_suppressed)  # log lines about CONNECTs

    def admit(self, info: ConnectionInfo) -> str | None:
        """None when a new connection may open (at its source's max_connections_per_source,
        once that source's pending connection idle longest is closed); otherwise why it
        is closed at once (audited)."""
        if len(self.connections) >= self.settings.max_connections:
            reason = "max_connections"
        elif not self.caps.make_room(source_of(info.client_ip)):
            reason = "max_connections_per_source"  # every one of them is past CONNECT
        else:
            return None
        self._closed_unread(info, reason)
        return reason

    def opened(self, connection: MqttConnection) -> None:
        self.connections.add(connection)
        self.caps.opened(source_of(connection.info.client_ip), connection)

    def closed(self, connection: MqttConnection) -> None:
        if connection in self.connections:  # not evicted (then it is counted no more)
            self.connections.discard(connection)
            self.caps.closed(source_of(connection.info.client_ip), connection)

    def stop(self) -> None:
        self.caps.stop()

    def _evicted(self, connection: MqttConnection, reason: str) -> None:
        """A pending connection closed by a per-source cap (SourceCaps): audited and
        counted, but no failure of its source's in the guard (else a neighbour's silent
        sockets would ban the devices behind the same address)."""
        self.connections.discard(connection)
        self._closed_unread(connection.info, reason)
        connection.expired(EVICTED)

    def _closed_unread(self, info: ConnectionInfo, reason: str) -> None:
        self.invalid[reason] = self.invalid.get(reason, 0) + 1  # metrics: no CONNECT read
        self.audit.from_source("connect_invalid", client_ip=info.client_ip,
                               peer_ip=info.peer_ip, listener=info.listener, reason=reason)

    def packet_violation(self, connection: MqttConnection, error: Exception) -> None:
        """A packet that ended the connection (reported by its Framer)."""
        session, info = connection.session, connection.info
        if session is not None:
            self.audit.event("bad_packet", reason=str(error), **session.audit_fields())
        else:
            self._invalid(info, str(error), "bad_packet")

    def refused(self, info: ConnectionInfo, client_id: str, key: str | None, code: int,
                reason: str) -> None:
        """Log a CONNECT answered with a refusing CONNACK, like the SUBSCRIBE and PUBLISH
        denials (``event: client ...: reason``), within the per-source limit."""
        self._log("connect_refused: client %s key %s from %s on %s: CONNACK %d %s", info,
                  _shown(client_id), _shown(key), info.client_ip, info.listener, code, reason)

    def connack_sent(self, level: int, code: int) -> None:
        key = (level, code)
        self.connacks[key] = self.connacks.get(key, 0) + 1

    def flush_log(self) -> None:
        """Log the counts of lines held back in windows that are over (once a second)."""
        self._logged.flush(time.monotonic())

    def _log(self, message: str, info: ConnectionInfo, *args: object) -> None:
        if self._logged.allow(source_of(info.client_ip), time.monotonic()):
            logger.info(message, *args)

    def _log_suppressed(self, source: str, count: int) -> None:
        logger.info("%d more refused or invalid CONNECTs from %s not logged in 1 s", count,
                    source)

    def _invalid(self, info: ConnectionInfo, reason: str, event: str = "connect_invalid") -> None:
        """A connection without a valid CONNECT: counted, audited, and a failure in the
        guard when it sent something (bytes that are no valid CONNECT); a silent one that
        timed out is not (it may be a neighbour's, behind the same address)."""
        silent = reason == CONNECT_TIMEOUT
        kind = ("timeout" if silent else "protocol"
                if reason.startswith("CONNACK") else "bad_packet" if event == "bad_packet"
                else "malformed")
        self.invalid[kind] = self.invalid.get(kind, 0) + 1
        if kind != "protocol":  # those are refused with a CONNACK: logged by the caller
            self._log("no valid CONNECT from %s on %s: %s", info, info.client_ip,
                      info.listener, reason)
        self.audit.from_source(event, client_ip=info.client_ip, peer_ip=info.peer_ip,
                               listener=info.listener, reason=reason)
        if self.guard is None or silent:
            return
        now = time.monotonic()
        until = self.guard.record_failure(info.client_ip, now)
        if until is not None:
            self.audit.event("ban", client_ip=info.client_ip, peer_ip=info.peer_ip,
                             listener=info.listener, reason=f"banned for {until - now:.0f}s")

    def no_connect(self, connection: MqttConnection) -> None:
        """A connection ended before its first packet was read whole."""
        info = connection.info
        if connection.ended_by == "idle":
            self._invalid(info, CONNECT_TIMEOUT)
        elif connection.ended_by is None:
            # closed before sending anything: not counted (port checks, probes)
            logger.debug("connection from %s closed before CONNECT", info.peer_ip)
        # else audited already: evicted, or a packet the framer refused

    def connect_packet(self, connection: MqttConnection, first: int,
                       body: bytes) -> KeySession | None:
        """Check the first packet, which must be a CONNECT; None when the connection is to
        end (refused with a CONNACK, or invalid: audited)."""
        info = connection.info
        self.caps.connect_read(source_of(info.client_ip), connection)
        if first >> 4 != codec.CONNECT:  # MQTT-3.1.0-1
            self._invalid(info, f"packet type {first >> 4} before CONNECT", "bad_packet")
            return None
        try:
            connect = codec.parse_connect(body)
        except codec.MalformedPacket as exc:
            self._invalid(info, f"malformed CONNECT: {exc}")
            return None
        if connect.protocol != "MQTT":
            self._invalid(info, "malformed CONNECT")
            return None
        refusal = self._connect_refusal(connect)
        if refusal is not None:
            code, why = refusal
            self._invalid(info, f"CONNACK {code}")
            self.refused(info, connect.client_id, connect.username, code, why)
            connection.link.write(
                codec.connack5(False, code, self._reason(why)) if connect.level == 5
                else codec.connack_packet(False, code))
            self.connack_sent(connect.level if connect.level in (4, 5) else 0, code)
            return None
        return self._session(connect, info)

    def _connect_refusal(self, connect: codec.Connect) -> tuple[int, str] | None:
        """A CONNACK code for what is wrong with the CONNECT itself (before any key is
        looked at), in its version's codes, and why; None when it may go on."""
        v5 = connect.level == 5
        if connect.level not in (4, 5):  # MQTT 3.1.1 and 5.0 only
            return UNACCEPTABLE_PROTOCOL_VERSION, f"protocol level {connect.level}"
        if not v5 and connect.password is not None and connect.username is None:
            return BAD_USERNAME_PASSWORD, "password without user name"  # MQTT-3.1.2-22
        if not connect.client_id and (v5 or not connect.clean_start):
            # [MQTT-3.1.3-8]; a device must name itself: no identifier is assigned
            return ((properties.CLIENT_ID_NOT_VALID, "client id is empty") if v5 else
                    (IDENTIFIER_REJECTED, "persistent session without client id"))
        if v5 and properties.AUTH_METHOD in connect.props:
            return properties.BAD_AUTH_METHOD, "enhanced authentication is not offered"
        if v5 and (connect.props.get(properties.RECEIVE_MAXIMUM) == 0
                   or connect.props.get(properties.MAXIMUM_PACKET_SIZE) == 0):
            return properties.PROTOCOL_ERROR, "receive maximum or packet size 0"
        return None

    def _reason(self, why: str) -> bytes:
        if not self.settings.reason_strings:
            return properties.EMPTY
        return properties.encode([(properties.REASON_STRING, why)])

    def _session(self, connect: codec.Connect, info: ConnectionInfo) -> KeySession:
        """The session a valid CONNECT asks for, credentials kept until authenticated."""
        settings = self.settings
        v5 = connect.level == 5
        props = connect.props
        if v5:
            requested = props.get(properties.SESSION_EXPIRY, 0)
            expiry: float | None = session_expiry(requested, settings.session_expiry)
            ends = not expiry
        else:
            expiry, ends = None, connect.clean_start
        client_id = connect.client_id
        journal = self.state.journal(client_id) if self.state is not None and not ends else None
        session = KeySession(client_id, ends, info, journal)
        session.clean_start = connect.clean_start
        session.version = connect.level
        session.expiry = expiry
        will = connect.will
        if will is not None:
            session.will = Will(will.topic, will.payload, will.qos, will.retain,
                                message_props(will.props),
                                will.props.get(properties.WILL_DELAY, 0))
        session.username = connect.username
        password = connect.password
        session.password = None if password is None else password.decode("utf-8", "replace")
        keep_alive = connect.keep_alive
        server_keep_alive = None
        if v5 and settings.max_keepalive and not 0 < keep_alive <= settings.max_keepalive:
            keep_alive = server_keep_alive = settings.max_keepalive
        session.keep_alive = effective_keepalive(keep_alive, settings)
        if v5:
            session.limits = ClientLimits(props.get(properties.RECEIVE_MAXIMUM, 65535),
                                          props.get(properties.MAXIMUM_PACKET_SIZE, 0),
                                          bool(props.get(properties.REQUEST_PROBLEM_INFO, 1)))
            session.limits.connack = self._connack_props(requested, expiry, server_keep_alive)
        return session

    def _connack_props(self, requested: int, expiry: float | None,
                       server_keep_alive: int | None) -> bytes:
        """What an accepting MQTT 5 CONNACK tells the client of the broker's limits
        (§3.2.2.3): only what differs from the standard's defaults."""
        settings = self.settings
        out: list[tuple[int, object]] = []
        if expiry is not None and expiry != requested and expiry != float("inf"):
            out.append((properties.SESSION_EXPIRY, int(expiry)))
        if settings.receive_maximum < 65535:
            out.append((properties.RECEIVE_MAXIMUM, settings.receive_maximum))
        out.append((properties.MAXIMUM_PACKET_SIZE, settings.max_packet_size))
        if settings.topic_alias_maximum:
            out.append((properties.TOPIC_ALIAS_MAXIMUM, settings.topic_alias_maximum))
        if not settings.wildcard_subscriptions:
            out.append((properties.WILDCARD_SUB_AVAILABLE, 0))
        if not settings.shared_subscriptions:
            out.append((properties.SHARED_SUB_AVAILABLE, 0))
        if server_keep_alive is not None:
            out.append((properties.SERVER_KEEP_ALIVE, server_keep_alive))
        return properties.encode(out)


def effective_keepalive(keep_alive: int, settings: Settings) -> int:
    """Seconds of silence tolerated: keepalive_factor x the client's keep-alive (0 = never)."""
    if keep_alive <= 0:
        return 0
    return max(1, math.ceil(keep_alive * settings.keepalive_factor))


def _shown(text: str | None) -> str:
    """A client-chosen string as the log shows it: quoted, escaped, cut to SHOWN_CHARS."""
    if text is None:
        return "none"
    return repr(text[:SHOWN_CHARS]) + ("..." if len(text) > SHOWN_CHARS else "")
