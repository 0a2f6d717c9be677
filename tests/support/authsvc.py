"""Real `keybroker authsvc` processes for tests (and scripts/cluster): each replica is
``python -m broker.cli authsvc --port 0`` on a config file written here, its log in a file;
its URL is read from the start-up line. ``ask`` sends one request the way RabbitMQ
(form-encoded) or EMQX (JSON) does."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from keystore import KeyStore
from tests.support.waiting import wait_until

T = TypeVar("T")

START_TIMEOUT = 30.0
LISTENING = re.compile(r"keybroker authsvc listening: (http://\S+)")


def toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(item) for item in items) + "]"


def authsvc_config(db: Path | str, audit: Path, *, management: Sequence[str] = (),
                   user: str = "", password_file: Path | None = None,
                   emqx_api: Sequence[str] = (), emqx_key: str = "",
                   emqx_secret_file: Path | None = None, max_failures: int = 20,
                   allowed_peers: Sequence[str] | None = None,
                   admission_window: float | None = None) -> str:
    """A replica's config; ``allowed_peers`` and ``admission_window`` are the defaults
    (an engine on loopback) unless given."""
    # A postgresql:// URL is [keystore] url (the PostgreSQL backend), a path is a file.
    where = "url" if str(db).startswith("postgresql://") else "path"
    optional = "".join(f"{name} = {value}\n" for name, value in (
        ("allowed_peers", None if allowed_peers is None else toml_list(allowed_peers)),
        ("admission_window", admission_window)) if value is not None)
    return f"""\
[keystore]
{where} = {json.dumps(str(db))}
[audit]
path = {json.dumps(str(audit))}
[security]
max_failures = {max_failures}
[authsvc]
host = "127.0.0.1"
port = 0
{optional}[rabbitmq]
api = {toml_list(management)}
user = {json.dumps(user)}
password_file = {json.dumps(str(password_file or ""))}
[emqx]
api = {toml_list(emqx_api)}
api_key = {json.dumps(emqx_key)}
api_secret_file = {json.dumps(str(emqx_secret_file or ""))}
"""


class Replica:
    """One authsvc process; ``stop()`` always ends it."""

    def __init__(self, workdir: Path, name: str, config: str,
                 args: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.name = name
        self.args = tuple(args)  # options of `keybroker authsvc` beside the config
        self.config = workdir / f"{name}.toml"
        self.config.write_text(config)
        self.log = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> Replica:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "broker.cli", "--config", str(self.config), "authsvc",
                 *self.args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        process = self.process

        def listening_or_gone() -> re.Match[str] | bool | None:
            return LISTENING.search(self.log.read_text(errors="replace")) or \
                process.poll() is not None

        try:
            found = wait_until(listening_or_gone, START_TIMEOUT, poll=0.05)
        except AssertionError:
            found = None
        if not isinstance(found, re.Match):
            self.stop()
            raise RuntimeError(f"authsvc {self.name} did not start:\n" + self.log_text())
        self.url = found.group(1)
        return self

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None


def ask(url: str, path: str, fields: Mapping[str, str], *, json_body: bool = False,
        method: str = "POST") -> tuple[int, str]:
    """(status, body text) of one request shaped like the engine's."""
    if json_body:
        data = json.dumps(dict(fields)).encode()
        content_type = "application/json"
    else:
        data = urllib.parse.urlencode(fields).encode()
        content_type = "application/x-www-form-urlencoded"
    if method == "GET":
        request = urllib.request.Request(url + path + "?" + data.decode(),  # noqa: S310
                                         method="GET")
    else:
        request = urllib.request.Request(url + path, data=data, method=method)  # noqa: S310
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - test URL
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def on_keystore(target: Path | str, action: Callable[[KeyStore], Awaitable[T]]) -> T:
    """Run ``action`` on the keystore at ``target`` (as another process would, the CLI)."""

    async def run() -> T:
        async with KeyStore.open(target) as ks:
            return await action(ks)

    return asyncio.run(run())


def create_keystore(target: Path | str) -> None:
    """Make (and migrate) a keystore before replicas open it: authsvc never creates one."""
    on_keystore(target, _nothing)


async def _nothing(_ks: KeyStore) -> None:
    return None
