"""Listeners and client IP (docs/access.md#client-ip): WebSocket with X-Forwarded-For from
trusted proxies only, TLS and secure WebSocket, a Losant-style device flow end to end,
`serve` as a process."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.core.settings import Listener
from tests.support import mqtt_raw as raw
from tests.support.harness import Client, RunningBroker, StartDaemon
from tests.support.tls import server_certificate

REPO = Path(__file__).resolve().parents[2]


def ws_client(broker: RunningBroker, device: str, key: str, secret: str,
              forwarded: str | None) -> Client:
    headers = {"X-Forwarded-For": forwarded} if forwarded else None
    return Client(broker.port("ws"), device, key, secret, transport="websockets",
                  headers=headers)


def test_websocket_listener_accepts_a_valid_key(broker: RunningBroker) -> None:
    broker.ks("add_device", "dev-a")
    key, secret = broker.ks("create_key", device_ids=["dev-a"])
    with ws_client(broker, "dev-a", key.key, secret, None) as client:
        assert client.connect() == 0
        assert client.subscribe("losant/dev-a/command") == 0
        client.publish("losant/dev-a/command", b"over-ws")
        msg = client.get()
        assert msg is not None and msg.payload == b"over-ws"


def test_forwarded_for_from_trusted_proxy_is_the_client_ip(broker: RunningBroker) -> None:
    broker.ks("add_device", "dev-a")
    key, secret = broker.ks("create_key", device_ids=["dev-a"], address_mode="only",
                            addresses=["203.0.113.0/24"])
    with ws_client(broker, "dev-a", key.key, secret, "203.0.113.9") as client:
        assert client.connect() == 0
    # right-most untrusted hop wins: a spoofed left-most entry does not help
    with ws_client(broker, "dev-a", key.key, secret, "203.0.113.9, 198.51.100.7") as client:
        assert client.connect() == 5
    # trusted hops (loopback) on the right are skipped
    with ws_client(broker, "dev-a", key.key, secret, "203.0.113.9, 127.0.0.1") as client:
        assert client.connect() == 0
    ok = [e for e in broker.audit_events() if e["event"] == "connect_ok"]
    assert ok[0]["client_ip"] == "203.0.113.9" and ok[0]["peer_ip"] == "127.0.0.1"
    assert ok[0]["listener"] == "ws"


def test_forwarded_for_from_untrusted_peer_is_ignored(daemon_with: StartDaemon) -> None:
    daemon = daemon_with(trusted_proxies=("10.0.0.0/8",))
    daemon.ks("add_device", "dev-a")
    spoofable, secret = daemon.ks("create_key", device_ids=["dev-a"], address_mode="only",
                                  addresses=["203.0.113.0/24"])
    with ws_client(daemon, "dev-a", spoofable.key, secret, "203.0.113.9") as client:
        assert client.connect() == 5  # the header cannot buy an allowed address
    denied, secret2 = daemon.ks("create_key", device_ids=["dev-a"], address_mode="except",
                                addresses=["127.0.0.0/8"])
    with ws_client(daemon, "dev-a", denied.key, secret2, "203.0.113.9") as client:
        assert client.connect() == 5  # ... nor hide a denied one


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1 (trustme)."""
    return server_certificate(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize("protocol", [4, 5], ids=["mqtt3.1.1", "mqtt5"])
@pytest.mark.parametrize(("kind", "transport"), [("tcp", "tcp"), ("ws", "websockets")])
def test_tls_listeners(daemon_with: StartDaemon, certificate: tuple[str, str, str], kind: str,
                       transport: str, protocol: int) -> None:
    ca, cert, keyfile = certificate
    listener = Listener(name="secure", type=kind, host="127.0.0.1", port=0, certfile=cert,
                        keyfile=keyfile)
    daemon = daemon_with(listeners=(listener,))
    daemon.ks("add_device", "dev-a")
    key, secret = daemon.ks("create_key", device_ids=["dev-a"])
    client = Client(daemon.port("secure"), "dev-a", key.key, secret, transport=transport,
                    protocol=protocol)
    client.client.tls_set(ca_certs=ca, cert_reqs=ssl.CERT_REQUIRED)
    with client:
        assert client.connect() == 0
        assert client.subscribe("losant/dev-a/command") == 0
        client.publish("losant/dev-a/command", b"tls")
        msg = client.get()
        assert msg is not None and msg.payload == b"tls"


def test_a_proxy_header_and_the_tls_client_hello_in_one_segment(
        daemon_with: StartDaemon, certificate: tuple[str, str, str]) -> None:
    """A load balancer's PROXY header and the client's TLS ClientHello arrive together: the
    header is read to its last byte, and the TLS handshake starts with the next one."""
    ca, cert, keyfile = certificate
    listener = Listener(name="secure", type="tcp", host="127.0.0.1", port=0, certfile=cert,
                        keyfile=keyfile, proxy_protocol=True)
    daemon = daemon_with(listeners=(listener,), trusted_proxies=("127.0.0.0/8",))
    daemon.ks("add_device", "dev-a")
    key, secret = daemon.ks("create_key", device_ids=["dev-a"], address_mode="only",
                            addresses=["203.0.113.0/24"])  # only through the header's address
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context(cafile=ca).wrap_bio(incoming, outgoing,
                                                         server_hostname="127.0.0.1")
    with raw.open_socket(daemon.port("secure")) as sock:
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        sock.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 8883\r\n" + outgoing.read())

        def pump() -> None:
            if pending := outgoing.read():
                sock.sendall(pending)
            data = sock.recv(65536)
            assert data, "closed by the broker"
            incoming.write(data)

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pump()
        tls.write(raw.connect("dev-a", key.key, secret))
        sock.sendall(outgoing.read())
        connack = b""
        while len(connack) < 4:
            try:
                connack += tls.read(4 - len(connack))
            except ssl.SSLWantReadError:
                pump()
    assert connack == bytes([0x20, 2, 0, 0])
    assert daemon.audited("connect_ok")[0]["client_ip"] == "203.0.113.9"


def test_losant_style_device_flow(broker: RunningBroker) -> None:
    """What Losant's device SDKs do: client id = device id, keep-alive 15 s, QoS 0 subscribe
    to losant/ID/command, JSON state to losant/ID/state; an app key with the device's
    scope sends commands and reads state."""
    broker.ks("add_device", "5f3a9b", tags=[("fleet", "pumps")])
    broker.ks("add_device", "app-service")
    device_key, device_secret = broker.ks("create_key", device_ids=["5f3a9b"])
    app_key, app_secret = broker.ks("create_key", device_tags=[("fleet", "pumps")],
                                    device_ids=["app-service"])
    with Client(broker.port(), "5f3a9b", device_key.key, device_secret) as device, \
            Client(broker.port(), "app-service", app_key.key, app_secret) as app:
        assert device.connect(keepalive=15) == 0
        assert app.connect() == 0
        assert device.subscribe("losant/5f3a9b/command", 0) == 0
        assert app.subscribe("losant/+/state", 0) == 0
        state = {"time": {"$date": "2026-11-24T00:00:00.000Z"}, "data": {"temp": 21.5}}
        device.publish("losant/5f3a9b/state", json.dumps(state))
        got = app.get()
        assert got is not None and json.loads(got.payload) == state
        command = {"name": "start", "payload": {"speed": 3}}
        app.publish("losant/5f3a9b/command", json.dumps(command))
        got = device.get()
        assert got is not None and json.loads(got.payload) == command


def test_refused_connect_is_a_readable_connack_for_a_plain_paho_client(
    broker: RunningBroker,
) -> None:
    """A device SDK learns why it was refused (CONNACK), instead of seeing a dropped socket."""
    broker.ks("add_device", "dev-a")
    results: list[int] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-a",
                         protocol=mqtt.MQTTv311)
    client.username_pw_set("f" * 32, "nope")
    client.on_connect = lambda _c, _u, _f, reason, _p: results.append(reason.value)
    client.connect("127.0.0.1", broker.port(), 15)
    deadline = time.monotonic() + 5
    while not results and time.monotonic() < deadline:
        client.loop(0.1)
    client.disconnect()
    assert results == [134]  # MQTT 3.1.1 CONNACK 4, as paho reports it


