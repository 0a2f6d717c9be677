"""Retained messages: kept per topic within quotas, and sent, paced, after a SUBSCRIBE.

MQTT-3.3.1-5..11: a PUBLISH with the retain flag replaces the topic's retained message
(an empty payload deletes it); a SUBSCRIBE gets the retained messages its filter
matches. They live in a trie (``RetainedStore``: a SUBSCRIBE walks only its filter's
subtree), mounted per application like every topic, and count against quotas
(docs/limits.md#retained):

* shared quotas: per access key (the key of the session that published), per
  application, and all together;
* a device's *reserve*: a few messages on its own device topics that no other key can
  take away, whatever the shared quotas say, bounded in all per application.

Retained messages for a SUBSCRIBE are sent by one paced task per session, one filter at
a time, waiting for the client to read (and for room in its in-flight window), and
yielding to other work, so a SUBSCRIBE matching many retained messages can stall neither
the broker nor the session. Each is checked against the subscriber like any delivery.
With a broker state kept (broker.state), every change is marked for the next flush.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from amqtt.contexts import Action

from broker.core.periodic import spawn
from broker.core.settings import Settings
from broker.mqtt.keeper import StateKeeper
from broker.mqtt.link import LOW_WATER, Link
from broker.mqtt.outbox import MessageProps, OutMessage
from broker.mqtt.quotas import Limit, Quotas, Usage
from broker.mqtt.session import KeySession
from broker.topics import RetainedStore, device_of, device_topic

RETAINED_BATCH = 64  # retained messages sent between two yields to the event loop


class Retained:
    """One retained message (its topic as clients see it: unmounted) and the quota
    buckets it is counted in: ("k:<key>", "a:<app mount>") for the shared quotas, or
    ("d:<device id>", "r:<app mount>") for a device's reserve."""

    __slots__ = ("topic", "payload", "qos", "buckets", "size", "props")

    def __init__(self, topic: str, payload: bytes, qos: int, buckets: tuple[str, str],
                 props: MessageProps | None = None) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.buckets = buckets
        self.props = props  # MQTT 5 properties, sent with it (its expiry ends it too)
        self.size = len(topic.encode("utf-8", "surrogatepass")) + len(payload) + (
            len(props.forward) if props is not None else 0)

    @property
    def bucket(self) -> str:
        """The bucket saved with it (broker.state): the key's, or the device's reserve."""
        return self.buckets[0]

    @property
    def reserved(self) -> bool:
        return self.buckets[0].startswith("d:")


class Delivery(Protocol):
    """What paced sending needs of the router."""

    def send_qos0(self, session: KeySession, link: Link, packet: bytes) -> None: ...

    def enqueue(self, session: KeySession, message: OutMessage) -> bool: ...

    def over_budget(self, session: KeySession, size: int, buffered: int) -> bool: ...

    def publish_bytes(self, session: KeySession, topic: str, payload: bytes, qos: int,
                      retain: bool, packet_id: int = 0, dup: bool = False,
                      props: MessageProps | None = None, ids: tuple[int, ...] = (),
                      check_expiry: bool = True) -> bytes | None: ...


