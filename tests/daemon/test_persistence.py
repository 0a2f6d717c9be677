"""Durable broker state with a real `keybroker serve` process stopped as an operator
(SIGTERM) or a crash (SIGKILL) would stop it, and started again on the same files:
retained messages, persistent sessions with their subscriptions and queued messages,
unacknowledged deliveries and incoming QoS 2 ids come back (docs/persistence.md). Raw
sockets where packet ids, DUP flags and CONNACK's session-present bit are checked."""

from __future__ import annotations

import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keystore import KeyStore
from tests.support import mqtt_raw as raw
from tests.support.harness import Client, seed
from tests.support.process import DaemonProcess

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
    time.sleep(5 * FLUSH)  # a crash loses at most the last flush interval
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
    time.sleep(0.3)
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
        time.sleep(5 * FLUSH)
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
