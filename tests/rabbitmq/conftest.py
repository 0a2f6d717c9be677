"""A real 2-node RabbitMQ cluster (Debian's rabbitmq-server: MQTT, the HTTP auth backend,
management) whose nodes ask two real `keybroker authsvc` replicas on one keystore: node 1
asks replica a, node 2 asks replica b. Started once per keystore backend (an SQLite file,
then a database of the session's PostgreSQL server; about 20 s each on 2 cores) and
always stopped; skipped with a plain message when rabbitmq-server is not
installed (a failure under KEYBROKER_REQUIRE_SERVICES=1, as in CI)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from keystore import KeyStore
from keystore.models import AccessKey
from tests.conftest import BACKENDS, keystore_on
from tests.support.authsvc import Replica, authsvc_config, on_keystore
from tests.support.harness import Client
from tests.support.rabbitmq import ADMIN, BIN, RabbitCluster, installed
from tests.support.services import unavailable


@dataclass
class ClusterEnv:
    db: str  # the keystore: an SQLite file or a PostgreSQL URL
    rabbit: RabbitCluster
    replicas: tuple[Replica, Replica]
    audit: tuple[Path, Path]
    secrets: list[str] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)

    @property
    def ports(self) -> list[int]:
        """The MQTT port of each node."""
        return self.rabbit.mqtt_ports()

    def store(self, action: Any) -> Any:
        return on_keystore(self.db, action)

    def key(self, devices: list[str], **options: Any) -> tuple[str, str]:
        """Devices tagged ``site=<first device>`` and a key restricted to that tag."""
        async def go(ks: KeyStore) -> tuple[AccessKey, str]:
            for device in devices:
                await ks.add_device(device, tags=[("site", devices[0])])
            return await ks.create_key(device_tags=[("site", devices[0])], **options)

        key, secret = self.store(go)
        self.secrets.append(secret)
        return key.key, secret

    def client(self, node: int, client_id: str, key: str, secret: str,
               **options: Any) -> Client:
        """A paho client of node ``node`` (0 or 1), closed at the end of the test."""
        made = Client(self.ports[node], client_id, key, secret, **options)
        self.clients.append(made)
        return made

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for path in self.audit if path.exists()
                for line in path.read_text().splitlines()]


def refused(client: Client, topic_filter: str) -> bool:
    """SUBSCRIBE to a filter the service denies: RabbitMQ 3.10 closes the connection (it
    sends no SUBACK 0x80)."""
    client.client.subscribe(topic_filter, 0)
    return client.disconnected.wait(5)


@pytest.fixture(scope="session", params=BACKENDS)
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterEnv]:
    """A 2-node RabbitMQ cluster asking two authsvc replicas, once on an SQLite keystore
    and once on a PostgreSQL one."""
    if not installed():  # Debian's layout: the tests run the nodes from /usr/lib/rabbitmq/bin
        unavailable(f"{BIN / 'rabbitmq-server'} or epmd not found: the RabbitMQ cluster "
                    "tests (apt-get install rabbitmq-server)")
    work = tmp_path_factory.mktemp("cluster")
    with keystore_on(request, request.param, work) as db:
        yield from _cluster(work, db)


def _cluster(work: Path, db: str) -> Iterator[ClusterEnv]:
    audit = (work / "a-audit.jsonl", work / "b-audit.jsonl")
    for attempt in (1, 2):  # a node that lost a port to another process: once more
        rabbit = RabbitCluster(work / f"rabbitmq-{attempt}")
        # Many refusals from 127.0.0.1 on purpose: the guard must not ban it here.
        replicas = tuple(Replica(work, f"{name}{attempt}", authsvc_config(
            db, path, management=rabbit.management_urls, user=ADMIN,
            password_file=rabbit.password_file, max_failures=10_000))
            for name, path in zip("ab", audit, strict=True))
        env = ClusterEnv(db, rabbit, (replicas[0], replicas[1]), audit)
        try:
            for replica in replicas:
                replica.start()
            rabbit.start([replica.url for replica in replicas])
        except RuntimeError:
            for replica in replicas:
                replica.stop()
            if attempt == 2:
                raise
            continue
        try:
            yield env
        finally:
            close_clients(env)
            rabbit.stop()
            for replica in replicas:
                replica.stop()
        return


@pytest.fixture
def env(cluster: ClusterEnv) -> Iterator[ClusterEnv]:
    """The session's cluster; the clients a test made are closed after it."""
    try:
        yield cluster
    finally:
        close_clients(cluster)


def close_clients(env: ClusterEnv) -> None:
    """Close a test's clients side by side (paho takes up to a second to stop the loop of
    a refused client)."""
    clients, env.clients = env.clients, []

    def close(client: Client) -> None:
        with contextlib.suppress(Exception):  # closing what a test left open
            client.close()

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(close, clients))

