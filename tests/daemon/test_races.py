"""Races and flow-control abuse, each reproduced against a real daemon: racing CONNECTs
with one client id, a kick while the session's loop is busy, a take-over of a persistent
session, and unacknowledged QoS 2 floods."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

from broker.mqtt.session import KeySession
from tests.support import mqtt_raw as raw
from tests.support.harness import RunningBroker, StartDaemon, revocation_bound
from tests.support.waiting import wait_until

ACCEPTED = bytes([0x20, 2, 0, 0])


def connect_raw(broker: RunningBroker, device: str, key: str, secret: str,
                clean: bool = True) -> socket.socket:
    sock = raw.open_socket(broker.port())
    packet = raw.connect(device, key, secret)
    if not clean:  # clear the clean-session flag (bit 1 of the connect flags byte)
        packet = packet[:9] + bytes([packet[9] & ~0x02]) + packet[10:]
    sock.sendall(packet)
    return sock


def watcher(broker: RunningBroker, topic: str) -> socket.socket:
    broker.ks("add_device", "watcher")
    key, secret = broker.ks("create_key")
    sock = connect_raw(broker, "watcher", key.key, secret)
    assert sock.recv(4) == ACCEPTED
    sock.sendall(raw.subscribe(topic))
    assert sock.recv(5)[0] == 0x90
    return sock


def receives(sock: socket.socket, within: float) -> bytes:
    sock.settimeout(within)
    try:
        return sock.recv(200)
    except TimeoutError:
        return b""


def test_racing_connects_with_one_client_id_leave_no_unrevocable_connection(
    broker: RunningBroker,
) -> None:
    broker.ks("add_device", "dev-a")
    key, secret = broker.ks("create_key", device_ids=["dev-a"])
    first = connect_raw(broker, "dev-a", key.key, secret)
    assert first.recv(4) == ACCEPTED
    x = raw.open_socket(broker.port())
    y = raw.open_socket(broker.port())
    packet = raw.connect("dev-a", key.key, secret)
    x.sendall(packet)
    y.sendall(packet)  # both at once
    x.recv(4)
    y.recv(4)
    # The connections taken over have ended (one open connection is left), and their end
    # did not take the session from the one that won.
    wait_until(lambda: len(broker.broker.admission.connections) == 1)
    assert len(broker.broker.sessions) == 1 and broker.broker.sessions["dev-a"].online
    watch = watcher(broker, "losant/dev-a/#")
    broker.ks("set_status", [key.key], "inactive")
    with first, x, y, watch:
        for sock in (first, x, y):
            assert raw.closed_by_peer(sock, within=3)
            try:
                sock.sendall(raw.publish("losant/dev-a/state", b"after-revocation"))
            except OSError:
                pass
        assert receives(watch, 1.0) == b""


def test_kick_works_while_the_client_withholds_pubacks(broker: RunningBroker) -> None:
    """Retained QoS 1 messages the client never acknowledges used to be awaited inside the
    session's message loop, so a kick (and revocation) did nothing for seconds."""
    broker.ks("add_device", "dev-a")
    key, secret = broker.ks("create_key", device_ids=["dev-a"])
    sock = connect_raw(broker, "dev-a", key.key, secret)
    assert sock.recv(4) == ACCEPTED
    for i in range(4):  # retained QoS 1 messages on its own topics
        body = raw.field(f"losant/dev-a/r{i}") + struct.pack("!H", 100 + i) + b"v"
        sock.sendall(raw.packet(0x33, body))
    wait_until(lambda: len(broker.broker.router.retained) == 4)
    filters = b"".join(raw.field(f"losant/dev-a/r{i}") + b"\x01" for i in range(4))
    sock.sendall(raw.packet(0x82, struct.pack("!H", 1) + filters))  # and never PUBACK
    session = broker.broker.sessions["dev-a"]
    wait_until(lambda: len(session.outbox.inflight) == 4)  # sent, and unacknowledged
    watch = watcher(broker, "losant/dev-a/live")
    broker.ks("set_status", [key.key], "inactive")
    with sock, watch:
        # Within the bound of any revocation: the withheld PUBACKs do not hold it up.
        assert raw.closed_by_peer(sock, within=revocation_bound(broker.settings))
        try:
            sock.sendall(raw.publish("losant/dev-a/live", b"after-revocation"))
        except OSError:
            pass
        assert receives(watch, 1.0) == b""


