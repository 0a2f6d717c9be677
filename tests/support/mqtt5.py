"""A real paho-mqtt MQTT 5 client for tests: ``harness.Client`` with protocol 5 that keeps
what MQTT 5 says beyond 3.1.1 (reason codes as sent, reason strings, properties, the
server's DISCONNECT) and sends what only MQTT 5 can (properties, subscription options,
a DISCONNECT with a reason or a new Session Expiry Interval)."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, NamedTuple

from paho.mqtt.client import MQTTMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from tests.support.harness import TIMEOUT, Client, RunningBroker
from tests.support.waiting import wait_until

CONNECT, PUBLISH, SUBSCRIBE, DISCONNECT, WILL = (
    PacketTypes.CONNECT, PacketTypes.PUBLISH, PacketTypes.SUBSCRIBE, PacketTypes.DISCONNECT,
    PacketTypes.WILLMESSAGE)


def props(packet_type: int, **values: Any) -> Properties:
    """paho Properties of ``packet_type`` with ``values`` by their paho names
    (``SessionExpiryInterval=60``, ``UserProperty=[("a", "1")]``)."""
    out = Properties(packet_type)
    for name, value in values.items():
        setattr(out, name, value)
    return out


class Answer(NamedTuple):
    """What the broker answered: a reason code as sent, and the properties with it."""

    code: int
    properties: Properties | None

    @property
    def reason(self) -> str | None:
        """Its Reason String, if it has one."""
        return getattr(self.properties, "ReasonString", None)


class Client5(Client):
    """paho's MQTT 5 client. ``connect`` returns the CONNACK reason code as sent (0x86,
    0x87, ...), ``connack`` keeps it with its properties and session-present flag;
    ``subscribe`` returns the SUBACK reason code as sent; ``publish`` the PUBACK's (or
    PUBCOMP's) for QoS 1 (2); ``server_disconnect`` is the server's DISCONNECT, if one came.
    ``clean_session`` is Clean Start; ``session_expiry`` the Session Expiry Interval asked
    for (None: 0, or the broker's maximum when not ``clean_session``, like 3.1.1)."""

    def __init__(self, port: int, client_id: str, key: str | None = None,
                 secret: str | None = None, *, clean_session: bool = True,
                 session_expiry: int | None = None, transport: str = "tcp") -> None:
        super().__init__(port, client_id, key, secret, clean_session=clean_session,
                         transport=transport, protocol=5)
        self.session_expiry = session_expiry
        self.connack: Answer | None = None
        self.session_present = False
        self.server_disconnect: Answer | None = None
        self.suback: Answer | None = None
        self._acks: dict[int, Answer] = {}
        self._acked = threading.Condition()
        self._subacks5: queue.Queue[tuple[list[int], Properties | None]] = queue.Queue()
        self._unsubacks: queue.Queue[list[int]] = queue.Queue()
        self.client.on_publish = self._on_publish
        self.client.on_unsubscribe = self._on_unsubscribe
        self.client.on_disconnect = self._on_disconnect

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        self.connack = Answer(reason.value, properties)
        self.session_present = bool(flags.session_present)
        self._connack.put(reason.value)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: list[ReasonCode],
                      properties: Properties | None) -> None:
        self._subacks5.put(([code.value for code in codes], properties))

    def _on_unsubscribe(self, _c: Any, _u: Any, _mid: int, codes: list[ReasonCode],
                        _p: Any) -> None:
        self._unsubacks.put([code.value for code in codes])

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        with self._acked:
            self._acks[mid] = Answer(reason.value, properties)
            self._acked.notify_all()

    def _on_disconnect(self, _c: Any, _u: Any, flags: Any, reason: ReasonCode,
                       properties: Properties | None) -> None:
        if flags.is_disconnect_packet_from_server:
            self.server_disconnect = Answer(reason.value, properties)
        self.disconnected.set()

    def will(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
             **properties: Any) -> Client5:
        """The Will, with Will properties by their paho names (``WillDelayInterval=5``)."""
        self.client.will_set(topic, payload, qos, retain,
                             props(WILL, **properties) if properties else None)
        return self

    def connect(self, keepalive: int = 30, bind_address: str = "",
                properties: Properties | None = None, **values: Any) -> int:
        """Connect; the CONNACK reason code. CONNECT properties by their paho names."""
        if properties is None:
            if self.session_expiry is not None:
                values.setdefault("SessionExpiryInterval", self.session_expiry)
            properties = props(CONNECT, **values) if values else None
        return super().connect(keepalive, bind_address, properties)

    def subscribe(self, topic_filter: str, qos: int = 0, **options: Any) -> int:
        """One filter; its SUBACK reason code (the granted QoS, or why not). ``options``:
        noLocal, retainAsPublished, retainHandling (paho's names), and ``sub_id``."""
        codes = self.subscribe_many([(topic_filter, qos)], **options)
        return codes[0]

    def subscribe_many(self, filters: list[tuple[str, int]], sub_id: int | None = None,
                       **options: Any) -> list[int]:
        """One SUBSCRIBE of several filters (same options); their reason codes, the SUBACK's
        properties in ``suback``."""
        properties = props(SUBSCRIBE, SubscriptionIdentifier=sub_id) if sub_id else None
        self.client.subscribe([(f, SubscribeOptions(qos=qos, **options)) for f, qos in filters],
                              properties=properties)
        try:
            codes, answer = self._subacks5.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError("no SUBACK received") from None
        self.suback = Answer(max(codes), answer)
        return codes

    def unsubscribe(self, *filters: str) -> list[int]:
        self.client.unsubscribe(list(filters))
        try:
            return self._unsubacks.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError("no UNSUBACK received") from None

    def publish(self, topic: str, payload: bytes | str, qos: int = 0,  # type: ignore[override]
                retain: bool = False, **properties: Any) -> Answer | None:
        """Publish with PUBLISH properties by their paho names; for QoS 1/2 the reason code
        of its PUBACK (PUBCOMP) and the properties with it, None for QoS 0."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain,
                                   properties=props(PUBLISH, **properties) if properties
                                   else None)
        if not qos:
            return None
        with self._acked:
            if not self._acked.wait_for(lambda: info.mid in self._acks, TIMEOUT):
                raise AssertionError(f"no acknowledgement of the PUBLISH to {topic!r}")
            return self._acks.pop(info.mid)

    def disconnect(self, reason: int = 0, **properties: Any) -> None:
        """A DISCONNECT with ``reason`` (0x04: send my Will) and DISCONNECT properties
        (``SessionExpiryInterval=...``); the client then stops."""
        try:
            self.client.disconnect(ReasonCode(DISCONNECT, identifier=reason),
                                   props(DISCONNECT, **properties) if properties else None)
        finally:
            self.client.loop_stop()

    def __enter__(self) -> Client5:
        return self


def user_properties(message: MQTTMessage) -> list[tuple[str, str]]:
    return list(getattr(message.properties, "UserProperty", []) or [])


def device_key(daemon: RunningBroker, device: str, **options: Any) -> tuple[str, str]:
    """Register ``device`` (unless it is) and make a key for it alone (``options``: those of
    KeyStore.create_key, ``device_ids`` included); the key's id and its secret."""
    if not daemon.ks("device_exists", device, app=options.get("app")):
        daemon.ks("add_device", device, app=options.get("app"))
    options.setdefault("device_ids", [device])
    key, secret = daemon.ks("create_key", **options)
    return key.key, secret


