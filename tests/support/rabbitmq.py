"""A throwaway RabbitMQ cluster on this host, for the tests, the benches and
scripts/cluster: Debian's rabbitmq-server run from /usr/lib/rabbitmq/bin, every node with
its own RABBITMQ_* environment (node name rabbit-kbN@localhost, ports, data and log
directories in one temporary directory), one Erlang cookie for all (HOME), its own epmd
on a private port, everything on 127.0.0.1. Plugins: rabbitmq_mqtt,
rabbitmq_auth_backend_http, rabbitmq_management.

Each node asks its own authsvc URL (``auth_urls[i]``: a replica per node shows that
requests of one cluster reach several replicas); RabbitMQ's internal users come first
(the management user, created at first boot with the administrator tag and only the
permission to delete MQTT subscription queues, and any user a bench adds), access keys
fall through to the HTTP backend. No guest user exists.
Nodes join through classic peer discovery at first boot. ``stop()`` always ends every
process it started (SIGTERM to each node's process group, SIGKILL after a timeout, then
the epmd).

No pytest here: the tests wrap it (tests/rabbitmq/conftest.py), scripts import it too.
"""

from __future__ import annotations

import base64
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.support.waiting import wait_until

BIN = Path("/usr/lib/rabbitmq/bin")
PLUGINS = ("rabbitmq_mqtt", "rabbitmq_auth_backend_http", "rabbitmq_management")
ADMIN = "keybroker-admin"
START_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0


def installed() -> bool:
    return (BIN / "rabbitmq-server").exists() and shutil.which("epmd") is not None


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: RabbitMQ binds it only after
    seconds of start-up, and a port the kernel hands out for port 0 (every other test, or
    anything else on the machine) could be taken by then."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    while True:
        port = random.randrange(10_000, max(10_001, low))  # noqa: S311 - not a secret
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


@dataclass
class Node:
    index: int
    base: Path
    mqtt_port: int
    management_port: int
    dist_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"rabbit-kb{self.index}@localhost"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"