def test_taking_over_a_persistent_session_keeps_it_connected_and_revocable(
    broker: RunningBroker,
) -> None:
    broker.ks("add_device", "dev-a")
    key, secret = broker.ks("create_key", device_ids=["dev-a"])
    old = connect_raw(broker, "dev-a", key.key, secret, clean=False)
    assert old.recv(4) == ACCEPTED
    new = connect_raw(broker, "dev-a", key.key, secret, clean=False)
    assert new.recv(4) == bytes([0x20, 2, 1, 0])  # session present
    with old, new:
        assert raw.closed_by_peer(old, within=3)
        # The old connection has ended, and did not take the session offline under the new.
        wait_until(lambda: len(broker.broker.admission.connections) == 1)
        assert broker.broker.sessions["dev-a"].online
        broker.ks("set_status", [key.key], "inactive")
        assert raw.closed_by_peer(new, within=3)


def test_unacknowledged_qos2_flood_is_disconnected(broker: RunningBroker) -> None:
    broker.ks("add_device", "dev-a")
    key, secret = broker.ks("create_key", device_ids=["dev-a"])
    limit = broker.settings.max_queued_messages
    sock = connect_raw(broker, "dev-a", key.key, secret)
    assert sock.recv(4) == ACCEPTED
    closed = False
    with sock:
        for packet_id in range(1, limit + 50):  # QoS 2 PUBLISH, never a PUBREL
            body = raw.field("losant/dev-a/q2") + struct.pack("!H", packet_id) + b"x" * 100
            try:
                sock.sendall(raw.packet(0x34, body))
            except OSError:
                closed = True
                break
        assert closed or raw.closed_by_peer(sock, within=5)
    broker.wait_audited("bad_packet", "unacknowledged")


def test_revocation_landing_during_a_connect_still_disconnects(broker: RunningBroker) -> None:
    """The key is read as active, then deactivated (and the change applied) before the
    session is registered: the new session is checked again and disconnected."""
    broker.ks("add_device", "dev-a")
    key, secret = broker.ks("create_key", device_ids=["dev-a"])
    keystore = broker.server.keystore
    real = keystore.connect_lookup

    looked_up = asyncio.Event()
    applied = asyncio.Event()

    async def slow_lookup(*args: object) -> object:
        found = await real(*args)
        looked_up.set()
        await applied.wait()  # the window: a take-over wait, a cache miss ...
        return found

    keystore.connect_lookup = slow_lookup
    try:
        sock = connect_raw(broker, "dev-a", key.key, secret)
        broker.call(looked_up.wait)  # the key was read as active
        broker.ks("set_status", [key.key], "inactive")
        # The change watcher applied the change while the CONNECT waits in the window.
        latest = broker.ks("latest_change_id")
        watcher = broker.server.watcher
        assert watcher is not None
        wait_until(lambda: watcher.applied_change_id >= latest)
        broker.loop.call_soon_threadsafe(applied.set)
        with sock:
            assert sock.recv(4) == ACCEPTED
            assert raw.closed_by_peer(sock, within=revocation_bound(broker.settings))
    finally:
        keystore.connect_lookup = real


def left_offline(broker: RunningBroker) -> KeySession:
    """dev-a's persistent session, subscribed, kept after its connection ended."""
    broker.ks("add_device", "dev-a")
    key, secret = broker.ks("create_key", device_ids=["dev-a"])
    with connect_raw(broker, "dev-a", key.key, secret, clean=False) as sock:
        assert sock.recv(4) == ACCEPTED
        sock.sendall(raw.subscribe("losant/dev-a/command", qos=1))
        assert sock.recv(5)[0] == 0x90
    return wait_until(lambda: broker.offline("dev-a") and broker.broker.sessions["dev-a"])


def test_disconnected_persistent_sessions_expire(daemon_with: StartDaemon) -> None:
    daemon = daemon_with(session_expiry=1)
    session = left_offline(daemon)
    expiry = daemon.settings.session_expiry
    wait_until(lambda: "dev-a" not in daemon.broker.sessions, 5 * (expiry + 1))
    # Kept while within its expiry: it went no earlier than that after it went offline.
    assert session.disconnected_at is not None
    assert time.time() - session.disconnected_at >= expiry
    assert len(daemon.broker.router.subtree) == 0


def test_deleting_a_device_drops_its_offline_session(broker: RunningBroker) -> None:
    left_offline(broker)
    broker.ks("remove_devices", ["dev-a"])
    wait_until(lambda: "dev-a" not in broker.broker.sessions, revocation_bound(broker.settings))
