"""Start and stop the brokers under test, each in its own subprocess on 127.0.0.1.

``running(kind, ...)`` is a context manager that always stops the subprocess
(SIGTERM, then SIGKILL after a timeout) and gives the port and the pid (for RSS).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
# Optional (--pin): with 2+ CPUs the broker gets CPU 0 to itself and the load generator
# the others. Off by default: pinned, the kernel's loopback work for the broker's sockets
# shares the broker's core, which lowers every Python broker's figures alike.
_SPLIT = {"on": False}


def set_cpu_split(enabled: bool) -> None:
    _SPLIT["on"] = enabled


def cpu_split() -> tuple[set[int], set[int]] | None:
    """(broker CPUs, generator CPUs), or None when not splitting."""
    cpus = sorted(os.sched_getaffinity(0))
    if not _SPLIT["on"] or len(cpus) < 2:
        return None
    return {cpus[0]}, set(cpus[1:])
BROKERS = ("amqtt", "keybroker", "mosquitto")
ROOT = Path(__file__).resolve().parents[2]


# keybroker of this tree on one event loop, whatever is installed (KEYBROKER_EVENT_LOOP)
LOOP_VARIANTS = {"keybroker-asyncio": "asyncio", "keybroker-uvloop": "uvloop"}


def is_keybroker(kind: str) -> bool:
    """keybroker: this tree's, on one event loop (``keybroker-asyncio``,
    ``keybroker-uvloop``), or an earlier commit's (``keybroker@REV``)."""
    return kind == "keybroker" or kind.startswith("keybroker@") or kind in LOOP_VARIANTS


def checkout(rev: str, workdir: Path) -> Path:
    """The files of commit ``rev`` of this repository, once per run (``git archive``):
    ``keybroker@REV`` runs them with this venv's packages, for before/after figures
    measured side by side in one run."""
    tree = workdir / f"tree-{rev}"
    if not tree.exists():
        tree.mkdir()
        archive = subprocess.run(  # noqa: S603 - git, fixed arguments
            ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "broker", "keystore"],  # noqa: S607
            capture_output=True, check=True, timeout=60).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True,  # noqa: S603,S607
                       timeout=60)
    return tree
START_TIMEOUT = 30.0

# Stock amqtt: anonymous, no ACL, no $SYS plugin, one TCP listener.
_AMQTT_RUNNER = """
import asyncio, logging, signal, sys
from amqtt.broker import Broker
logging.basicConfig(level=logging.WARNING)
async def main(port):
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"amqtt listening on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    await broker.shutdown()
asyncio.run(main(int(sys.argv[1])))
"""

# `keybroker serve` through the CLI group, for a tree where the serve command exists in
# broker.cli.serve but is not yet registered on broker.cli:main.
_KEYBROKER_SERVE_SHIM = (
    "import sys; from broker.cli import main; from broker.cli.serve import serve; "
    "main.add_command(serve); sys.argv[0] = 'keybroker'; main()"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None,
    )


