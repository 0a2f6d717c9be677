"""Live changes (docs/live-changes.md), brute-force guard, audit of kicks and bans, connection
status — against a real daemon, with changes made in-process and by the CLI in another
process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest

from broker.policy.guard import GuardSettings
from keystore.errors import UnavailableError
from tests.support.harness import Client, RunningBroker, StartDaemon, revocation_bound
from tests.support.waiting import wait_until


@pytest.fixture
def broker(broker_on_each_backend: RunningBroker) -> RunningBroker:
    """The daemon on an SQLite file, then on a PostgreSQL database."""
    return broker_on_each_backend


def connected_client(broker: RunningBroker, device: str, **options: object) -> tuple[Client, str]:
    key, secret = broker.ks("create_key", device_ids=[device], **options)
    client = Client(broker.port(), device, key.key, secret)
    assert client.connect() == 0
    return client, secret


def cli(broker: RunningBroker, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `keybroker` CLI in another process, against the daemon's keystore."""
    env = {**os.environ, "KEYBROKER_DB": broker.settings.keystore_target}
    return subprocess.run([sys.executable, "-m", "broker.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def assert_kicked(broker: RunningBroker, client: Client) -> None:
    """The change just made disconnects ``client`` within the promised bound."""
    assert client.disconnected.wait(revocation_bound(broker.settings)), \
        "session was not disconnected"


def test_deactivating_a_key_disconnects_its_sessions_and_refuses_reconnect(
    broker: RunningBroker,
) -> None:
    broker.ks("add_device", "dev-a")
    client, secret = connected_client(broker, "dev-a")
    key = client.client.username
    with client:
        broker.ks("set_status", [key], "inactive")
        assert_kicked(broker, client)
    with Client(broker.port(), "dev-a", key, secret) as again:
        assert again.connect() == 5
    kicks = [e for e in broker.audit_events() if e["event"] == "kick"]
    assert kicks and kicks[0]["reason"] == "key_inactive" and kicks[0]["key"] == key


def test_cli_in_another_process_revokes_a_live_session(broker: RunningBroker) -> None:
    broker.ks("add_device", "dev-a")
    broker.ks("add_device", "dev-b")
    victim, _ = connected_client(broker, "dev-a")
    bystander, _ = connected_client(broker, "dev-b")
    with victim, bystander:
        result = cli(broker, "keys", "delete", victim.client.username, "--yes")
        assert result.returncode == 0, result.stderr
        assert_kicked(broker, victim)
        assert not bystander.disconnected.is_set()  # other keys' sessions untouched


def test_cli_deactivate_in_another_process(broker: RunningBroker) -> None:
    broker.ks("add_device", "dev-a")
    client, _ = connected_client(broker, "dev-a")
    with client:
        result = cli(broker, "keys", "deactivate", client.client.username)
        assert result.returncode == 0, result.stderr
        assert_kicked(broker, client)


def test_key_expiring_while_connected_is_disconnected(broker: RunningBroker) -> None:
    broker.ks("add_device", "dev-a")
    expires = datetime.now(UTC) + timedelta(seconds=1.5)
    client, secret = connected_client(broker, "dev-a", expires_at=expires)
    with client:
        assert not client.disconnected.wait(1.0)  # time under test: not before it expires
        assert_kicked(broker, client)
        assert datetime.now(UTC) >= expires
    with Client(broker.port(), "dev-a", client.client.username, secret) as again:
        assert again.connect() == 5


def test_moving_expiry_earlier_disconnects_and_later_keeps(broker: RunningBroker) -> None:
    broker.ks("add_device", "dev-a")
    broker.ks("add_device", "dev-b")
    far = datetime.now(UTC) + timedelta(days=1)
    short, _ = connected_client(broker, "dev-a", expires_at=far)
    kept, _ = connected_client(broker, "dev-b", expires_at=datetime.now(UTC) + timedelta(seconds=1))
    with short, kept:
        broker.ks("update_key", kept.client.username, expires_at=far)
        broker.ks("update_key", short.client.username,
                  expires_at=datetime.now(UTC) - timedelta(seconds=1))
        assert_kicked(broker, short)
        assert not kept.disconnected.wait(1.5)  # its old 1 s expiry no longer applies


def test_removing_a_device_disconnects_it(broker: RunningBroker) -> None:
    broker.ks("add_device", "dev-a")
    client, _ = connected_client(broker, "dev-a")
    with client:
        broker.ks("remove_devices", ["dev-a"])
        assert_kicked(broker, client)


def test_tag_change_does_not_disconnect(broker: RunningBroker) -> None:
    broker.ks("add_device", "dev-a", tags=[("site", "north")])
    key, secret = broker.ks("create_key", device_tags=[("site", "north")])
    with Client(broker.port(), "dev-a", key.key, secret) as client:
        assert client.connect() == 0
        broker.ks("untag_device", "dev-a", ["site"])
        assert not client.disconnected.wait(1.0)


def test_operator_kick_from_the_cli_suppresses_the_will(broker: RunningBroker) -> None:
    broker.ks("add_device", "dev-a")
    broker.ks("add_device", "dev-w")
    watcher_key, watcher_secret = broker.ks("create_key", device_ids=["dev-a", "dev-w"])
    with Client(broker.port(), "dev-w", watcher_key.key, watcher_secret) as watcher:
        assert watcher.connect() == 0
        assert watcher.subscribe("losant/dev-a/state") == 0
        key, secret = broker.ks("create_key", device_ids=["dev-a"])
        with Client(broker.port(), "dev-a", key.key, secret).will(
                "losant/dev-a/state", b"will") as device:
            assert device.connect() == 0
            result = cli(broker, "devices", "kick", "dev-a")
            assert result.returncode == 0, result.stderr
            assert_kicked(broker, device)
        assert watcher.get(0.7) is None
    assert cli(broker, "devices", "kick", "no-such-device").returncode != 0


def test_brute_force_guard_bans_then_lifts(daemon_with: StartDaemon) -> None:
    guard = GuardSettings(max_failures=3, window=30, ban=1.5, max_ban=10)
    daemon = daemon_with(guard=guard)
    daemon.ks("add_device", "dev-a")
    key, secret = daemon.ks("create_key", device_ids=["dev-a"])
    for _ in range(3):
        with Client(daemon.port(), "dev-a", key.key, "wrong") as client:
            assert client.connect() == 4
    # Banned: even the right secret is refused, with 5, before any secret check.
    with Client(daemon.port(), "dev-a", key.key, secret) as client:
        assert client.connect() == 5
    assert any(e["client_ip"] == "127.0.0.1" for e in daemon.audited("ban"))
    # Refusals during a ban are one line when it ends (the once-a-second housekeeping),
    # with their count; then the right secret gets in again.
    daemon.wait_audited("ban_ended", timeout=guard.ban + 5)
    with Client(daemon.port(), "dev-a", key.key, secret) as client:
        assert client.connect() == 0
    events = daemon.audit_events()
    assert not any(e["event"] == "connect_refused" and e["reason"] == "banned"
                   for e in events)
    assert [e["reason"] for e in events if e["event"] == "ban_ended"] == [
        "1 CONNECTs refused during the ban"]


def test_status_fields_follow_the_connection(broker: RunningBroker) -> None:
    broker.ks("add_device", "dev-a")
    before = broker.ks("get_device", "dev-a")
    assert before.connected is False and before.last_seen is None
    client, _ = connected_client(broker, "dev-a")
    key = client.client.username
    with client:
        device = wait_until(lambda: (d := broker.ks("get_device", "dev-a")).connected and d,
                            what="the status recorder's flush")
        assert device.last_seen is not None
        assert broker.ks("get_key", key).last_used is not None
        used = broker.ks("list_keys", {"lastUsed": {"$gte": "2000-01-01T00:00:00Z"}})
        assert [k.key for k in used] == [key]
    wait_until(lambda: broker.ks("get_device", "dev-a").connected is False)
    shown = cli(broker, "devices", "show", "dev-a", "--json")
    assert '"connected": false' in shown.stdout and '"lastSeen": "20' in shown.stdout


def test_audit_never_contains_a_secret_even_for_wrong_attempts(broker: RunningBroker) -> None:
    broker.ks("add_device", "dev-a")
    client, secret = connected_client(broker, "dev-a")
    with client:
        with Client(broker.port(), "dev-a", client.client.username, secret + "x") as bad:
            assert bad.connect() == 4
        broker.ks("set_status", [client.client.username], "inactive")
        assert_kicked(broker, client)
    text = broker.settings.audit_path.read_text()  # type: ignore[union-attr]
    assert secret not in text
    assert '"event":"kick"' in text and '"event":"connect_refused"' in text


def test_publish_rate_limit_disconnects_a_flooding_client(daemon_with: StartDaemon) -> None:
    daemon = daemon_with(max_publish_rate=20.0)
    daemon.ks("add_device", "dev-a")
    daemon.ks("add_device", "dev-b")
    calm, _ = connected_client(daemon, "dev-b")
    flood, _ = connected_client(daemon, "dev-a")
    with calm, flood:
        for _ in range(10):  # within the rate: fine
            calm.publish("losant/dev-b/state", b"ok")
            time.sleep(0.06)  # time under test: a rate under the limit of 20 a second
        for _ in range(200):  # far above 20/s
            flood.publish("losant/dev-a/state", b"x")
        assert flood.disconnected.wait(3)
        assert not calm.disconnected.is_set()
    assert any(e["reason"] == "rate_limited" and e["client_id"] == "dev-a"
               for e in daemon.audited("publish_denied"))


def test_audit_log_is_reopened_after_rotation(broker: RunningBroker) -> None:
    path = broker.settings.audit_path
    assert path is not None
    broker.ks("add_device", "dev-a")
    key, secret = broker.ks("create_key", device_ids=["dev-a"])
    with Client(broker.port(), "dev-a", key.key, "wrong") as client:
        assert client.connect() == 4
    rotated = path.with_name(path.name + ".1")
    path.rename(rotated)  # what logrotate does (without copytruncate)
    with Client(broker.port(), "dev-a", key.key, secret) as client:
        assert client.connect() == 0
    wait_until(lambda: path.exists() and '"connect_ok"' in path.read_text())
    assert '"connect_refused"' in rotated.read_text()
    fresh = path.read_text()
    assert '"connect_ok"' in fresh and '"connect_refused"' not in fresh
    assert path.stat().st_mode & 0o777 == 0o600


def test_expiry_heap_stays_bounded_when_devices_reconnect(broker: RunningBroker) -> None:
    broker.ks("add_device", "dev-a")
    key, secret = broker.ks("create_key", device_ids=["dev-a"],
                            expires_at=datetime.now(UTC) + timedelta(days=365))
    registry = broker.broker.registry
    registry.compact_slack = 10
    for _ in range(40):
        with Client(broker.port(), "dev-a", key.key, secret) as client:
            assert client.connect() == 0
    # One entry per CONNECT is added and removed lazily; compaction (by the once-a-second
    # key expiry) keeps the heap within 2 x live sessions + slack instead of growing with
    # every reconnect.
    wait_until(lambda: len(registry._expiries) <= 2 * len(broker.broker.sessions) + 10 + 1,
               what="the expiry heap compacted")


def test_a_revocation_read_while_the_keystore_fails_is_applied_when_it_answers(
        broker: RunningBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    """The feed position moves only once a change is applied: a key deactivated while the
    keystore fails to answer the watcher's re-read still kicks its session (next tick)."""
    broker.ks("add_device", "dev-f")
    client, _ = connected_client(broker, "dev-f")
    key = client.client.username
    watcher = broker.server.watcher
    assert watcher is not None
    real = watcher.keystore.keys_by_id
    failed: list[object] = []

    async def away_once(ids: object) -> object:
        if not failed:
            failed.append(ids)
            raise UnavailableError("keystore away (test)")
        return await real(ids)  # type: ignore[arg-type]

    monkeypatch.setattr(watcher.keystore, "keys_by_id", away_once)
    with client:
        broker.ks("set_status", [key], "inactive")
        assert_kicked(broker, client)
    assert failed