class RabbitCluster:
    def __init__(self, base: Path, size: int = 2, *, stats_interval_ms: int = 500) -> None:
        self.base = base
        self.home = base / "home"
        self.epmd_port = free_port()
        self.stats_interval_ms = stats_interval_ms
        self.admin_password = secrets.token_urlsafe(18)
        self.nodes = [Node(i, base / f"node{i}", free_port(), free_port(), free_port())
                      for i in range(1, size + 1)]
        self.password_file = base / "admin-password"  # for authsvc's [rabbitmq] password_file
        base.mkdir(parents=True, exist_ok=True)
        self.password_file.write_text(self.admin_password + "\n")
        self.password_file.chmod(0o600)

    # --- what the service is told ---------------------------------------------------------

    @property
    def management_urls(self) -> list[str]:
        return [node.management_url for node in self.nodes]

    def mqtt_ports(self) -> list[int]:
        return [node.mqtt_port for node in self.nodes]

    # --- life cycle -----------------------------------------------------------------------

    def start(self, auth_urls: list[str]) -> RabbitCluster:
        """Start every node (node i asks ``auth_urls[i]``) and wait until they form one
        cluster with MQTT and the management API up. Stops what it started on failure."""
        assert len(auth_urls) == len(self.nodes)
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)
        try:
            subprocess.run(["epmd", "-daemon"], env=self._env(), check=True, timeout=30)
            for node, url in zip(self.nodes, auth_urls, strict=True):
                self._write_config(node, url.rstrip("/"))
                with (node.base / "server.out").open("wb") as log:
                    node.process = subprocess.Popen(
                        [str(BIN / "rabbitmq-server")], env=self._env(node), stdout=log,
                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                        start_new_session=True)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _env(self, node: Node | None = None) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("RABBITMQ_", "ERL_"))}
        env.update(HOME=str(self.home), ERL_EPMD_PORT=str(self.epmd_port),
                   ERL_EPMD_ADDRESS="127.0.0.1", RABBITMQ_CONF_ENV_FILE="/dev/null")
        if node is not None:
            env.update(
                RABBITMQ_NODENAME=node.name,
                RABBITMQ_DIST_PORT=str(node.dist_port),
                RABBITMQ_CONFIG_FILE=str(node.base / "rabbitmq.conf"),
                RABBITMQ_ADVANCED_CONFIG_FILE=str(node.base / "advanced.config"),
                RABBITMQ_ENABLED_PLUGINS_FILE=str(node.base / "enabled_plugins"),
                RABBITMQ_MNESIA_BASE=str(node.base / "mnesia"),
                RABBITMQ_LOG_BASE=str(node.base / "log"),
                RABBITMQ_PID_FILE=str(node.base / "pid"),
                RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            )
        return env

    def _write_config(self, node: Node, auth_url: str) -> None:
        node.base.mkdir(parents=True, exist_ok=True)
        (node.base / "enabled_plugins").write_text(f"[{','.join(PLUGINS)}].\n")
        peers = "\n".join(f"cluster_formation.classic_config.nodes.{n.index} = {n.name}"
                          for n in self.nodes)
        (node.base / "rabbitmq.conf").write_text(f"""\
listeners.tcp = none
loopback_users = none
default_user = {ADMIN}
default_pass = {self.admin_password}
default_user_tags.administrator = true
default_permissions.configure = ^mqtt-subscription-
default_permissions.read = ^$
default_permissions.write = ^$
auth_backends.1 = internal
auth_backends.2 = http
auth_http.http_method = post
auth_http.user_path = {auth_url}/auth/user
auth_http.vhost_path = {auth_url}/auth/vhost
auth_http.resource_path = {auth_url}/auth/resource
auth_http.topic_path = {auth_url}/auth/topic
mqtt.listeners.tcp.1 = 127.0.0.1:{node.mqtt_port}
mqtt.allow_anonymous = false
mqtt.vhost = /
mqtt.exchange = amq.topic
management.tcp.ip = 127.0.0.1
management.tcp.port = {node.management_port}
collect_statistics_interval = {self.stats_interval_ms}
cluster_formation.peer_discovery_backend = classic_config
{peers}
disk_free_limit.absolute = 50MB
log.console = false
log.file.level = info
""")
        (node.base / "advanced.config").write_text("[].\n")

    def _wait_ready(self) -> None:
        names = {node.name for node in self.nodes}

        def ready() -> bool:
            for node in self.nodes:
                assert node.process is not None
                if node.process.poll() is not None:
                    raise RuntimeError(f"{node.name} exited ({node.process.returncode}):\n"
                                       + self.log_tail(node))
            try:
                running = {item["name"] for item in self.api("GET", "/api/nodes")
                           if item.get("running")}
            except (OSError, urllib.error.URLError, ValueError):
                return False
            return running >= names and all(_listening(node.mqtt_port) for node in self.nodes)

        try:
            wait_until(ready, START_TIMEOUT, poll=0.5)
        except AssertionError:
            tail = self.log_tail(self.nodes[-1])
            raise RuntimeError(f"RabbitMQ cluster not ready within {START_TIMEOUT:.0f} s:\n"
                               + tail) from None

    def log_tail(self, node: Node, size: int = 3000) -> str:
        text = ""
        for path in [node.base / "server.out", *sorted((node.base / "log").glob("*.log"))]:
            if path.exists():
                text += f"--- {path}\n" + path.read_text(errors="replace")[-size:]
        return text

    def stop(self) -> None:
        """End every process started here; safe to call more than once."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                _signal_group(node.process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                node.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(node.process, signal.SIGKILL)  # anything the node left running
            node.process.wait(10)
            node.process = None
        subprocess.run(["epmd", "-kill"], env=self._env(), capture_output=True, timeout=30,
                       check=False)

    # --- the management API (as the administrator) ----------------------------------------

    def api(self, method: str, path: str, node: int = 0, body: object = None) -> object:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - the node's management URL
            self.nodes[node].management_url + path, data=data, method=method)
        token = base64.b64encode(f"{ADMIN}:{self.admin_password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - our URL
            text = response.read()
        return json.loads(text) if text.strip() else None

    def add_user(self, name: str, password: str) -> None:
        """An internal user with every permission on "/" (benches compare with it)."""
        self.api("PUT", f"/api/users/{name}", body={"password": password, "tags": ""})
        self.api("PUT", f"/api/permissions/%2F/{name}",
                 body={"configure": ".*", "write": ".*", "read": ".*"})

    def client_ids(self) -> set[str]:
        """Client ids of the connections the management API lists (from statistics: a
        connection appears a few seconds after it opened)."""
        found = self.api("GET", "/api/connections?columns=client_properties")
        return {str((item.get("client_properties") or {}).get("client_id"))
                for item in (found if isinstance(found, list) else [])}

    def ctl(self, *args: str, node: int = 0) -> str:
        """rabbitmqctl against a node (stdout)."""
        done = subprocess.run([str(BIN / "rabbitmqctl"), "-n", self.nodes[node].name, *args],
                              env=self._env(), capture_output=True, text=True, timeout=60,
                              check=True)
        return done.stdout


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