def mosquitto_version() -> str | None:
    path = mosquitto_path()
    if path is None:
        return None
    try:
        out = subprocess.run(  # noqa: S603 - the installed mosquitto binary, fixed arguments
            [path, "-h"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.splitlines()[0] if out else ""
    return first.replace("mosquitto version", "").strip() or None


def keybroker_command() -> tuple[list[str], str | None]:
    """argv prefix for `keybroker` (before `--db`), and a note when a shim is needed."""
    import click

    from broker.cli import main  # the bench runs in the project's venv

    if main.get_command(click.Context(main), "serve") is not None:  # commands load on use
        return [sys.executable, "-m", "broker.cli"], None
    try:
        import broker.cli.serve  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"keybroker has no serve command: {exc}") from exc
    return [sys.executable, "-c", _KEYBROKER_SERVE_SHIM], (
        "`keybroker serve` is not registered on broker.cli:main in this tree; the bench "
        "started broker.cli.serve.serve through the same CLI group instead"
    )


@dataclass
class RunningBroker:
    kind: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    notes: list[str] = field(default_factory=list)
    api_port: int | None = None  # keybroker's HTTP API

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for pid {self.pid}")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.kind} exited with code {self.proc.returncode}; log tail:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _wait_listening(broker: RunningBroker, timeout: float) -> None:
    """Until the MQTT port (and keybroker's API port, bound after it) accept."""
    deadline = time.monotonic() + timeout
    ports = [broker.port] + ([broker.api_port] if broker.api_port else [])
    while time.monotonic() < deadline:
        broker.check_alive()
        with contextlib.suppress(OSError):
            for port in ports:
                socket.create_connection((HOST, port), 0.5).close()
            return
        time.sleep(0.05)
    raise RuntimeError(f"{broker.kind} did not listen on {broker.port} within {timeout}s:\n"
                       f"{broker.log_tail()}")


def _stop(broker: RunningBroker, timeout: float = 10.0) -> None:
    proc = broker.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def running(kind: str, workdir: Path, *, keystore: Path | None = None, config: str = "",
            log_level: str = "WARNING", api_settings: str = "",
            limits: str = "", port: int | None = None,
            api_port: int | None = None) -> Iterator[RunningBroker]:
    """Start broker ``kind`` on a loopback port (``port``, else a free one); always stopped
    on exit. keybroker: ``limits`` lines go into [limits], ``api_settings`` into [api], and
    ``config`` is appended to its config file (e.g. a [persistence] section)."""
    port = free_port() if port is None else port
    log_path = workdir / f"{kind}-{port}.log"
    notes: list[str] = []
    if kind == "amqtt":
        argv = [sys.executable, "-c", _AMQTT_RUNNER, str(port)]
    elif kind == "mosquitto":
        path = mosquitto_path()
        if path is None:
            raise RuntimeError("mosquitto is not installed")
        conf = workdir / f"mosquitto-{port}.conf"
        conf.write_text(f"listener {port} {HOST}\nallow_anonymous true\npersistence false\n"
                        "log_dest stderr\nlog_type error\nlog_type warning\n")
        argv = [path, "-c", str(conf)]
    elif is_keybroker(kind):
        if keystore is None:
            raise ValueError("keybroker needs a keystore path")
        conf = workdir / f"keybroker-{port}.toml"
        api_port = free_port() if api_port is None else api_port
        # Default limits except: the fleet workload's idle client holds up to 100,000
        # filters (about 120 MiB as the subscription bytes count them), and every
        # load-generator connection comes from 127.0.0.1 (0 = no limit). A tree older than
        # the subscription-bytes limits refuses those settings: compare with such a tree
        # by leaving them out.
        conf.write_text(
            f'[keystore]\npath = "{keystore}"\n\n'
            f'[listeners.tcp]\ntype = "tcp"\nhost = "{HOST}"\nport = {port}\n\n'
            "[limits]\nmax_subscriptions = 0\nmax_subscription_bytes = 0\n"
            "max_subscription_bytes_per_key = 0\nmax_subscription_bytes_per_app = 0\n"
            "max_connections_per_source = 0\n"
            f"max_unauthenticated_per_source = 0\n{limits}\n"
            f'[api]\nhost = "{HOST}"\nport = {api_port}\n{api_settings}\n' + config
        )
        notes.append("keybroker runs with its default limits except [limits] "
                     "max_subscriptions = 0 and no subscription-bytes limits (the fleet "
                     "workload holds up to 100,000 filters) "
                     "and no per-source connection caps (every load connection comes from "
                     "127.0.0.1)")
        if not kind.startswith("keybroker@"):
            prefix, note = keybroker_command()
            if note:
                notes.append(note)
        else:  # an earlier commit's code, first on the path of its own interpreter
            tree = checkout(kind.split("@", 1)[1], workdir)
            prefix = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tree)!r}); "
                      "sys.argv[0] = 'keybroker'; from broker.cli import main; main()"]
        argv = [*prefix, "--db", str(keystore), "serve", "--config", str(conf),
                "--host", HOST, "--port", str(port), "--log-level", log_level]
    else:
        raise ValueError(f"unknown broker {kind!r}")
    split = cpu_split()
    pin = None if split is None else split[0]
    preexec = None if pin is None else (lambda: os.sched_setaffinity(0, pin))
    with open(log_path, "wb") as log:
        env = dict(os.environ)
        if kind.startswith("keybroker") and "@" not in kind:
            # this tree's code, whichever checkout the venv was installed from (the
            # daemon runs in a scratch directory, where `-m broker.cli` would find the
            # editable install's)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                              env.get("PYTHONPATH")]))
        if kind in LOOP_VARIANTS:
            env["KEYBROKER_EVENT_LOOP"] = LOOP_VARIANTS[kind]
        proc = subprocess.Popen(  # noqa: S603 - argv built above from fixed parts
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True,
            preexec_fn=preexec, env=env)
    broker = RunningBroker(kind, proc, port, log_path, notes, api_port)
    try:
        _wait_listening(broker, START_TIMEOUT)
        yield broker
    finally:
        _stop(broker)