class RetainedMessages:
    def __init__(self, settings: Settings, delivery: Delivery,
                 state: StateKeeper | None = None) -> None:
        self.settings = settings
        self.delivery = delivery
        self.state = state
        self.store: RetainedStore[Retained] = RetainedStore()
        self.quotas = Quotas()  # by bucket
        self.shared = Usage()  # every message outside a device's reserve
        self.usage = Usage()  # every message (metrics)
        s = settings
        self.per_key = Limit(s.max_retained_per_key, s.max_retained_bytes_per_key,
                             ("max_retained_per_key", "max_retained_bytes_per_key"))
        self.per_app = Limit(s.max_retained_per_app, s.max_retained_bytes_per_app,
                             ("max_retained_per_app", "max_retained_bytes_per_app"))
        self.overall = Limit(s.max_retained_messages, s.max_retained_bytes,
                             ("max_retained_messages", "max_retained_bytes"))
        self.reserve = Limit(s.device_retained_reserve, s.device_retained_reserve_bytes,
                             ("device_retained_reserve", "device_retained_reserve_bytes"))
        self.reserve_per_app = Limit(
            s.max_retained_reserve_per_app, s.max_retained_reserve_bytes_per_app,
            ("max_retained_reserve_per_app", "max_retained_reserve_bytes_per_app"))

    def __len__(self) -> int:
        return len(self.store)

    # ------------------------------------------------------------------ keeping
    def retain(self, session: KeySession, topic: str, payload: bytes, qos: int,
               props: MessageProps | None = None) -> str | None:
        """Keep (or, for an empty payload, delete [MQTT-3.3.1-10]) the retained message on
        ``topic`` in the session's application; returns why it was not kept, or None. The
        message is delivered live either way."""
        mount = session.mount
        mounted = mount + topic
        old = self.store.get(mounted)
        if not payload:
            if old is not None:
                self._charge(old, -1)
                self.store.delete(mounted)
                self._saved(mount, topic, None)
            return None
        if old is not None:
            self._charge(old, -1)
        message = self._reserved(session, topic, payload, qos, props)
        refusal = None
        if message is None:
            key = session.grant.key.key if session.grant else ""
            message = Retained(topic, payload, qos, (f"k:{key}", f"a:{mount}"), props)
            refusal = self._shared_refusal(message)
        if refusal is not None:
            if old is not None:
                self._charge(old)  # the previous message stays retained
            return refusal
        self._charge(message)
        self.store.set(mounted, message)
        self._saved(mount, topic, message)
        return None

    def _reserved(self, session: KeySession, topic: str, payload: bytes,
                  qos: int, props: MessageProps | None) -> Retained | None:
        """The message in its device's reserve, if it is on the session's own device
        topics and both the device's and the application's reserve have room."""
        if device_of(topic, self.settings.device_prefix) != session.client_id:
            return None
        message = Retained(topic, payload, qos,
                           (f"d:{session.client_id}", f"r:{session.mount}"), props)
        return message if self._reserve_refusal(message) is None else None

    def _reserve_refusal(self, message: Retained) -> str | None:
        if not self.reserve.count:
            return "device_retained_reserve 0"
        device, app = message.buckets
        return (self.reserve.refusal(self.quotas.get(device), message.size, "device reserve")
                or self.reserve_per_app.refusal(self.quotas.get(app), message.size,
                                                "application reserve"))

    def _shared_refusal(self, message: Retained) -> str | None:
        key, app = message.buckets
        size = message.size
        return (self.per_key.refusal(self.quotas.get(key), size, "key")
                or self.per_app.refusal(self.quotas.get(app), size, "application")
                or self.overall.refusal(self.shared, size, "broker"))

    def _charge(self, message: Retained, sign: int = 1) -> None:
        for bucket in message.buckets:
            self.quotas.charge(bucket, sign * message.size, sign)
        for usage in (self.usage,) if message.reserved else (self.usage, self.shared):
            usage.count += sign
            usage.size += sign * message.size

    def _saved(self, mount: str, topic: str, message: Retained | None) -> None:
        if self.state is not None:
            self.state.retained_changed(mount, topic, message)

    def expire(self, mounted: str, message: Retained) -> None:
        """A retained message whose Message Expiry Interval passed: no longer kept."""
        if self.store.get(mounted) is message:
            self._charge(message, -1)
            self.store.delete(mounted)
            self._saved(mounted[:len(mounted) - len(message.topic)], message.topic, None)

    # ------------------------------------------------------------------ removal
    def _drop(self, topic_filter: str) -> int:
        doomed = [topic for topic, _ in self.store.matching(topic_filter)]
        for topic in doomed:
            message = self.store.get(topic)
            if message is not None:
                self._charge(message, -1)
                self.store.delete(topic)
                self._saved(topic[:len(topic) - len(message.topic)], message.topic, None)
        return len(doomed)

    def drop_device(self, device_id: str) -> int:
        """Delete the retained messages on a removed device's topics (in whichever
        application: '+' is the mount level). Returns how many."""
        return self._drop("+/" + device_topic(self.settings.device_prefix, device_id) + "/#")

    def drop_app(self, mount: str) -> int:
        """Delete every retained message of a deleted application."""
        return self._drop(mount + "#")

    def restore(self, mount: str, topic: str, payload: bytes, qos: int, bucket: str,
                props: MessageProps | None = None) -> bool:
        """A saved retained message, counted in its quota buckets; False (not kept) when
        the quotas in force no longer leave room for it."""
        if bucket.startswith("d:"):
            message = Retained(topic, payload, qos, (bucket, f"r:{mount}"), props)
            fits = self._reserve_refusal(message) is None
        else:
            message = Retained(topic, payload, qos, (bucket, f"a:{mount}"), props)
            fits = self._shared_refusal(message) is None
        if fits:  # one message per topic in a saved state: nothing to replace
            self._charge(message)
            self.store.set(mount + topic, message)
        return fits

    # ------------------------------------------------------------------ paced sending
    def send_for(self, session: KeySession, granted: dict[str, int]) -> None:
        """Send the retained messages of newly granted filters (paced, in the
        background); filters granted while a send is running join it."""
        pending = session.retained_filters
        for topic_filter, qos in granted.items():
            pending[topic_filter] = qos
        if not session.retained_sending and session.link is not None:
            session.retained_sending = True
            spawn(self._sender(session))

    async def _sender(self, session: KeySession) -> None:
        """One filter at a time, waiting whenever the client has not taken what was sent."""
        link = session.link
        try:
            while session.retained_filters and link is not None:
                topic_filter = next(iter(session.retained_filters))
                qos = session.retained_filters.pop(topic_filter)
                sent = 0
                for _, message in self.store.matching(session.mount + topic_filter):
                    if session.link is not link or session.kicked:
                        return
                    if not session.decide(message.topic, Action.RECEIVE).allowed:
                        continue
                    if message.props is not None and message.props.expired(time.time()):
                        self.expire(session.mount + message.topic, message)
                        continue
                    await self.send_one(session, link, message, min(qos, message.qos))
                    sent += 1
                    if sent % RETAINED_BATCH == 0:
                        await asyncio.sleep(0)
        finally:
            session.retained_sending = False

    async def send_one(self, session: KeySession, link: Link, message: Retained,
                       qos: int) -> None:
        delivery, settings = self.delivery, self.settings
        if qos == 0:
            packet = delivery.publish_bytes(session, message.topic, message.payload, 0, True,
                                            props=message.props)
            if packet is None:  # expired, or too large for the client
                return
            # Wait until the packet fits the session's budget beside what is still
            # buffered (a large message waits for an empty link): a reader that keeps up
            # is never taken for a slow consumer by its own retained messages.
            room = settings.max_session_bytes - session.outbox.held_bytes - len(packet)
            await link.writable(min(LOW_WATER, max(room, 0)))
            delivery.send_qos0(session, link, packet)
            return
        # QoS 1/2: wait for room in the in-flight window rather than fill the queue
        # (which would crowd out live messages and make its publishers wait).
        outbox = session.outbox
        while not link.is_closing() and (
                len(outbox) >= settings.max_inflight_messages
                or delivery.over_budget(session, message.size + 64, link.buffered())):
            await asyncio.sleep(0.005)
        if not link.is_closing():
            delivery.enqueue(session, OutMessage(message.topic, message.payload, qos, True,
                                                 message.props))
