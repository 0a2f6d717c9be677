"""The HTTP API under load (the ``api`` workload of scripts/bench), against a real daemon.

* ``seed_api``: adds to a flow keystore an application's worth of keys (10,000), a device
  with its key for ``/auth/device``, and an admin token.
* ``measure_api``: key creation over HTTP (req/s, one keep-alive connection, sequential),
  a page of 100 keys out of 10,000 at random pages (p50/p99), ``/auth/device`` (p50/p99).
* ``SteadyLoad``: a background thread that keeps the API at a fixed request rate (a mix of
  a key read, a device read, a device-state POST and a 10-key page) while MQTT is measured.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from keystore import KeyStore

API_DEVICE = "api-device"


@dataclass(frozen=True)
class ApiCreds:
    token: str
    app_id: str
    key_id: str  # a key to read
    device: str  # a device with its own key, for /auth/device
    device_key: str
    device_secret: str
    keys: int


async def seed_api(path: Path, keys: int) -> ApiCreds:
    async with KeyStore.open(str(path)) as ks:
        await ks.add_device(API_DEVICE)
        key, secret = await ks.create_key(device_ids=[API_DEVICE], name="api-bench-device")
        await ks.create_keys([{"name": f"api-bench-{i:05d}"} for i in range(keys - 1)])
        _row, token = await ks.create_token("bench")
        app = await ks.app()
        total = await ks.count_keys()
    return ApiCreds(token, app.id, key.id, API_DEVICE, key.key, secret, total)


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
        "samples": len(ordered),
    }


async def _timed(session: aiohttp.ClientSession, method: str, url: str,
                 **kwargs: Any) -> tuple[float, int]:
    started = time.perf_counter()
    async with session.request(method, url, **kwargs) as response:
        await response.read()
        return time.perf_counter() - started, response.status


async def measure_api(base: str, creds: ApiCreds, *, creates: int, pages: int,
                      logins: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {creds.token}"}
    app = f"{base}/applications/{creds.app_id}"
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession(headers=headers) as session:
        page_count = max(1, creds.keys // 100)
        lat = []
        for _ in range(pages):
            took, status = await _timed(session, "GET", f"{app}/keys", params={
                "perPage": "100", "page": str(random.randrange(page_count))})  # noqa: S311
            assert status == 200, status
            lat.append(took)
        out["list_page"] = _percentiles(lat)

        lat = []
        body = {"deviceId": creds.device, "key": creds.device_key,
                "secret": creds.device_secret}
        for _ in range(logins):
            took, status = await _timed(session, "POST", f"{base}/auth/device", json=body)
            assert status == 200, status
            lat.append(took)
        out["auth_device"] = _percentiles(lat)

        started = time.perf_counter()
        for index in range(creates):
            _took, status = await _timed(session, "POST", f"{app}/keys",
                                         json={"name": f"created-{index}"})
            assert status == 201, status
        elapsed = time.perf_counter() - started
        out["key_create"] = {"req_per_s": round(creates / elapsed, 1), "requests": creates}
    return out


class SteadyLoad:
    """``rate`` requests per second on the API from a thread of its own (own event loop),
    paced on a fixed schedule; ``achieved`` says what was really served."""

    def __init__(self, base: str, creds: ApiCreds, rate: float) -> None:
        self.base, self.creds, self.rate = base, creds, rate
        self.done = 0
        self.errors = 0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    @property
    def achieved(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    async def _run(self) -> None:
        creds, app = self.creds, f"{self.base}/applications/{self.creds.app_id}"
        async with aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {creds.token}"}) as session:
            requests = [
                ("GET", f"{app}/keys/{creds.key_id}", None, None),
                ("GET", f"{app}/devices/{creds.device}", None, None),
                ("POST", f"{app}/devices/{creds.device}/state", {"data": {"t": 1}}, None),
                ("GET", f"{app}/keys", None, {"perPage": "10"}),
            ]
            started = time.perf_counter()
            index = 0
            while not self._stop.is_set():
                due = started + index / self.rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                method, url, body, params = requests[index % len(requests)]
                _took, status = await _timed(session, method, url, json=body, params=params)
                self.done += 1
                self.errors += status >= 400
                index += 1
            self.seconds = time.perf_counter() - started


class Scraper:
    """GET ``url`` once a second from a thread, as Prometheus would."""

    def __init__(self, url: str, interval: float = 1.0) -> None:
        self.url, self.interval = url, interval
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with urllib.request.urlopen(self.url, timeout=5) as answer:  # noqa: S310 - loopback
                answer.read()
            self.scrapes += 1
