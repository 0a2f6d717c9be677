"""scripts/cluster: a local demo of keybroker as the access-key service of a RabbitMQ
cluster (docs/cluster.md). See scripts/cluster for usage."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

from broker.cli.serve import DEMO_DASHBOARD, DEMO_DEVICE, demo_commands
from broker.core.settings import Settings
from keystore import KeyStore
from tests.support.rabbitmq import ADMIN

from .localcluster import LocalCluster


async def seed(target: str) -> tuple[str, str]:
    """The demo devices and one key for both (the secret exists only here)."""
    async with KeyStore.open(target) as ks:
        for device in (DEMO_DEVICE, DEMO_DASHBOARD):
            await ks.add_device(device, tags=[("kind", "demo")])
        key, secret = await ks.create_key(name="demo", device_tags=[("kind", "demo")])
    return key.key, secret


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/cluster", description=__doc__)
    parser.add_argument("--sqlite", action="store_true",
                        help="an SQLite keystore file instead of a PostgreSQL server")
    parser.add_argument("--nodes", type=int, default=2, help="RabbitMQ nodes (default 2)")
    parser.add_argument("--replicas", type=int, default=2, help="authsvc replicas (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="keybroker-cluster-"))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with LocalCluster(base, nodes=args.nodes, replicas=args.replicas,
                          postgres=not args.sqlite) as cluster:
            key, secret = asyncio.run(seed(cluster.keystore))
            assert cluster.rabbit is not None
            rabbit = cluster.rabbit
            ports = cluster.mqtt_ports()
            settings = Settings()
            dashboard = demo_commands(settings, key, secret, "127.0.0.1", ports[-1])
            device = demo_commands(settings, key, secret, "127.0.0.1", ports[0])
            nodes = " ".join(f"{node.name}=127.0.0.1:{node.mqtt_port}" for node in rabbit.nodes)
            print(f"""
keybroker authsvc in front of a {len(ports)}-node RabbitMQ cluster
(all on 127.0.0.1; state in {base})
  keystore:         {cluster.keystore}
  authsvc replicas: {' '.join(replica.url for replica in cluster.authsvc)}
  RabbitMQ MQTT:    {nodes}
  management:       {' '.join(rabbit.management_urls)}
                    (user {ADMIN}, password in {rabbit.password_file})

Devices '{DEMO_DEVICE}' and '{DEMO_DASHBOARD}' and one access key for both:
  key:    {key}
  secret: {secret}   (shown once)

The dashboard watches on node {len(ports)}, the device publishes on node 1:
  {dashboard['mosquitto'][0]}
  {device['mosquitto'][1]}
or with amqtt's clients:
  {dashboard['amqtt'][0]}
  {device['amqtt'][1]}
Try `keybroker --db {cluster.keystore} keys deactivate {key[:8]}`: both disconnect.

Ctrl-C stops everything.""", flush=True)
            while not stop.wait(0.5):
                pass
            print("stopping ...", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
