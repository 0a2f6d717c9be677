"""Durable broker state with a real `keybroker serve` process stopped as an operator
(SIGTERM) or a crash (SIGKILL) would stop it, and started again on the same files:
retained messages, persistent sessions with their subscriptions and queued messages,
unacknowledged deliveries and incoming QoS 2 ids come back (docs/persistence.md), and
what MQTT 5 adds to them (paho's MQTT 5 client: properties, message and session expiry,
subscription identifiers). Raw sockets where packet ids, DUP flags and CONNACK's
session-present bit are checked."""

from __future__ import annotations

import contextlib
import queue
import signal
import socket
import sqlite3
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from keystore import KeyStore
from tests.support import mqtt_raw as raw
from tests.support.harness import Client, seed
from tests.support.process import DaemonProcess
from tests.support.waiting import wait_until

PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK = 3, 4, 5, 6, 7, 9
FLUSH = 0.2  # [persistence] flush_interval of these daemons
# Any free port for the HTTP API too: the default 8080 may be taken on a shared machine.
CONFIG = f"[persistence]\nflush_interval = {FLUSH}\n[api]\nport = 0\n"
SESSION_PRESENT = bytes([1, 0])
DISCONNECT = b"\xe0\x00"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path, CONFIG)
    try:
        yield process
    finally:
        process.kill()


def seed_devices(db: Path, *devices: str, topic_mode: str = "none") -> tuple[str, str]:
    """The devices and one key for all of them."""

    async def run(ks: KeyStore) -> tuple[str, str]:
        for device in devices:
            await ks.add_device(device)
        key, secret = await ks.create_key(device_ids=list(devices), topic_mode=topic_mode)
        return key.key, secret

    return seed(db, run)


def retained(port: int, creds: tuple[str, str], topic_filter: str,
             client_id: str = "watcher") -> dict[str, bytes]:
    """Topic -> payload of the retained messages a new subscription gets."""
    with Client(port, client_id, *creds) as watcher:
        assert watcher.connect() == 0
        assert watcher.subscribe(topic_filter, 1) == 1
        out = {}
        while (message := watcher.get(0.5)) is not None:
            assert message.retain
            out[message.topic] = message.payload
        return out


def subscribe(sock: socket.socket, topic_filter: str, qos: int, packet_id: int = 1) -> None:
    sock.sendall(raw.subscribe(topic_filter, packet_id, qos))
    suback = raw.read_packet(sock)
    assert suback is not None and suback.kind == SUBACK and suback.body[-1] == qos


def packets(sock: socket.socket, count: int) -> list[raw.Packet]:
    out = []
    while len(out) < count and (packet := raw.read_packet(sock, 3.0)) is not None:
        out.append(packet)
    return out