def test_serve_process_logs_bound_ports_and_stops_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "kb.toml"
    config.write_text(
        '[keystore]\npath = "kb.db"\n'
        '[listeners.tcp]\ntype = "tcp"\nhost = "127.0.0.1"\nport = 0\n'
        '[listeners.ws]\ntype = "ws"\nhost = "127.0.0.1"\nport = 0\n'
        '[api]\nport = 0\n'
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("KEYBROKER_DB", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "serve", "--config", str(config), "--demo-if-empty"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lines = []
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "keybroker listening:" in line:
                break
        listening = next(line for line in lines if "keybroker listening:" in line)
        assert "tcp=mqtt://127.0.0.1:" in listening and "ws=ws://127.0.0.1:" in listening
        assert " api=http://127.0.0.1:" in listening  # the API's bound port, on the same line
        port = int(listening.split("tcp=mqtt://127.0.0.1:")[1].split()[0])
        text = "".join(lines)
        while "mosquitto_pub" not in text and time.monotonic() < deadline:
            lines.append(proc.stdout.readline())
            text = "".join(lines)
        key = text.split("key:")[1].split()[0]
        secret = text.split("secret:")[1].split()[0]
        assert f"-p {port} " in text  # the demo command names the bound port, not 0
        with Client(port, "demo-device", key, secret) as client:
            assert client.connect() == 0
        assert (tmp_path / "kb.db").stat().st_mode & 0o777 == 0o600
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_the_daemon_raises_its_open_files_limit(tmp_path: Path) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"hard open-files limit {hard}: nothing to raise")
    proc = subprocess.run(
        [sys.executable, "-c", (
            "import resource, asyncio, logging, sys; logging.basicConfig();"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit("
            "resource.RLIMIT_NOFILE)[1]));"
            "from broker.daemon.server import raise_open_files_limit;"
            "got = raise_open_files_limit(int(sys.argv[1]));"
            "print(got, resource.getrlimit(resource.RLIMIT_NOFILE)[0])"), str(hard * 2)],
        capture_output=True, text=True, timeout=30, check=True)
    raised, soft_now = map(int, proc.stdout.split())
    assert raised == soft_now == hard  # from 256 up to the hard limit
    assert f"max_connections = {hard * 2}" in proc.stderr  # cannot fit: a warning says so
