"""`pip install` of a built wheel gives a `keybroker` that runs anywhere: built from a copy
of the sources, installed with its dependencies into a fresh venv, used from another
directory with no config file (the defaults live in code)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.harness import Client

REPO = Path(__file__).resolve().parents[2]
PIP_TIMEOUT = 300  # pip reuses its wheel cache; a cold cache downloads the dependencies


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 60) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    return proc.stdout


@pytest.mark.slow
def test_installed_wheel_runs_from_any_directory(tmp_path: Path) -> None:
    # Nothing of the checkout may leak in: not the sources, not the test venv.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("KEYBROKER_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to it
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".*", "__pycache__", "build", "dist", "data", "*.egg-info", "tests", "scripts"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"),
         str(src)], tmp_path, env, PIP_TIMEOUT)
    (wheel,) = (tmp_path / "dist").glob("keybroker-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], tmp_path,
        env, PIP_TIMEOUT)
    shutil.rmtree(src)  # the installed package must not need it

    work = tmp_path / "elsewhere"
    work.mkdir()
    keybroker = str(venv / "bin" / "keybroker")
    run([keybroker, "--db", "k.db", "devices", "add", "x"], work, env)
    created = json.loads(run([keybroker, "--db", "k.db", "keys", "create", "--device", "x",
                              "--json"], work, env))
    example = run([keybroker, "config", "example"], work, env)
    assert example == (REPO / "config" / "keybroker.toml").read_text(encoding="utf-8")
    assert "[limits]" in run([keybroker, "config", "show"], work, env)
    seed_example = run([keybroker, "seed", "--example"], work, env)
    assert seed_example == (REPO / "config" / "seed.example.toml").read_text(encoding="utf-8")
    (work / "seed.toml").write_text(seed_example, encoding="utf-8")
    run([keybroker, "--db", "seeded.db", "seed", "seed.toml", "--output", "s.jsonl"], work, env)
    assert (work / "s.jsonl").read_text().count('"secret"') >= 1  # the example works as is

    daemon = subprocess.Popen(
        [keybroker, "--db", "k.db", "serve", "--host", "127.0.0.1", "--port", "0",
         "--ws-port", "0", "--api-port", "0"],
        cwd=work, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert daemon.stdout is not None
        deadline, line = time.monotonic() + 30, ""
        while time.monotonic() < deadline and "keybroker listening:" not in line:
            line = daemon.stdout.readline()
            assert line or daemon.poll() is None, "daemon exited"
        port = int(line.split("tcp=mqtt://127.0.0.1:")[1].split()[0])
        with Client(port, "x", created["key"], created["secret"]) as client:
            assert client.connect() == 0
        api = line.split("api=")[1].split()[0]
        with urllib.request.urlopen(api + "/openapi.json", timeout=10) as answer:  # noqa: S310
            assert json.load(answer)["openapi"] == "3.1.0"  # the installed API serves
        with urllib.request.urlopen(api + "/console/signin", timeout=10) as page:  # noqa: S310
            assert "Admin token" in page.read().decode()  # templates are in the wheel
        with urllib.request.urlopen(api + "/console/static/console.css",  # noqa: S310
                                    timeout=10) as style:
            assert b"--accent" in style.read()
    finally:
        daemon.terminate()
        assert daemon.wait(15) == 0
        if daemon.stdout is not None:
            daemon.stdout.close()
