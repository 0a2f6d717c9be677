"""One client connection after CONNECT: read whole packets, handle each synchronously.

amqtt's broker handler started a reader task per connection, a task per packet, a task
plus futures per QoS 1/2 message (given up after 5 s), and a message loop waiting on four
futures. Here the connection's own task reads a packet (``FramedReader``: size, time and
string checks done) and handles it in place: PUBLISH is routed, acknowledgements move the
session's outbox, SUBSCRIBE is answered, all without awaiting; the only waits are for
the next packet. Packet handling is in ``handle``, the only code that sees packets.
"""

from __future__ import annotations

import logging

from broker.framing import FramedReader, PacketError
from broker.mqtt import codec
from broker.mqtt.inbound import Inbound, released
from broker.mqtt.link import Link
from broker.mqtt.plugins import audit_fields
from broker.mqtt.session import ConnectionInfo, KeySession
from broker.routing import Router

logger = logging.getLogger(__name__)


class ProtocolViolation(Exception):
    """A packet that MQTT 3.1.1 says ends the connection."""


class MqttConnection:
    __slots__ = ("inbound", "router", "link", "reader", "info", "session", "clean_exit",
                 "ended_by")

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

    def expired(self, reason: str) -> None:
        """The watchdog's verdict (see FramedReader.expire): end the connection now."""
        self.ended_by = reason
        self.link.abort()

    async def serve(self, session: KeySession) -> None:
        """Handle packets until the connection ends (DISCONNECT, EOF, error, kick)."""
        self.session = session
        reader = self.reader
        assert reader is not None
        while True:
            try:
                packet = await reader.packet()
            except PacketError:
                return  # audited by the reader's on_violation
            except (ConnectionError, OSError):
                return
            if packet is None:
                return
            first, body = packet
            try:
                if not self.handle(session, first, body):
                    return
            except (codec.MalformedPacket, ProtocolViolation) as exc:
                self.inbound.audit.event("bad_packet", reason=str(exc), **audit_fields(session))
                return

    def handle(self, session: KeySession, first: int, body: bytes) -> bool:
        """Handle one packet; False when the connection is to end."""
        kind = first >> 4
        router = self.router
        if kind == codec.PUBLISH:
            return self.inbound.publish_packet(session, self.link,
                                               codec.parse_publish(first, body))
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
            codes = router.subscribe(session, requests, self.inbound.subscribe_refusal)
            self.link.write(codec.suback_packet(packet_id, codes))
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
            raise ProtocolViolation("second CONNECT")  # MQTT-3.1.0-2
        else:
            raise ProtocolViolation(f"packet type {kind} is not sent by clients")
        return True
