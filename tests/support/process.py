"""`keybroker serve` as a real process, for tests that stop it as an operator or a crash
would (SIGTERM, SIGKILL) and start it again on the same files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from tests.support.waiting import wait_until

START_TIMEOUT = 30.0


class DaemonProcess:
    """One config file in ``workdir``; ``start()`` runs the daemon on a free port (port 0)
    and returns the port; its log lines are collected in ``lines``."""

    def __init__(self, workdir: Path, config: str = "",
                 env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.config = workdir / "keybroker.toml"
        # The API on a free port too, unless the test configures it (8080, its default,
        # may be taken on a developer's machine).
        api = "" if "[api]" in config else "[api]\nport = 0\n"
        self.config.write_text(
            '[keystore]\npath = "keybroker.db"\n'
            '[listeners.tcp]\ntype = "tcp"\nhost = "127.0.0.1"\nport = 0\n' + api + config)
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None
        self.env = env or {}  # environment variables of the daemon beyond the test's own

    @property
    def db(self) -> Path:
        return self.workdir / "keybroker.db"

    @property
    def state(self) -> Path:
        return self.workdir / "keybroker.state.db"

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}
        self.lines = []
        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "broker.cli", "serve", "--config", str(self.config),
             "--log-level", "INFO", *args],
            cwd=self.workdir, env={**env, "PYTHONUNBUFFERED": "1", **self.env}, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        return self.proc

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line)

    def start(self, *args: str) -> int:
        proc = self.spawn(*args)

        def listening_or_gone() -> str | bool:
            listening = [line for line in list(self.lines) if "keybroker listening:" in line]
            return listening[0] if listening else proc.poll() is not None

        try:
            found = wait_until(listening_or_gone, START_TIMEOUT)
        except AssertionError:
            found = False
        if isinstance(found, str):
            return int(found.split("tcp=mqtt://127.0.0.1:")[1].split()[0])
        self.kill()
        raise AssertionError("daemon did not start:\n" + self.log())

    def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send ``sig`` and return the exit code (-9 for SIGKILL)."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.wait()

    def log(self) -> str:
        return "".join(self.lines)
