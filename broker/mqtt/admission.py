"""Admission: who may open a connection, and the CONNECT packet up to authentication.

Connection caps are checked before anything is read (per source: ``SourceCaps``, which
closes a source's idle pending connections rather than refuse its new ones); the CONNECT
packet is read whole (``FramedReader``), parsed by amqtt's ConnectPacket and checked in
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

from amqtt.adapters import BufferReader
from amqtt.mqtt.connack import (
    BAD_USERNAME_PASSWORD,
    IDENTIFIER_REJECTED,
    UNACCEPTABLE_PROTOCOL_VERSION,
)
from amqtt.mqtt.connect import ConnectPacket

from broker.core.audit import AuditLog, PerSourceLimit
from broker.core.settings import Settings
from broker.mqtt import codec
from broker.mqtt.caps import SourceCaps
from broker.mqtt.connection import MqttConnection
from broker.mqtt.framing import PacketError
from broker.mqtt.keeper import StateKeeper
from broker.mqtt.session import ConnectionInfo, KeySession, Will
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
        """A packet that ended the connection (reported by its FramedReader)."""
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

    async def read_connect(self, connection: MqttConnection) -> KeySession | None:
        """Read and check the CONNECT packet; None when the connection is to end (refused
        with a CONNACK, or invalid: audited)."""
        info, reader = connection.info, connection.reader
        assert reader is not None
        try:
            packet = await reader.packet()
        except PacketError:
            return None  # audited by the reader
        if packet is None:
            if connection.ended_by == "idle":
                self._invalid(info, CONNECT_TIMEOUT)
            elif connection.ended_by != EVICTED:  # audited when evicted
                # closed before sending anything: not counted (port checks, probes)
                logger.debug("connection from %s closed before CONNECT", info.peer_ip)
            return None
        self.caps.connect_read(source_of(info.client_ip), connection)
        first, body = packet
        if first >> 4 != codec.CONNECT:  # MQTT-3.1.0-1
            self._invalid(info, f"packet type {first >> 4} before CONNECT", "bad_packet")
            return None
        try:
            raw = bytes((first,)) + codec.remaining_length(len(body)) + body
            connect = await ConnectPacket.from_stream(BufferReader(raw))
        except Exception as exc:  # noqa: BLE001 - malformed CONNECT
            self._invalid(info, type(exc).__name__)
            return None
        header, payload = connect.variable_header, connect.payload
        if header is None or payload is None or connect.proto_name != "MQTT" or \
                header.reserved_flag or (header.will_flag and (
                    payload.will_topic is None or payload.will_message is None)):
            self._invalid(info, "malformed CONNECT")
            return None
        code = None
        if connect.proto_level != 4:  # only MQTT 3.1.1
            code = UNACCEPTABLE_PROTOCOL_VERSION
        elif (not connect.username_flag and connect.password_flag) or (
                connect.username_flag and connect.username is None) or (
                connect.password_flag and connect.password is None):
            code = BAD_USERNAME_PASSWORD  # [MQTT-3.1.2-22]
        elif not connect.clean_session_flag and payload.client_id_is_random:
            code = IDENTIFIER_REJECTED  # [MQTT-3.1.3-8] [MQTT-3.1.3-9]
        if code is not None:
            self._invalid(info, f"CONNACK {code}")
            given = "" if payload.client_id_is_random else connect.client_id or ""
            self.refused(info, given, connect.username, code, {
                UNACCEPTABLE_PROTOCOL_VERSION: f"protocol level {connect.proto_level}",
                BAD_USERNAME_PASSWORD: "malformed user name or password",
                IDENTIFIER_REJECTED: "persistent session without client id"}[code])
            connection.link.write(codec.connack_packet(False, code))
            return None
        client_id, clean = connect.client_id or "", bool(connect.clean_session_flag)
        journal = self.state.journal(client_id) if self.state is not None and not clean else None
        session = KeySession(client_id, clean, info, journal)
        if header.will_flag and connect.will_topic is not None:
            session.will = Will(connect.will_topic, bytes(connect.will_message or b""),
                                connect.will_qos or 0, bool(connect.will_retain_flag))
        session.username = connect.username
        session.password = connect.password
        session.keep_alive = effective_keepalive(connect.keep_alive, self.settings)
        return session


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