class Client5:
    """A paho MQTT 5 client: its CONNACK (reason code, session present), its SUBACKs and
    the messages it gets, with their properties. ``expiry``: the Session Expiry Interval
    it asks for (None: none, the session ends with the connection)."""

    def __init__(self, port: int, client_id: str, creds: tuple[str, str],
                 expiry: int | None = None) -> None:
        self.port, self.expiry = port, expiry
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(*creds)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._connack: queue.Queue[tuple[int, bool]] = queue.Queue()
        self._subacks: queue.Queue[int] = queue.Queue()
        self.client.on_connect = lambda _c, _u, flags, reason, _p: self._connack.put(
            (reason.value, flags.session_present))
        self.client.on_subscribe = lambda _c, _u, _m, codes, _p: self._subacks.put(
            codes[0].value)
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)

    def connect(self) -> tuple[int, bool]:
        props = Properties(PacketTypes.CONNECT)
        if self.expiry is not None:
            props.SessionExpiryInterval = self.expiry
        self.client.reconnect_delay_set(60, 120)  # never auto-reconnect inside a test
        self.client.connect_async("127.0.0.1", self.port, clean_start=False, properties=props)
        self.client.loop_start()
        return self._connack.get(timeout=5)

    def subscribe(self, topic_filter: str, qos: int, sub_id: int = 0) -> int:
        props = Properties(PacketTypes.SUBSCRIBE)
        if sub_id:
            props.SubscriptionIdentifier = sub_id
        self.client.subscribe(topic_filter, options=SubscribeOptions(qos=qos),
                              properties=props)
        return self._subacks.get(timeout=5)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                **properties: Any) -> None:
        """``properties``: paho's names (MessageExpiryInterval, UserProperty, ...)."""
        props = Properties(PacketTypes.PUBLISH)
        for name, value in properties.items():
            setattr(props, name, value)
        info = self.client.publish(topic, payload, qos, retain, properties=props)
        if qos:
            info.wait_for_publish(5)

    def received(self, wait: float = 1.0) -> dict[str, mqtt.MQTTMessage]:
        """Topic -> message, of what arrives until nothing has for ``wait`` seconds."""
        out = {}
        with contextlib.suppress(queue.Empty):
            while True:
                message = self.messages.get(timeout=wait)
                out[message.topic] = message
        return out

    def __enter__(self) -> Client5:
        return self

    def __exit__(self, *_exc: object) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def prop(message: mqtt.MQTTMessage, name: str) -> Any:
    """A property of a received message, None when it has none."""
    return getattr(message.properties, name, None)


