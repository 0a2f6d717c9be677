"""What a restored broker state is checked against at start (docs/persistence.md#start):
the keystore as it is now (keys revoked, applications deleted, devices removed while the
daemon was down), the limits in force and session expiry; and what the state file holds.
A real daemon on 127.0.0.1, stopped cleanly and started again on the same files, with the
keystore changed in between as another process would."""

from __future__ import annotations

import contextlib
import logging
import shutil
import sqlite3
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from broker.core.settings import Settings
from broker.topics.mounts import mount_of
from keystore import KeyStore
from keystore.sqlite.backup import backup as keystore_backup
from tests.daemon.test_persistence import seed_devices
from tests.support import mqtt_raw as raw
from tests.support.harness import Client, RunningBroker, StartDaemon, broker_settings, seed
from tests.support.waiting import wait_until
from tests.unit.test_state_sqlite import SCHEMA_1

SESSION_PRESENT, NO_SESSION = bytes([1, 0]), bytes([0, 0])


def hold_session(broker: RunningBroker, device: str, creds: tuple[str, str],
                 topic_filter: str, **publish: Any) -> None:
    """A persistent session of ``device`` subscribed to ``topic_filter``, left offline;
    ``publish`` (topic, payload) is sent by it before it goes."""
    with Client(broker.port(), device, *creds, clean_session=False) as client:
        assert client.connect() == 0
        assert client.subscribe(topic_filter, 1) == 1
        if publish:
            client.publish(publish["topic"], publish["payload"], qos=1, retain=True)


def connack(broker: RunningBroker, device: str, creds: tuple[str, str]) -> bytes:
    sock, packet = raw.session(broker.port(), device, *creds, clean=False)
    sock.close()
    return packet.body


