"""`keybroker serve` as a newcomer meets it: the first-run demo is a round trip that works
as printed, and a port already in use is one line naming the listener."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.cli.serve import DEMO_PAYLOAD
from tests.support.services import require_binary
from tests.support.waiting import wait_until

TIMEOUT = 30.0


def keybroker(*args: str) -> list[str]:
    return [sys.executable, "-m", "broker.cli", *args]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}
    return {**env, "PYTHONUNBUFFERED": "1"}


def started(cwd: Path, *args: str) -> subprocess.Popen[str]:
    """`keybroker ARGS...` as a process in ``cwd``, its stdout and stderr in one pipe."""
    return subprocess.Popen(keybroker(*args), cwd=cwd, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def lines_until(proc: subprocess.Popen[str], marker: str) -> list[str]:
    """What the process printed up to the first line holding ``marker`` (TIMEOUT at most)."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and not any(marker in line for line in lines):
        lines.append(proc.stdout.readline())
        assert lines[-1] or proc.poll() is None, "".join(lines)
    return lines


def ran(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`keybroker ARGS...` run to its end in ``cwd``."""
    return subprocess.run(keybroker(*args), cwd=cwd, env=clean_env(), capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)


# --- the first-run demo ------------------------------------------------------------------


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[dict[str, str]]:
    """`serve --demo-if-empty` on an empty keystore: the printed commands by tool."""
    proc = started(tmp_path, "serve", "--demo-if-empty", "--host", "127.0.0.1", "--port", "0",
                   "--ws-port", "0", "--api-port", "0")
    try:
        lines = lines_until(proc, "mosquitto_pub")
        text = "".join(lines)
        assert "created devices 'demo-device' and 'demo-dashboard'" in text, text
        commands = {line.split()[0].rsplit("/", 1)[-1]: line.strip() for line in lines
                    if line.startswith("  ") and ("_sub " in line or "_pub " in line)}
        assert set(commands) == {"amqtt_sub", "amqtt_pub", "mosquitto_sub", "mosquitto_pub"}
        yield commands
    finally:
        proc.terminate()
        proc.wait(15)
        if proc.stdout is not None:
            proc.stdout.close()


def round_trip(subscriber: str, publisher: str, cwd: Path) -> str:
    """Run the subscriber as printed; run the publisher as printed until the subscriber
    prints something (it needs a moment to subscribe). Returns what it printed, on
    stdout and stderr both: what a terminal would show."""
    out = cwd / "sub.out"
    with out.open("w") as sink:
        sub = subprocess.Popen(subscriber, shell=True, cwd=cwd, stdout=sink,  # noqa: S602 - the printed command, run as a user would
                               stderr=subprocess.STDOUT, env=clean_env(), start_new_session=True)

        def published_and_printed() -> bool:
            """Run the publisher once; the subscriber may not have subscribed yet."""
            pub = subprocess.run(publisher, shell=True, cwd=cwd, capture_output=True,  # noqa: S602 - as above
                                 text=True, env=clean_env(), timeout=TIMEOUT, check=False)
            assert pub.returncode == 0, pub.stderr
            return DEMO_PAYLOAD in out.read_text()

        try:
            wait_until(published_and_printed, TIMEOUT, "the subscriber printed the message",
                       poll=0.25)
        finally:
            os.killpg(sub.pid, 15)  # the shell and the client it started
            sub.wait(15)
    return out.read_text()


def test_demo_round_trip_with_amqtt_clients_as_printed(demo: dict[str, str],
                                                       tmp_path: Path) -> None:
    assert "-i demo-dashboard" in demo["amqtt_sub"] and "-i demo-device" in demo["amqtt_pub"]
    received = round_trip(demo["amqtt_sub"], demo["amqtt_pub"], tmp_path)
    assert DEMO_PAYLOAD in received
    # Nothing but the messages, each on its own line: amqtt's INFO logging stays out.
    assert set(received.splitlines()) == {DEMO_PAYLOAD} and received.endswith("\n")


def test_demo_round_trip_with_mosquitto_clients_as_printed(demo: dict[str, str],
                                                           tmp_path: Path) -> None:
    for client in ("mosquitto_sub", "mosquitto_pub"):
        require_binary(client, "the demo's mosquitto commands (apt-get install mosquitto-clients)")
    received = round_trip(demo["mosquitto_sub"], demo["mosquitto_pub"], tmp_path)
    assert f"losant/demo-device/state {DEMO_PAYLOAD}" in received


# --- a port already in use -----------------------------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port this test holds, on every interface (as a local mosquitto would)."""
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))  # noqa: S104 - the situation under test
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize("listener", ["tcp", "ws"])
def test_a_busy_port_is_one_line_naming_the_listener(
    tmp_path: Path, busy_port: int, listener: str
) -> None:
    ports = {"tcp": "0", "ws": "0", listener: str(busy_port)}
    proc = subprocess.run(
        keybroker("--db", str(tmp_path / "k.db"), "serve", "--port", ports["tcp"],
                  "--ws-port", ports["ws"], "--api-port", "0"),
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode != 0
    # The start-up log may precede it; the failure itself is one line, no traceback.
    assert proc.stderr.strip().splitlines()[-1] == (
        f"Error: listener {listener!r} cannot bind 0.0.0.0:{busy_port}: address already in use")
    assert "Traceback" not in proc.stderr and "ERROR" not in proc.stderr
    assert proc.stdout == ""


def test_a_busy_ipv4_port_stops_a_dual_stack_listener(tmp_path: Path, busy_port: int) -> None:
    proc = subprocess.run(
        keybroker("--db", str(tmp_path / "k.db"), "serve", "--host", "::", "--port",
                  str(busy_port), "--ws-port", "0", "--api-port", "0"),
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        f"Error: listener 'tcp' cannot bind [::]:{busy_port}: address already in use")
    assert "Traceback" not in proc.stderr


def connack(host: str, port: int, key: str, secret: str) -> int | None:
    """CONNACK code for demo-device connecting to host:port (paho reports v5 codes: 0 = ok)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-device",
                         protocol=mqtt.MQTTv311)
    client.username_pw_set(key, secret)
    codes: list[int] = []
    client.on_connect = lambda _c, _u, _f, reason, _p: codes.append(reason.value)
    client.connect(host, port, 15)
    end = time.monotonic() + 5
    while not codes and time.monotonic() < end:
        client.loop(0.1)
    client.disconnect()
    return codes[0] if codes else None


def free_dual_stack_port() -> int:
    with socket.socket(socket.AF_INET6) as probe:
        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        probe.bind(("::", 0))
        return int(probe.getsockname()[1])


def test_host_ipv6_any_accepts_ipv4_and_ipv6_clients(tmp_path: Path) -> None:
    port = free_dual_stack_port()  # a fixed port: what a deployment uses
    proc = subprocess.Popen(
        keybroker("serve", "--demo-if-empty", "--host", "::", "--port", str(port),
                  "--ws-port", "0", "--api-port", "0"),
        cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and not any("secret:" in x for x in lines):
            lines.append(proc.stdout.readline())
        text = "".join(lines)
        assert f"tcp=mqtt://[::]:{port}" in text
        key, secret = text.split("key:")[1].split()[0], text.split("secret:")[1].split()[0]
        assert connack("127.0.0.1", port, key, secret) == 0
        assert connack("::1", port, key, secret) == 0
    finally:
        proc.terminate()
        proc.wait(15)
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_busy_api_port_is_one_line_naming_the_api(tmp_path: Path, busy_port: int) -> None:
    proc = subprocess.run(
        keybroker("--db", str(tmp_path / "k.db"), "serve", "--port", "0", "--ws-port", "0",
                  "--api-port", str(busy_port)),
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        f"Error: API listener cannot bind 127.0.0.1:{busy_port}: address already in use")
    assert "Traceback" not in proc.stderr


def test_no_api_serves_mqtt_only(tmp_path: Path, busy_port: int) -> None:
    proc = subprocess.Popen(
        keybroker("--db", str(tmp_path / "k.db"), "serve", "--host", "127.0.0.1", "--port",
                  "0", "--ws-port", "0", "--no-api", "--api-port", str(busy_port)),
        cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = ""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and "keybroker listening:" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "daemon exited"
        assert "tcp=mqtt://127.0.0.1:" in line and "api=" not in line
    finally:
        proc.terminate()
        proc.wait(15)
        if proc.stdout is not None:
            proc.stdout.close()


# --- a keystore that was not there ----------------------------------------------------------


def test_a_new_keystore_is_announced_and_the_start_up_line_has_absolute_paths(
    tmp_path: Path,
) -> None:
    proc = started(tmp_path, "--db", "typo/k.db", "serve", "--host", "127.0.0.1", "--port",
                   "0", "--ws-port", "0", "--api-port", "0")
    try:
        lines = lines_until(proc, "keybroker listening")
    finally:
        proc.terminate()
        rest, _ = proc.communicate(timeout=15)  # what it logged up to its exit
    warnings = [x for x in lines + rest.splitlines() if " WARNING " in x]
    assert len(warnings) == 1, lines
    assert f"created a new empty keystore at {tmp_path / 'typo' / 'k.db'}:" in warnings[0]
    assert (tmp_path / "typo" / "k.db").exists()  # a start that worked keeps it
    # The start-up line names both files by their absolute paths, though --db was relative.
    assert (f"(keystore {tmp_path / 'typo' / 'k.db'}, state {tmp_path / 'typo' / 'k.state.db'},"
            in lines[-1]), lines[-1]


def test_a_start_that_cannot_bind_leaves_no_new_keystore_behind(
    tmp_path: Path, busy_port: int
) -> None:
    args = ("serve", "--port", str(busy_port), "--ws-port", "0", "--api-port", "0")
    proc = ran(tmp_path, "--db", "typo/k.db", *args)
    assert proc.returncode != 0 and "address already in use" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no keystore, state file, sidecar or folder
    assert "created a new empty keystore" not in proc.stderr

    # A keystore that was there stays, whatever the start does.
    kept = tmp_path / "kept.db"
    made = ran(tmp_path, "--db", str(kept), "devices", "add", "d1")
    assert made.returncode == 0, made.stderr
    proc = ran(tmp_path, "--db", str(kept), *args)
    assert proc.returncode != 0 and "address already in use" in proc.stderr
    assert "d1" in ran(tmp_path, "--db", str(kept), "devices", "list").stdout


def test_serve_on_a_file_that_is_not_a_keystore_changes_nothing(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a keystore\n")
    notes.chmod(0o644)
    proc = ran(tmp_path, "--db", str(notes), "serve", "--port", "0", "--ws-port", "0",
               "--api-port", "0")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        f"Error: '{notes}' is not a keybroker keystore: not an SQLite database")
    assert notes.read_text() == "not a keystore\n" and notes.stat().st_mode & 0o777 == 0o644
    assert sorted(item.name for item in tmp_path.iterdir()) == ["notes.txt"]