def saved(daemon: DaemonProcess, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of the daemon's state file as they are now (it may be running)."""
    with contextlib.closing(sqlite3.connect(daemon.state)) as db:
        return db.execute(sql, params).fetchall()


def flushed(daemon: DaemonProcess, sql: str, count: int, what: str,
            *params: Any) -> list[tuple[Any, ...]]:
    """The rows of ``sql`` once there are ``count`` of them (a flush wrote them)."""

    def rows() -> list[tuple[Any, ...]] | None:
        found = saved(daemon, sql, *params)
        return found if len(found) == count else None

    return wait_until(rows, what=what)


def test_retained_messages_survive_sigterm_and_sigkill(daemon: DaemonProcess) -> None:
    creds = seed_devices(daemon.db, "dev-a", "watcher", topic_mode="all")
    port = daemon.start()
    with Client(port, "dev-a", *creds) as device:
        assert device.connect() == 0
        device.publish("cfg/x", b"one", qos=1, retain=True)
        device.publish("cfg/old", b"to be deleted", qos=1, retain=True)
    assert daemon.stop(signal.SIGTERM) == 0

    port = daemon.start()
    assert retained(port, creds, "cfg/#") == {"cfg/x": b"one", "cfg/old": b"to be deleted"}
    with Client(port, "dev-a", *creds) as device:
        assert device.connect() == 0
        device.publish("cfg/y", b"two", qos=0, retain=True)
        device.publish("cfg/old", b"", qos=1, retain=True)  # deletes it
    # A crash loses at most the last flush interval: once flushed, the changes survive it.
    wait_until(lambda: sorted(saved(daemon, "SELECT topic, payload FROM retained")) == [
        ("cfg/x", b"one"), ("cfg/y", b"two")])
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL

    port = daemon.start()
    assert retained(port, creds, "cfg/#") == {"cfg/x": b"one", "cfg/y": b"two"}
    assert "restored 2 retained messages" in daemon.log()


def test_a_persistent_session_resumes_after_a_restart(daemon: DaemonProcess) -> None:
    creds = seed_devices(daemon.db, "a", "b")
    port = daemon.start()
    sock, connack = raw.session(port, "a", *creds, clean=False)
    with sock:
        subscribe(sock, "losant/a/cmd/#", 1, 1)
        subscribe(sock, "losant/a/cfg", 0, 2)
        sock.sendall(DISCONNECT)
    wait_until(lambda: saved(daemon, "SELECT client_id FROM sessions "
                                     "WHERE disconnected_at IS NOT NULL") == [("a",)])
    with Client(port, "b", *creds) as sender:
        assert sender.connect() == 0
        for n in (1, 2, 3):
            sender.publish(f"losant/a/cmd/{n}", f"m{n}".encode(), qos=1)
    assert daemon.stop(signal.SIGTERM) == 0

    port = daemon.start()
    sock, connack = raw.session(port, "a", *creds, clean=False)
    with sock:
        assert connack.body == SESSION_PRESENT
        queued = packets(sock, 3)
        assert [(p.kind, p.topic, p.payload, p.qos) for p in queued] == [
            (PUBLISH, f"losant/a/cmd/{n}", f"m{n}".encode(), 1) for n in (1, 2, 3)]
        for packet in queued:
            sock.sendall(raw.ack(PUBACK, packet.packet_id))
        with Client(port, "b", *creds) as sender:  # both subscriptions came back
            assert sender.connect() == 0
            sender.publish("losant/a/cfg", b"live", qos=0)
            sender.publish("losant/a/cmd/4", b"m4", qos=1)
        live = packets(sock, 2)
        assert [(p.topic, p.payload, p.qos) for p in live] == [
            ("losant/a/cfg", b"live", 0), ("losant/a/cmd/4", b"m4", 1)]


def test_unacknowledged_deliveries_are_resent_after_a_crash(daemon: DaemonProcess) -> None:
    creds = seed_devices(daemon.db, "a", "b")
    port = daemon.start()
    sock, _ = raw.session(port, "a", *creds, clean=False)
    with sock:
        subscribe(sock, "losant/a/rd/#", 2)
        with Client(port, "b", *creds) as sender:
            assert sender.connect() == 0
            sender.publish("losant/a/rd/one", b"one", qos=1)
            sender.publish("losant/a/rd/two", b"two", qos=2)
            sender.publish("losant/a/rd/three", b"three", qos=2)
        first = packets(sock, 3)
        assert [p.payload for p in first] == [b"one", b"two", b"three"]
        sock.sendall(raw.ack(PUBREC, first[2].packet_id))  # "three" released, no PUBCOMP
        pubrel = raw.read_packet(sock)
        assert pubrel is not None and pubrel.kind == PUBREL
        sock.sendall(raw.publish_qos("losant/a/up", b"once", 2, 7))  # incoming, no PUBREL
        pubrec = raw.read_packet(sock)
        assert pubrec is not None and (pubrec.kind, pubrec.packet_id) == (PUBREC, 7)
        # Flushed: the three in flight ("three" released) and the incoming id 7.
        wait_until(lambda: saved(daemon, "SELECT payload, released FROM messages "
                                         "WHERE client_id = 'a' AND packet_id != 0 ORDER BY seq")
                   == [(b"one", 0), (b"two", 0), (b"", 1)]
                   and saved(daemon, "SELECT inflight_in FROM sessions WHERE client_id = 'a'")
                   == [("7",)])
        assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL

    port = daemon.start()
    sock, connack = raw.session(port, "a", *creds, clean=False)
    with sock:
        assert connack.body == SESSION_PRESENT
        again = packets(sock, 3)
        # MQTT-4.4.0-1: the same packet ids, DUP on the PUBLISHes, PUBREL for the released.
        assert [(p.kind, p.packet_id) for p in again] == [
            (PUBLISH, first[0].packet_id), (PUBLISH, first[1].packet_id),
            (PUBREL, first[2].packet_id)]
        assert [(p.payload, p.qos, p.dup) for p in again[:2]] == [
            (b"one", 1, True), (b"two", 2, True)]
        with Client(port, "b", *creds) as watcher:  # the incoming QoS 2 id was kept too
            assert watcher.connect() == 0
            assert watcher.subscribe("losant/a/up", 2) == 2
            sock.sendall(raw.publish_qos("losant/a/up", b"once", 2, 7, dup=True))
            pubrec = raw.read_packet(sock)
            assert pubrec is not None and (pubrec.kind, pubrec.packet_id) == (PUBREC, 7)
            sock.sendall(raw.ack(PUBREL, 7))
            pubcomp = raw.read_packet(sock)
            assert pubcomp is not None and (pubcomp.kind, pubcomp.packet_id) == (PUBCOMP, 7)
            assert watcher.get(0.5) is None  # not delivered a second time


def test_a_restored_qos2_id_reused_without_dup_is_a_new_message(daemon: DaemonProcess) -> None:
    """A crash after the client's PUBREL was answered but before it was saved leaves the id
    in the state: the client, which had its PUBCOMP, may reuse the id for a new message
    (DUP 0), which must be delivered, not taken for the old one."""
    creds = seed_devices(daemon.db, "a", "b")
    port = daemon.start()
    sock, _ = raw.session(port, "a", *creds, clean=False)
    sock.close()
    assert daemon.stop() == 0
    with sqlite3.connect(daemon.state) as db:  # what the crash left: 7 and 8 pending
        assert db.execute("UPDATE sessions SET inflight_in = '7 8' WHERE client_id = 'a'"
                          ).rowcount == 1

    port = daemon.start()
    sock, connack = raw.session(port, "a", *creds, clean=False)
    with sock, Client(port, "b", *creds) as watcher:
        assert connack.body == SESSION_PRESENT
        assert watcher.connect() == 0
        assert watcher.subscribe("losant/a/up", 2) == 2
        sock.sendall(raw.publish_qos("losant/a/up", b"old", 2, 8, dup=True))  # a re-send
        sock.sendall(raw.publish_qos("losant/a/up", b"new", 2, 7))
        acks = packets(sock, 2)
        assert [(p.kind, p.packet_id) for p in acks] == [(PUBREC, 8), (PUBREC, 7)]
        message = watcher.get(2.0)
        assert message is not None and message.payload == b"new"
        assert watcher.get(0.5) is None  # the re-sent 8 was not passed on
        sock.sendall(raw.publish_qos("losant/a/up", b"new", 2, 7))  # now a duplicate
        assert [(p.kind, p.packet_id) for p in packets(sock, 1)] == [(PUBREC, 7)]
        assert watcher.get(0.5) is None


def test_with_sync_an_acknowledged_message_survives_a_crash(tmp_path: Path) -> None:
    """sync = true: PUBACK only once saved, so a crash right after it loses nothing, even
    with a flush interval far longer than the test."""
    daemon = DaemonProcess(tmp_path, "[persistence]\nflush_interval = 60.0\nsync = true\n"
                                     "[api]\nport = 0\n")
    try:
        creds = seed_devices(daemon.db, "a", "b", "watcher")
        port = daemon.start()
        sock, _ = raw.session(port, "a", *creds, clean=False)
        with sock:
            subscribe(sock, "losant/a/cmd", 1)
        with Client(port, "b", *creds) as sender:
            assert sender.connect() == 0
            sender.publish("losant/a/cmd", b"queued", qos=1)  # returns on PUBACK
            sender.publish("losant/b/state", b"kept", qos=1, retain=True)
            assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL

        port = daemon.start()
        assert retained(port, creds, "losant/b/state") == {"losant/b/state": b"kept"}
        sock, connack = raw.session(port, "a", *creds, clean=False)
        with sock:
            assert connack.body == SESSION_PRESENT
            (message,) = packets(sock, 1)
            assert (message.topic, message.payload) == ("losant/a/cmd", b"queued")
    finally:
        daemon.kill()


def test_an_unusable_state_file_stops_the_start_until_reset(daemon: DaemonProcess) -> None:
    seed_devices(daemon.db, "a")
    garbage = b"this is not an SQLite database\n" * 200
    daemon.state.write_bytes(garbage)
    daemon.spawn()
    assert daemon.wait() == 1
    errors = [line for line in daemon.lines if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in daemon.log()
    assert str(daemon.state) in errors[0] and "--reset-state" in errors[0]
    assert daemon.state.read_bytes() == garbage  # nothing discarded

    daemon.start("--reset-state")
    backups = list(daemon.workdir.glob("keybroker.state.db.*.bak"))
    assert len(backups) == 1 and backups[0].read_bytes() == garbage
    assert daemon.stop() == 0
    assert daemon.state.read_bytes() != garbage


def test_a_second_daemon_on_the_same_state_file_refuses_to_start(
        daemon: DaemonProcess, tmp_path: Path) -> None:
    creds = seed_devices(daemon.db, "a")
    port = daemon.start()
    (tmp_path / "other").mkdir()
    other = DaemonProcess(tmp_path / "other",
                          f'[persistence]\npath = "{daemon.state}"\n[api]\nport = 0\n')
    try:
        other.spawn()
        assert other.wait() == 1
    finally:
        other.kill()
    errors = [line for line in other.lines if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in other.log()
    assert str(daemon.state) in errors[0] and "in use by another keybroker daemon" in errors[0]
    with Client(port, "a", *creds) as device:  # the first one is unharmed
        assert device.connect() == 0
    assert daemon.stop() == 0
    daemon.start()  # and the lock went with it


def test_reset_state_refuses_while_a_daemon_uses_the_file(daemon: DaemonProcess,
                                                          tmp_path: Path) -> None:
    seed_devices(daemon.db, "a")
    daemon.start()
    before = daemon.state.read_bytes()
    (tmp_path / "other").mkdir()
    other = DaemonProcess(tmp_path / "other",
                          f'[persistence]\npath = "{daemon.state}"\n[api]\nport = 0\n')
    try:
        other.spawn("--reset-state")
        assert other.wait() == 1
    finally:
        other.kill()
    errors = [line for line in other.lines if line.startswith("Error:")]
    assert len(errors) == 1 and "in use by another keybroker daemon" in errors[0]
    assert not list(daemon.workdir.glob("keybroker.state.db.*.bak"))  # nothing moved
    assert daemon.state.read_bytes()[:100] == before[:100]
    assert daemon.stop() == 0


# --- MQTT 5 ------------------------------------------------------------------------------


def test_mqtt5_queued_messages_keep_their_properties_through_a_crash(
        daemon: DaemonProcess) -> None:
    """Queued QoS 1 messages come back after a crash with their user properties, content
    type, the remaining Message Expiry (less than they were published with) and their
    subscription identifier; one whose expiry passed while the daemon was down does not;
    the subscription comes back with its identifier too."""
    creds = seed_devices(daemon.db, "a", "b")
    port = daemon.start()
    with Client5(port, "a", creds, expiry=3600) as device:
        assert device.connect() == (0, False)
        assert device.subscribe("losant/a/cmd/#", 1, sub_id=7) == 1
    with Client5(port, "b", creds) as sender:
        assert sender.connect() == (0, False)
        sender.publish("losant/a/cmd/kept", b"kept", MessageExpiryInterval=300,
                       UserProperty=[("trace", "t-1")], ContentType="text/plain")
        sender.publish("losant/a/cmd/brief", b"brief", MessageExpiryInterval=1)
    with Client(port, "b", *creds) as sender3:
        assert sender3.connect() == 0
        sender3.publish("losant/a/cmd/plain", b"plain", qos=1)
    rows = flushed(daemon, "SELECT topic, expires FROM messages", 3, "the queued messages")
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    brief_ends = dict(rows)["losant/a/cmd/brief"]
    wait_until(lambda: time.time() > brief_ends, what="the brief message's expiry")

    port = daemon.start()
    with Client5(port, "a", creds, expiry=3600) as device:
        assert device.connect() == (0, True)
        queued = device.received()
        assert sorted(queued) == ["losant/a/cmd/kept", "losant/a/cmd/plain"]
        kept, plain = queued["losant/a/cmd/kept"], queued["losant/a/cmd/plain"]
        assert kept.payload == b"kept" and kept.qos == 1
        assert prop(kept, "UserProperty") == [("trace", "t-1")]
        assert prop(kept, "ContentType") == "text/plain"
        assert 0 < prop(kept, "MessageExpiryInterval") < 300
        assert prop(kept, "SubscriptionIdentifier") == [7]
        assert plain.payload == b"plain" and prop(plain, "SubscriptionIdentifier") == [7]
        assert prop(plain, "UserProperty") is None
        assert prop(plain, "MessageExpiryInterval") is None
        with Client5(port, "b", creds) as sender:  # the subscription's identifier is back
            assert sender.connect() == (0, False)
            sender.publish("losant/a/cmd/live", b"live")
        live = device.received()["losant/a/cmd/live"]
        assert prop(live, "SubscriptionIdentifier") == [7]
    assert "messages: expired 1" in daemon.log()


def connect5(client_id: str, creds: tuple[str, str], expiry: int) -> bytes:
    """An MQTT 5 CONNECT without Clean Start, with a Session Expiry Interval."""
    props = b"\x11" + struct.pack("!I", expiry)
    return raw.packet(0x10, raw.field("MQTT") + bytes([5, 0xC0]) + struct.pack("!H", 30)
                      + raw.remaining_length(len(props)) + props + raw.field(client_id)
                      + raw.field(creds[0]) + raw.field(creds[1]))


def session5(port: int, client_id: str, creds: tuple[str, str]) -> tuple[socket.socket, bool]:
    """A raw MQTT 5 connection resuming (or starting) a session kept for an hour, and
    whether its CONNACK says the session was present."""
    sock = raw.open_socket(port)
    sock.sendall(connect5(client_id, creds, 3600))
    connack = raw.read_packet(sock)
    assert connack is not None and connack.kind == 2 and connack.body[1] == 0, connack
    return sock, bool(connack.body[0] & 1)


def test_mqtt5_a_message_in_flight_is_resent_after_a_crash_though_it_expired(
        daemon: DaemonProcess) -> None:
    """Its delivery had started (MQTT-3.3.2-5 drops only what has not), so after a restart
    it is re-sent like on any resume, same packet id and DUP, expired meanwhile or not."""
    creds = seed_devices(daemon.db, "a", "b")
    port = daemon.start()
    sock, present = session5(port, "a", creds)
    with sock:
        assert not present
        sock.sendall(raw.packet(0x82, struct.pack("!H", 1) + b"\x00"
                                + raw.field("losant/a/cmd") + b"\x01"))
        suback = raw.read_packet(sock)
        assert suback is not None and suback.kind == SUBACK and suback.body[-1] == 1
        with Client5(port, "b", creds) as sender:
            assert sender.connect() == (0, False)
            sender.publish("losant/a/cmd", b"in flight", MessageExpiryInterval=1)
        sent = raw.read_packet(sock)  # not acknowledged
        assert sent is not None and sent.kind == PUBLISH and not sent.dup
        rows = flushed(daemon, "SELECT packet_id, expires FROM messages WHERE packet_id",
                       1, "the message in flight")
        assert rows[0][0] == sent.packet_id
        assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    wait_until(lambda: time.time() > rows[0][1], what="the message's expiry")

    port = daemon.start()
    sock, present = session5(port, "a", creds)
    with sock:
        assert present
        again = raw.read_packet(sock)
        assert again is not None and again.kind == PUBLISH
        assert (again.packet_id, again.dup) == (sent.packet_id, True)
        assert again.body.endswith(b"in flight")
        sock.sendall(raw.ack(PUBACK, again.packet_id))
    assert "messages: expired" not in daemon.log()


def test_mqtt5_session_expiry_survives_a_restart(daemon: DaemonProcess) -> None:
    """A session's own Session Expiry Interval is kept: one of 5 s is gone after a restart
    once 5 s have passed, one of an hour is back; and a restart under a lower server
    maximum (session_expiry) holds the hour-long one to it."""
    creds = seed_devices(daemon.db, "brief", "long")
    port = daemon.start()
    for device, expiry in (("brief", 5), ("long", 3600)):
        with Client5(port, device, creds, expiry=expiry) as client:
            assert client.connect() == (0, False)
            assert client.subscribe(f"losant/{device}/cmd", 1) == 1
    rows = flushed(daemon, "SELECT client_id, expiry FROM sessions WHERE disconnected_at "
                           "IS NOT NULL ORDER BY client_id", 2, "both sessions offline")
    assert rows == [("brief", 5.0), ("long", 3600.0)]
    assert daemon.stop() == 0
    ((gone_at,),) = saved(daemon, "SELECT disconnected_at + expiry FROM sessions "
                                  "WHERE client_id = 'brief'")
    wait_until(lambda: time.time() > gone_at, timeout=10, what="the brief session's expiry")

    port = daemon.start()
    assert "sessions: session_expired 1" in daemon.log()  # by the restore itself
    with Client5(port, "brief", creds) as client:  # (keeps no session of its own)
        assert client.connect() == (0, False)
    resumed_at = time.time()
    with Client5(port, "long", creds, expiry=3600) as client:
        assert client.connect() == (0, True)
    ((ended_at,),) = flushed(daemon, "SELECT disconnected_at FROM sessions WHERE "
                                     "client_id = 'long' AND disconnected_at > ?", 1,
                             "the long session offline again", resumed_at)
    assert daemon.stop() == 0

    lower = DaemonProcess(daemon.workdir, CONFIG + "[limits]\nsession_expiry = 1\n")
    try:
        wait_until(lambda: time.time() > ended_at + 1, what="the lower maximum")
        port = lower.start()
        assert "sessions: session_expired 1" in lower.log()
        with Client5(port, "long", creds, expiry=3600) as client:
            assert client.connect() == (0, False)
    finally:
        lower.kill()


def test_mqtt5_retained_messages_keep_their_properties(daemon: DaemonProcess) -> None:
    creds = seed_devices(daemon.db, "a", "watcher", topic_mode="all")
    port = daemon.start()
    with Client5(port, "a", creds) as device:
        assert device.connect() == (0, False)
        device.publish("cfg/v5", b"with properties", retain=True, MessageExpiryInterval=300,
                       UserProperty=[("unit", "C"), ("unit", "F")],
                       ContentType="application/json", PayloadFormatIndicator=1)
        device.publish("cfg/brief", b"expires", retain=True, MessageExpiryInterval=1)
    with Client(port, "a", *creds) as device3:
        assert device3.connect() == 0
        device3.publish("cfg/plain", b"3.1.1", qos=1, retain=True)
    assert daemon.stop() == 0
    ((brief_ends,),) = saved(daemon, "SELECT expires FROM retained WHERE topic = 'cfg/brief'")
    wait_until(lambda: time.time() > brief_ends, what="the brief message's expiry")

    port = daemon.start()
    with Client5(port, "watcher", creds) as watcher:
        assert watcher.connect() == (0, False)
        assert watcher.subscribe("cfg/#", 1) == 1
        got = watcher.received()
    assert sorted(got) == ["cfg/plain", "cfg/v5"]
    kept = got["cfg/v5"]
    assert kept.retain and kept.payload == b"with properties"
    assert prop(kept, "UserProperty") == [("unit", "C"), ("unit", "F")]
    assert prop(kept, "ContentType") == "application/json"
    assert prop(kept, "PayloadFormatIndicator") == 1
    assert 0 < prop(kept, "MessageExpiryInterval") < 300
    assert prop(got["cfg/plain"], "UserProperty") is None
    assert "retained: expired 1" in daemon.log()
