"""Connection measurements: connects/s with CONNECT→CONNACK latency, and memory per
idle connection (broker RSS delta). Both run in the bench process with asyncio and are
bounded in count and time."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from .flows import Cred
from .mqttload import Client, MqttError


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def _connect_loop(host: str, port: int, cred: Cred, deadline: float, budget: list[int],
                        latencies: list[float], errors: list[str]) -> None:
    while budget[0] > 0 and time.monotonic() < deadline:
        budget[0] -= 1
        client = Client(host, port)
        try:
            latencies.append(await client.connect(cred.client_id, cred.username, cred.password,
                                                  keepalive=60, timeout=10))
            await client.disconnect()
        except (MqttError, OSError, TimeoutError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            await client.close()
            if len(errors) > 20:
                return


async def measure_connects(host: str, port: int, creds: Sequence[Cred], *, concurrency: int,
                           count: int, seconds: float, warmup: int = 20) -> dict[str, Any]:
    """``concurrency`` workers, worker i always using creds[i % len(creds)], each looping
    connect → CONNACK → DISCONNECT → close, until ``count`` connects or ``seconds``."""
    # Warm-up: a few connects so imports, caches and the first DB pages are in place.
    await _connect_loop(host, port, creds[0], time.monotonic() + 10, [warmup], [], [])
    latencies: list[float] = []
    errors: list[str] = []
    budget = [count]
    started = time.perf_counter()
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(
        _connect_loop(host, port, creds[i % len(creds)], deadline, budget, latencies, errors)
        for i in range(concurrency)
    ))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "mode": "sequential" if concurrency == 1 else f"{concurrency} concurrent",
        "concurrency": concurrency,
        "connects": len(latencies),
        "elapsed_s": round(elapsed, 3),
        "rate": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(_percentile(ordered, 0.50) * 1e3, 3),
        "p99_ms": round(_percentile(ordered, 0.99) * 1e3, 3),
        "max_ms": round(ordered[-1] * 1e3, 3) if ordered else None,
        "mean_ms": round(statistics.fmean(ordered) * 1e3, 3) if ordered else None,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


async def measure_idle_memory(host: str, port: int, creds: Sequence[Cred],
                              rss_kib: Callable[[], int], *, settle: float = 1.0,
                              parallel: int = 32, timeout: float = 120,
                              clean_session: bool = True,
                              subscribe: Callable[[Cred], str] | None = None) -> dict[str, Any]:
    """Open one idle connection per cred (keep-alive 600 s; optionally a persistent
    session holding one subscription) and report the broker's RSS delta per connection;
    every connection is closed afterwards."""
    warm = Client(host, port)
    await warm.connect(creds[0].client_id, creds[0].username, creds[0].password)
    await warm.disconnect()
    await asyncio.sleep(settle)
    before = rss_kib()
    clients: list[Client] = []
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    semaphore = asyncio.Semaphore(parallel)

    async def open_one(cred: Cred) -> None:
        async with semaphore:
            if time.monotonic() > deadline:
                return
            client = Client(host, port)
            try:
                await client.connect(cred.client_id, cred.username, cred.password,
                                     keepalive=600, timeout=30, clean_session=clean_session)
                if subscribe is not None:
                    await client.subscribe([subscribe(cred)], 1, timeout=30)
                clients.append(client)
            except (MqttError, OSError, TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                await client.close()

    started = time.perf_counter()
    try:
        await asyncio.gather(*(open_one(c) for c in creds))
        opened_s = time.perf_counter() - started
        await asyncio.sleep(settle)
        after = rss_kib()
    finally:
        await asyncio.gather(*(c.disconnect() for c in clients), return_exceptions=True)
    n = len(clients)
    return {
        "connections": n,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "rate": round((after - before) / n, 2) if n else None,  # KiB per connection
        "open_s": round(opened_s, 2),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


async def open_many(host: str, port: int, creds: Sequence[Cred], *, in_flight: int,
                    sources: int = 200, clean_session: bool = True,
                    timeout: float = 300) -> tuple[list[Client], dict[str, Any]]:
    """Open one connection per cred with at most ``in_flight`` CONNECTs outstanding, from
    local addresses 127.0.0.2 .. 127.0.0.(sources + 1) in turn; the clients stay open
    (the caller closes them). Returns (clients, rate and CONNACK latency figures)."""
    semaphore = asyncio.Semaphore(in_flight)
    clients: list[Client] = []
    latencies: list[float] = []
    errors: list[str] = []
    present = 0
    deadline = time.monotonic() + timeout

    async def open_one(index: int, cred: Cred) -> None:
        nonlocal present
        async with semaphore:
            if time.monotonic() > deadline:
                return
            client = Client(host, port)
            try:
                latencies.append(await client.connect(
                    cred.client_id, cred.username, cred.password, keepalive=600, timeout=60,
                    clean_session=clean_session, source=f"127.0.0.{index % sources + 2}"))
                present += client.session_present
                clients.append(client)
            except (MqttError, OSError, TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                await client.close()

    started = time.perf_counter()
    await asyncio.gather(*(open_one(i, c) for i, c in enumerate(creds)))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return clients, {
        "in_flight": in_flight,
        "connections": len(clients),
        "elapsed_s": round(elapsed, 2),
        "rate": round(len(clients) / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(_percentile(ordered, 0.50) * 1e3, 2),
        "p99_ms": round(_percentile(ordered, 0.99) * 1e3, 2),
        "session_present": present,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


async def close_all(clients: Sequence[Client], parallel: int = 512) -> None:
    semaphore = asyncio.Semaphore(parallel)

    async def close(client: Client) -> None:
        async with semaphore:
            await client.disconnect()

    await asyncio.gather(*(close(c) for c in clients), return_exceptions=True)