class Device:
    """A registered device with a key of its own (``key_options``: those of
    KeyStore.create_key): MQTT 5 clients connect as it, again and again."""

    def __init__(self, daemon: RunningBroker, device_id: str, **key_options: Any) -> None:
        self.daemon, self.id = daemon, device_id
        self.key, self.secret = device_key(daemon, device_id, **key_options)

    def client(self, *, clean_session: bool = True,
               session_expiry: int | None = None) -> Client5:
        """A client of the device, not connected yet."""
        return Client5(self.daemon.port(), self.id, self.key, self.secret,
                       clean_session=clean_session, session_expiry=session_expiry)

    def connect(self, *, clean_session: bool = True, session_expiry: int | None = None,
                keepalive: int = 30, **values: Any) -> Client5:
        """A connected client (``values``: CONNECT properties by their paho names)."""
        client = self.client(clean_session=clean_session, session_expiry=session_expiry)
        assert client.connect(keepalive, **values) == 0, client.connack
        return client

    def away(self, topic_filter: str, session_expiry: int = 3600) -> None:
        """Leave a session (``session_expiry`` s) subscribed to ``topic_filter`` at QoS 1;
        returns once the broker has it offline."""
        with self.connect(clean_session=False, session_expiry=session_expiry) as client:
            assert client.subscribe(topic_filter, 1) == 1
            client.disconnect()
        wait_until(lambda: offline(self.daemon, self.id))


def offline(daemon: RunningBroker, client_id: str) -> bool:
    """The broker keeps a session for ``client_id`` and its connection has ended."""
    session = daemon.broker.sessions.get(client_id)
    return session is not None and session.link is None


def gone(daemon: RunningBroker, client_id: str) -> bool:
    """The broker keeps no session for ``client_id``."""
    return client_id not in daemon.broker.sessions


def received_before(client: Client, sentinel: bytes) -> list[MQTTMessage]:
    """The messages ``client`` received before the first whose payload is ``sentinel``
    (published after them: nothing else is on its way)."""
    out = []
    while (message := client.get()) is not None and message.payload != sentinel:
        out.append(message)
    assert message is not None, f"{sentinel!r} did not arrive"
    return out


def until_past(deadline: float) -> None:
    """Wait until the wall clock is past ``deadline`` (time itself is under test: a
    message's or a session's expiry)."""
    wait_until(lambda: time.time() > deadline, max(0.0, deadline - time.time()) + 2.0,
               "the deadline passed")
