"""A whole local deployment of keybroker authsvc, for scripts/cluster (the demo) and
scripts/bench_authsvc: a keystore (a throwaway PostgreSQL server, or an SQLite file),
authsvc replicas, and a RabbitMQ cluster whose node i asks replica i. Everything on
127.0.0.1, all state in one directory; ``LocalCluster`` is a context manager that stops
every process it started, in reverse order, whatever happened.

The RabbitMQ nodes and the authsvc processes are started by the same helpers as the
tests (tests/support/rabbitmq.py, tests/support/authsvc.py).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.authsvc import Replica, authsvc_config, create_keystore
from tests.support.rabbitmq import ADMIN, RabbitCluster, free_port

PG_BINDIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
PG_USER = "keybroker"


def _pg_tool(name: str) -> str:
    for folder in PG_BINDIRS:
        if (folder / name).exists():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: apt-get install postgresql")
    return found


class Postgres:
    """initdb + pg_ctl in ``base``, on 127.0.0.1 only, as the postgres user when root
    (initdb refuses root); trust authentication for the loopback demo."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.port = free_port()
        self.running = False

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def start(self) -> Postgres:
        self.base.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.base, user.pw_uid, user.pw_gid)
        self._run(_pg_tool("initdb"), "-D", str(self.data), "-U", PG_USER, "--auth=trust",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        self._run(_pg_tool("pg_ctl"), "-D", str(self.data), "-l", str(self.base / "server.log"),
                  "-o", f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1",
                  "-w", "-t", "60", "start")
        self.running = True
        return self

    @property
    def url(self) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        if self.running:
            self._run(_pg_tool("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
            self.running = False


@dataclass
class LocalCluster:
    base: Path
    nodes: int = 2
    replicas: int = 2
    postgres: bool = True  # else an SQLite file in base
    stats_interval_ms: int = 500
    log: Callable[[str], None] = print
    keystore: str = ""
    rabbit: RabbitCluster | None = None
    authsvc: list[Replica] = field(default_factory=list)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def __enter__(self) -> LocalCluster:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def _start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        if self.postgres:
            server = Postgres(self.base / "postgres").start()
            self._stack.callback(server.stop)
            self.keystore = server.url
            self.log(f"PostgreSQL keystore: {server.url}")
        elif not self.keystore:
            self.keystore = str(self.base / "keystore.db")
        create_keystore(self.keystore)  # made (and migrated) before any replica opens it
        rabbit = RabbitCluster(self.base / "rabbitmq", self.nodes,
                               stats_interval_ms=self.stats_interval_ms)
        self.rabbit = rabbit
        for index in range(self.replicas):
            replica = Replica(self.base, f"authsvc-{index + 1}", authsvc_config(
                self.keystore, self.base / f"authsvc-{index + 1}-audit.jsonl",
                management=rabbit.management_urls, user=ADMIN,
                password_file=rabbit.password_file))
            replica.start()
            self._stack.callback(replica.stop)
            self.authsvc.append(replica)
            self.log(f"authsvc replica {index + 1}: {replica.url}")
        self.log(f"starting a {self.nodes}-node RabbitMQ cluster ...")
        rabbit.start([self.authsvc[i % self.replicas].url for i in range(self.nodes)])
        self._stack.callback(rabbit.stop)

    def mqtt_ports(self) -> list[int]:
        assert self.rabbit is not None
        return self.rabbit.mqtt_ports()