def state_rows(settings: Settings, table: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(settings.db_path.with_name("keybroker.state.db")) as db:
        return db.execute(f"SELECT * FROM {table}").fetchall()  # noqa: S608 - test tables


def sessions_of_a_and_w(daemon_with: StartDaemon, settings: Settings) -> tuple[str, str]:
    """Devices "a" and "w", one unrestricted key (it covers any device of its application,
    so only the change feed or a look-up tells a restart that a device was removed), and a
    persistent session of each with a retained message on its state topic, left offline."""

    async def setup(ks: KeyStore) -> tuple[str, str]:
        for device in ("a", "w"):
            await ks.add_device(device)
        key, secret = await ks.create_key()
        return key.key, secret

    creds = seed(settings.db_path, setup)
    broker = daemon_with(settings)
    hold_session(broker, "a", creds, "losant/a/cmd", topic="losant/a/state", payload=b"a")
    hold_session(broker, "w", creds, "losant/w/cmd", topic="losant/w/state", payload=b"w")
    broker.stop()
    return creds


def assert_only_w_came_back(broker: RunningBroker, creds: tuple[str, str]) -> None:
    """w's session and retained message are back; a's retained message is not."""
    assert connack(broker, "w", creds) == SESSION_PRESENT
    with Client(broker.port(), "w", *creds) as watcher:
        assert watcher.connect() == 0
        assert watcher.subscribe("losant/+/state", 1) == 1
        assert watcher.topics_received() == ["losant/w/state"]


def test_keys_revoked_and_applications_deleted_while_down_drop_stored_sessions(
        tmp_path: Path, daemon_with: StartDaemon) -> None:
    settings = broker_settings(tmp_path)

    async def setup(ks: KeyStore) -> dict[str, tuple[str, str]]:
        await ks.create_app("other")
        for device in ("a", "b"):
            await ks.add_device(device)
        await ks.add_device("d", app="other")
        keys = {"a": await ks.create_key(device_ids=["a"]),
                "b": await ks.create_key(device_ids=["b"]),
                "any": await ks.create_key(device_ids=["a", "b"]),
                "d": await ks.create_key(device_ids=["d"], app="other")}
        return {name: (key.key, secret) for name, (key, secret) in keys.items()}

    creds = seed(settings.db_path, setup)
    broker = daemon_with(settings)
    hold_session(broker, "a", creds["a"], "losant/a/cmd")
    hold_session(broker, "b", creds["b"], "losant/b/cmd")
    hold_session(broker, "d", creds["d"], "losant/d/cmd",
                 topic="losant/d/state", payload=b"of a deleted application")
    broker.stop()
    assert {row[0] for row in state_rows(settings, "sessions")} == {"a", "b", "d"}

    async def while_down(ks: KeyStore) -> None:
        await ks.set_status([creds["a"][0]], "inactive")
        await ks.delete_apps(["other"])

    seed(settings.db_path, while_down)
    broker = daemon_with(settings)
    assert connack(broker, "b", creds["b"]) == SESSION_PRESENT  # untouched
    with Client(broker.port(), "a", *creds["a"], clean_session=False) as client:
        assert client.connect() == 5  # the revoked key itself is refused, as always
    assert connack(broker, "a", creds["any"]) == NO_SESSION  # nothing left to resume
    broker.stop()
    assert {row[0] for row in state_rows(settings, "sessions")} == {"a", "b"}
    assert state_rows(settings, "retained") == []


def test_a_device_removed_while_down_takes_its_session_and_retained_messages(
        tmp_path: Path, daemon_with: StartDaemon) -> None:
    """An unrestricted key covers any device of its application, so only the change feed
    can tell the restart that device "a" was removed (and then added again)."""
    settings = broker_settings(tmp_path)
    creds = sessions_of_a_and_w(daemon_with, settings)

    async def while_down(ks: KeyStore) -> None:
        await ks.remove_devices(["a"])
        await ks.add_device("a")  # a new device with the old id inherits nothing

    seed(settings.db_path, while_down)
    broker = daemon_with(settings)
    assert connack(broker, "a", creds) == NO_SESSION
    assert_only_w_came_back(broker, creds)
    broker.stop()


def test_a_restored_state_keeps_the_limits_in_force(
        tmp_path: Path, daemon_with: StartDaemon) -> None:
    settings = broker_settings(tmp_path)
    creds = seed_devices(settings.db_path, "p", "c", "watcher", topic_mode="all")
    broker = daemon_with(settings)
    hold_session(broker, "c", creds, "losant/c/cmd")
    with Client(broker.port(), "p", *creds) as publisher:
        assert publisher.connect() == 0
        for n in range(1, 5):
            publisher.publish(f"cfg/{n}", b"x", qos=1, retain=True)
        for n in range(1, 6):
            publisher.publish("losant/c/cmd", f"m{n}".encode(), qos=1)
    broker.stop()

    fewer = replace(settings, max_retained_per_key=2, max_queued_messages=3)
    broker = daemon_with(fewer)
    with Client(broker.port(), "watcher", *creds) as watcher:
        assert watcher.connect() == 0
        assert watcher.subscribe("cfg/#", 1) == 1
        assert sorted(watcher.topics_received()) == ["cfg/1", "cfg/2"]  # the oldest
    with Client(broker.port(), "c", *creds, clean_session=False) as device:
        assert device.connect() == 0
        got = [m.payload for m in iter(lambda: device.get(0.5), None)]
        assert got == [b"m1", b"m2", b"m3"]
    broker.stop()
    assert len(state_rows(settings, "retained")) == 2  # the rest is gone from the file too

    # Offline for longer than an expiry of 1 s: as if it had gone 2 s before it did.
    with sqlite3.connect(settings.db_path.with_name("keybroker.state.db")) as db:
        assert db.execute("UPDATE sessions SET disconnected_at = disconnected_at - 2 "
                          "WHERE client_id = 'c'").rowcount == 1
    broker = daemon_with(replace(settings, session_expiry=1))
    assert connack(broker, "c", creds) == NO_SESSION
    broker.stop()


def test_the_state_file_holds_no_secret(tmp_path: Path, daemon_with: StartDaemon) -> None:
    settings = broker_settings(tmp_path)

    async def setup(ks: KeyStore) -> list[tuple[str, str]]:
        for device in ("a", "b"):
            await ks.add_device(device)
        made = [await ks.create_key(device_ids=[device]) for device in ("a", "b")]
        return [(key.key, secret) for key, secret in made]

    creds = seed(settings.db_path, setup)
    broker = daemon_with(settings)
    hold_session(broker, "a", creds[0], "losant/a/cmd", topic="losant/a/state",
                 payload=b"state of a")
    with Client(broker.port(), "b", *creds[1], clean_session=False) as device:
        assert device.connect() == 0
        assert device.subscribe("losant/b/#", 2) == 2
        # Saved while it is connected (the next write-behind flush).
        wait_until(lambda: ("b", "losant/b/#", 2) in state_rows(settings, "subscriptions"))
        state = settings.db_path.with_name("keybroker.state.db")
        files = [state, *(Path(f"{state}{s}") for s in ("-wal", "-shm"))]
        assert all(f.stat().st_mode & 0o777 == 0o600 for f in files if f.exists())
    broker.stop()
    data = b"".join(f.read_bytes() for f in files if f.exists())
    assert b"state of a" in data and creds[0][0].encode() in data  # what it holds
    for _, secret in creds:
        assert secret.encode() not in data
    assert state.stat().st_mode & 0o777 == 0o600


def test_with_an_older_keystore_every_device_the_state_names_is_looked_up(
        tmp_path: Path, daemon_with: StartDaemon) -> None:
    """A keystore restored from a backup has a change feed behind the saved state's
    position, so the feed cannot tell what was removed: the start looks devices up."""
    settings = broker_settings(tmp_path)
    backup = tmp_path / "backup.db"

    async def setup(ks: KeyStore) -> tuple[str, str]:
        for device in ("w", "x"):
            await ks.add_device(device)
        key, secret = await ks.create_key()  # every device: only a lookup can tell
        await keystore_backup(settings.db_path, backup)  # it knows no device "late"
        await ks.add_device("late")
        await ks.request_kick("w")  # the feed moves past the backup's end
        return key.key, secret

    creds = seed(settings.db_path, setup)
    broker = daemon_with(settings)
    for device in ("late", "w"):
        hold_session(broker, device, creds, f"losant/{device}/cmd",
                     topic=f"losant/{device}/state", payload=device.encode())
    broker.stop()
    for suffix in ("-wal", "-shm"):
        Path(f"{settings.db_path}{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, settings.db_path)

    broker = daemon_with(settings)
    assert connack(broker, "w", creds) == SESSION_PRESENT
    with Client(broker.port(), "x", *creds) as watcher:
        assert watcher.connect() == 0
        assert watcher.subscribe("losant/+/state", 1) == 1
        assert watcher.topics_received() == ["losant/w/state"]
    broker.stop()
    assert {row[0] for row in state_rows(settings, "sessions")} == {"w"}


def test_a_device_removed_while_down_is_found_when_the_feed_was_pruned_meanwhile(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, daemon_with: StartDaemon) -> None:
    """Another process (authsvc, a second daemon) may prune the change feed while this
    daemon is down: the removal is then not in the feed, and every device the state names
    is looked up instead."""
    caplog.set_level(logging.INFO, logger="broker.daemon.restore")
    settings = broker_settings(tmp_path)
    creds = sessions_of_a_and_w(daemon_with, settings)

    async def while_down(ks: KeyStore) -> None:
        await ks.remove_devices(["a"])
        await ks.request_kick("nobody")  # a later change stays: the feed is not empty

    seed(settings.db_path, while_down)
    with sqlite3.connect(settings.db_path) as db:  # pruned up to (not including) the last
        assert db.execute("DELETE FROM changes WHERE id < (SELECT max(id) FROM changes)"
                          ).rowcount >= 1
    broker = daemon_with(settings)
    assert connack(broker, "a", creds) == bytes([0, 5])  # no such device now
    assert_only_w_came_back(broker, creds)
    broker.stop()
    restored = [r.getMessage() for r in caplog.records if "not restored" in r.getMessage()]
    assert "devices removed 1" in restored[-1] and "pruned" in caplog.text


def test_a_state_file_of_schema_1_is_migrated_and_its_rows_load(
        tmp_path: Path, daemon_with: StartDaemon) -> None:
    """Its rows come back as the MQTT 3.1.1 ones they are: the session (offline, with its
    subscription and its queued message), the retained message."""
    settings = broker_settings(tmp_path)

    async def setup(ks: KeyStore) -> tuple[str, str, str, int]:
        for device in ("a", "b"):
            await ks.add_device(device)
        key, secret = await ks.create_key(device_ids=["a", "b"])
        return key.key, secret, mount_of(key.app_id), await ks.latest_change_id()

    key, secret, mount, position = seed(settings.db_path, setup)
    creds = (key, secret)
    state = settings.db_path.with_name("keybroker.state.db")
    state.touch(0o600)
    with contextlib.closing(sqlite3.connect(state)) as db, db:
        db.executescript(SCHEMA_1)
        db.execute("UPDATE meta SET value = ? WHERE name = 'position'", (position,))
        db.execute("INSERT INTO retained VALUES (?, 'losant/a/state', x'6f6c64', 1, 'd:a')",
                   (mount,))
        db.execute("INSERT INTO sessions VALUES ('a', ?, ?, 'tcp', '127.0.0.1', '127.0.0.1', "
                   "?, '')", (mount, key, time.time() - 10))
        db.execute("INSERT INTO subscriptions VALUES ('a', 'losant/a/cmd', 1)")
        db.execute("INSERT INTO messages VALUES ('a', 1, 'losant/a/cmd', x'717565756564', "
                   "1, 0, 0, 0)")

    broker = daemon_with(settings)
    sock, packet = raw.session(broker.port(), "a", *creds, clean=False)
    with sock:
        assert packet.body == SESSION_PRESENT
        queued = raw.read_packet(sock)
        assert queued is not None
        assert (queued.topic, queued.payload, queued.qos) == ("losant/a/cmd", b"queued", 1)
        sock.sendall(raw.ack(4, queued.packet_id))
        with Client(broker.port(), "b", *creds) as other:
            assert other.connect() == 0
            other.publish("losant/a/cmd", b"live", qos=1)  # the subscription is back
            live = raw.read_packet(sock)
            assert live is not None and (live.topic, live.payload) == ("losant/a/cmd",
                                                                       b"live")
            sock.sendall(raw.ack(4, live.packet_id))
            assert other.subscribe("losant/a/state", 1) == 1
            message = other.get()
            assert message is not None and (message.payload, message.retain) == (b"old",
                                                                                 True)
    broker.stop()
    with contextlib.closing(sqlite3.connect(state)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (2,)
        assert db.execute("SELECT client_id, expiry FROM sessions").fetchall() == [("a", None)]
        assert db.execute("SELECT * FROM subscriptions").fetchall() == [("a", "losant/a/cmd", 1)]
        assert db.execute("SELECT topic, props, expires FROM retained").fetchall() == [
            ("losant/a/state", None, None)]


def test_shared_subscriptions_and_their_messages_come_back_in_their_groups(
        tmp_path: Path, daemon_with: StartDaemon) -> None:
    """A persistent session's $share/ subscription joins its group again at a restart, and
    a message queued for a member through the group stays the group's: when that member's
    session ends, it goes to another member."""
    settings = broker_settings(tmp_path)
    creds = seed_devices(settings.db_path, "a", "b", "p", topic_mode="all")
    broker = daemon_with(settings)
    hold_session(broker, "b", creds, "$share/g/jobs/#")
    with Client(broker.port(), "p", *creds) as publisher:  # b is the only member
        assert publisher.connect() == 0
        publisher.publish("jobs/1", b"job 1", qos=1)
    hold_session(broker, "a", creds, "$share/g/jobs/#")
    broker.stop()
    assert [row[0] for row in state_rows(settings, "messages")] == ["b"]

    broker = daemon_with(settings)
    with Client(broker.port(), "a", *creds, clean_session=False) as member:
        assert member.connect() == 0
        assert member.get(0.5) is None  # nothing was queued for a
        with Client(broker.port(), "b", *creds) as leaving:  # ends b's stored session
            assert leaving.connect() == 0
        handed = member.get()
        assert handed is not None and (handed.topic, handed.payload) == ("jobs/1",
                                                                         b"job 1")
        with Client(broker.port(), "p", *creds) as publisher:
            assert publisher.connect() == 0
            publisher.publish("jobs/2", b"job 2", qos=1)
        live = member.get()
        assert live is not None and live.payload == b"job 2"
    broker.stop()


def test_a_session_saved_online_with_a_session_expiry_of_0_is_not_restored(
        tmp_path: Path, daemon_with: StartDaemon) -> None:
    """An MQTT 5 client may resume its session asking for an expiry of 0: the session then
    ends with that connection. A crash while it was connected leaves it saved online with
    that expiry: it ended with the connection the crash cut."""
    settings = broker_settings(tmp_path)
    creds = seed_devices(settings.db_path, "a", "b")
    broker = daemon_with(settings)
    hold_session(broker, "a", creds, "losant/a/cmd")
    hold_session(broker, "b", creds, "losant/b/cmd")
    broker.stop()
    state = settings.db_path.with_name("keybroker.state.db")
    with contextlib.closing(sqlite3.connect(state)) as db, db:  # as the crash left them
        db.execute("UPDATE sessions SET disconnected_at = NULL, expiry = 0 "
                   "WHERE client_id = 'a'")
        db.execute("UPDATE sessions SET disconnected_at = NULL, expiry = 60 "
                   "WHERE client_id = 'b'")

    broker = daemon_with(settings)
    assert connack(broker, "a", creds) == NO_SESSION
    assert connack(broker, "b", creds) == SESSION_PRESENT
    broker.stop()
