"""The daemon runs on uvloop when it is installed and on asyncio's own loop when told to
(KEYBROKER_EVENT_LOOP): both carry the same traffic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from keystore import KeyStore
from tests.support.harness import Client, seed
from tests.support.process import DaemonProcess


async def _devices(ks: KeyStore) -> tuple[str, str]:
    await ks.upsert_devices([("dev", None, []), ("sub", None, [])])
    key, secret = await ks.create_key(device_ids=["dev", "sub"])
    return key.key, secret


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_daemon_runs_on_the_loop_it_is_given(tmp_path: Path, loop: str) -> None:
    daemon = DaemonProcess(tmp_path, env={"KEYBROKER_EVENT_LOOP": loop})
    key, secret = seed(daemon.db, _devices)
    port = daemon.start()
    try:
        assert f"event loop {loop}" in daemon.log()
        with Client(port, "sub", key, secret) as sub, Client(port, "dev", key, secret) as pub:
            assert sub.connect() == 0 and pub.connect() == 0
            assert sub.subscribe("losant/dev/state", 1) == 1
            pub.publish("losant/dev/state", b"on " + loop.encode(), qos=1)
            message = sub.get()
            assert message is not None and message.payload == b"on " + loop.encode()
    finally:
        daemon.stop()


def test_an_unknown_event_loop_is_refused_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "broker.cli", "--db", str(tmp_path / "k.db"), "serve",
         "--port", "0", "--ws-port", "0", "--no-api"],
        env={"KEYBROKER_EVENT_LOOP": "trio", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "Error: KEYBROKER_EVENT_LOOP='trio': must be one of auto, uvloop, asyncio")
