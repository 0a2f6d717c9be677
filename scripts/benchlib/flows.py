"""Message-rate measurements: publishers and subscribers in two separate processes.

The subscriber process holds every receiving connection (main subscribers, an optional
observer such as another scope's ``#`` subscriber, and an optional idle client holding
many subscriptions); the publisher process holds the publishers. They share counters in
shared memory. The publisher keeps at most ``window`` messages in flight (published but
not yet counted by the subscribers), so broker queues stay bounded and the rate is the
broker's sustained throughput. The parent starts both, waits for both to be ready,
releases them, skips ``warmup`` seconds, then reads the counters over a fixed
``measure`` window. Every phase has a deadline; children are killed if they overrun.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .mqttload import (
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    Client,
    QosPublisher,
    puback_packet,
    pubcomp_packet,
    publish_packet,
    pubrec_packet,
    pubrel_packet,
)

MP = mp.get_context("fork")


@dataclass(frozen=True)
class Cred:
    client_id: str
    username: str | None = None
    password: str | None = None


@dataclass(frozen=True)
class FlowSpec:
    host: str
    port: int
    topic: str
    qos: int = 0
    payload_size: int = 64
    publishers: tuple[Cred, ...] = ()
    subscribers: tuple[Cred, ...] = ()
    sub_filter: str = ""
    observer: tuple[Cred, str] | None = None  # counted apart, e.g. another scope's '#'
    idle: tuple[Cred, int] | None = None  # holds N filters fleet/dev{i}/command
    warmup: float = 1.0
    measure: float = 5.0
    window: int = 1000  # in published messages
    setup_timeout: float = 120.0
    subscribe_batch: int = 500
    sub_processes: int = 1  # subscribers are split over this many processes
    sub_clean_session: bool = True  # False: subscribers hold persistent sessions
    sub_port: int | None = None  # subscribers (and observer, idle) connect here; None: port
    protocol: int = 4  # 4: MQTT 3.1.1, 5: MQTT 5.0 (every connection of the flow)


class _Shared:
    """Counters in shared memory; each has exactly one writing process."""

    def __init__(self, sub_processes: int) -> None:
        self.received = [MP.RawValue("q", 0) for _ in range(sub_processes)]
        self.observed = MP.RawValue("q", 0)
        self.sent = MP.RawValue("q", 0)
        self.go = MP.Event()
        self.stop = MP.Event()

    def total_received(self) -> int:
        return sum(counter.value for counter in self.received)


def idle_filters(n: int) -> list[str]:
    return [f"fleet/dev{i}/command" for i in range(n)]


async def _until(event: Any, deadline: float) -> None:
    while not event.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def _connect(spec: FlowSpec, cred: Cred, port: int | None = None,
                   clean_session: bool = True) -> Client:
    client = Client(spec.host, port or spec.port)
    await client.connect(cred.client_id, cred.username, cred.password,
                         clean_session=clean_session, protocol=spec.protocol)
    return client


# ------------------------------------------------------------------ subscriber side


async def _count_into(client: Client, counter: Any, stop: asyncio.Event, info: dict[str, Any],
                      expect_topic: str | None) -> None:
    try:
        while not stop.is_set():
            frames = await client.read_frames(timeout=0.1)
            n = 0
            acks = []
            for ptype, flags, body in frames:
                if ptype == PUBLISH:
                    n += 1
                    if flags & 0x06:
                        tlen = int.from_bytes(body[:2], "big")
                        packet_id = int.from_bytes(body[2 + tlen:4 + tlen], "big")
                        acks.append(pubrec_packet(packet_id) if flags & 0x04
                                    else puback_packet(packet_id))
                elif ptype == PUBREL:  # QoS 2, second half
                    acks.append(pubcomp_packet(int.from_bytes(body[:2], "big")))
            if n:
                if expect_topic is not None and "first_topic" not in info:
                    ptype, flags, body = next(f for f in frames if f[0] == PUBLISH)
                    tlen = int.from_bytes(body[:2], "big")
                    info["first_topic"] = body[2:2 + tlen].decode("utf-8", "replace")
                counter.value += n
            if acks:
                client.write(b"".join(acks))
    except Exception as exc:  # a dropped connection is a result, not a crash
        info.setdefault("errors", []).append(f"{type(exc).__name__}: {exc}")


async def _subscriber_main(spec: FlowSpec, shared: _Shared, conn: Any, part: int) -> None:
    """Process ``part`` of ``spec.sub_processes``: its share of the subscribers; part 0
    also holds the idle client and the observer."""
    info: dict[str, Any] = {}
    deadline = time.monotonic() + spec.setup_timeout
    clients: list[Client] = []
    try:
        if spec.idle is not None and part == 0:
            cred, n = spec.idle
            idle = await _connect(spec, cred, spec.sub_port)
            clients.append(idle)
            started = time.perf_counter()
            codes = await idle.subscribe(idle_filters(n), 0, batch=spec.subscribe_batch,
                                         timeout=max(1.0, deadline - time.monotonic()))
            info["idle_subscribe_s"] = round(time.perf_counter() - started, 3)
            info["idle_granted"] = sum(1 for c in codes if c < 0x80)
            info["idle_filters"] = n
        subs = []
        for cred in spec.subscribers[part::spec.sub_processes]:
            client = await _connect(spec, cred, spec.sub_port, spec.sub_clean_session)
            codes = await client.subscribe([spec.sub_filter], spec.qos, timeout=10)
            info.setdefault("sub_granted", []).extend(codes)
            subs.append(client)
        clients.extend(subs)
        observer = None
        if spec.observer is not None and part == 0:
            cred, flt = spec.observer
            observer = await _connect(spec, cred, spec.sub_port)
            info["observer_granted"] = await observer.subscribe([flt], 0, timeout=10)
            clients.append(observer)
    except Exception as exc:
        conn.send(("error", f"subscriber setup: {type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_count_into(c, shared.received[part], stop, info, spec.topic))
             for c in subs]
    if observer is not None:
        tasks.append(asyncio.create_task(
            _count_into(observer, shared.observed, stop, info, spec.topic)))
    await _until(shared.stop, time.monotonic() + spec.setup_timeout + spec.warmup
                 + spec.measure + 30)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    for client in clients:
        await client.disconnect()
    conn.send(("done", info))


# ------------------------------------------------------------------- publisher side


async def _drain_acks(client: Client, acks: list[int], stop: asyncio.Event,
                      info: dict[str, Any]) -> None:
    try:
        while not stop.is_set():
            releases = []
            for ptype, _, body in await client.read_frames(timeout=0.1):
                if ptype in (PUBACK, PUBCOMP):
                    acks[0] += 1
                elif ptype == PUBREC:  # QoS 2: release it
                    releases.append(pubrel_packet(int.from_bytes(body[:2], "big")))
            if releases:
                client.write(b"".join(releases))
    except Exception as exc:
        info.setdefault("errors", []).append(f"{type(exc).__name__}: {exc}")


async def _publisher_main(spec: FlowSpec, shared: _Shared, conn: Any) -> None:
    info: dict[str, Any] = {}
    payload = bytes(range(spec.payload_size % 256)) * (spec.payload_size // 256 + 1)
    payload = payload[:spec.payload_size]
    try:
        pubs = [await _connect(spec, cred) for cred in spec.publishers]
    except Exception as exc:
        conn.send(("error", f"publisher setup: {type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    stop = asyncio.Event()
    acks = [0]
    readers = [asyncio.create_task(_drain_acks(p, acks, stop, info)) for p in pubs]
    await _until(shared.go, time.monotonic() + spec.setup_timeout)
    fanout = max(1, len(spec.subscribers))
    qos0 = publish_packet(spec.topic, payload, 0, protocol=spec.protocol)
    makers = [QosPublisher(spec.topic, payload, spec.qos or 1, spec.protocol) for _ in pubs]
    burst = max(1, min(16, spec.window // 2))
    sent = 0
    index = 0
    hard_deadline = time.monotonic() + spec.warmup + spec.measure + 60
    total_received, sent_shared, stopped = shared.total_received, shared.sent, shared.stop
    while not stopped.is_set() and time.monotonic() < hard_deadline:
        room = spec.window - (sent - total_received() // fanout)
        if room < burst:
            await asyncio.sleep(0.0005)
            continue
        client = pubs[index]
        if spec.qos:
            maker = makers[index]
            client.write(b"".join(maker.next() for _ in range(burst)))
        else:
            client.write(qos0 * burst)
        index = (index + 1) % len(pubs)
        sent += burst
        sent_shared.value = sent
        await client.drain()
    stop.set()
    await asyncio.gather(*readers, return_exceptions=True)
    info["pubacks"] = acks[0]
    for client in pubs:
        await client.disconnect()
    conn.send(("done", info))


def _child(target: Any, spec: FlowSpec, shared: _Shared, conn: Any, *extra: Any) -> None:
    try:
        asyncio.run(target(spec, shared, conn, *extra))
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc(limit=5)))


def _recv(conn: Any, timeout: float, who: str) -> tuple[str, Any]:
    if not conn.poll(timeout):
        return "error", f"{who}: no answer within {timeout:.0f}s"
    try:
        return conn.recv()  # type: ignore[no-any-return]
    except EOFError:
        return "error", f"{who}: process exited"


def _merge(infos: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = dict(infos[0])
    for info in infos[1:]:
        for key in ("sub_granted", "errors"):
            if key in info:
                merged[key] = merged.get(key, []) + info[key]
    return merged


def run_flow(spec: FlowSpec, sample: Callable[[], float] | None = None) -> dict[str, Any]:
    """Run one measurement; returns rates and counts (or an 'error' entry). ``sample()``
    (e.g. the broker's CPU seconds) is read at both ends of the measured window; the
    difference is ``sampled``."""
    parts = max(1, min(spec.sub_processes, len(spec.subscribers)))
    spec = replace(spec, sub_processes=parts)
    shared = _Shared(parts)
    sub_pipes = [MP.Pipe() for _ in range(parts)]
    pub_parent, pub_child = MP.Pipe()
    procs = [MP.Process(target=_child, args=(_subscriber_main, spec, shared, child, part),
                        daemon=True)
             for part, (_, child) in enumerate(sub_pipes)]
    result: dict[str, Any] = {"warmup_s": spec.warmup, "window_s": spec.measure,
                              "subscriber_processes": parts}
    try:
        for proc in procs:
            proc.start()
        for parent, _ in sub_pipes:
            state, detail = _recv(parent, spec.setup_timeout + 10, "subscribers")
            if state != "ready":
                return {**result, "error": detail}
        procs.append(MP.Process(target=_child, args=(_publisher_main, spec, shared, pub_child),
                                daemon=True))
        procs[-1].start()
        state, detail = _recv(pub_parent, 60, "publishers")
        if state != "ready":
            return {**result, "error": detail}
        shared.go.set()
        time.sleep(spec.warmup)
        c0 = sample() if sample is not None else 0.0
        r0, s0, t0 = shared.total_received(), shared.sent.value, time.perf_counter()
        time.sleep(spec.measure)
        r1, s1, t1 = shared.total_received(), shared.sent.value, time.perf_counter()
        if sample is not None:
            result["sampled"] = sample() - c0
        shared.stop.set()
        elapsed = t1 - t0
        result.update(
            rate=round((r1 - r0) / elapsed, 1),
            publish_rate=round((s1 - s0) / elapsed, 1),
            delivered_in_window=r1 - r0,
            published_in_window=s1 - s0,
            window_s=round(elapsed, 3),
        )
        infos = []
        for parent, _ in sub_pipes:
            state, detail = _recv(parent, 30, "subscribers")
            if state == "done":
                infos.append(detail)
            else:
                result.setdefault("errors", []).append(detail)
        if infos:
            result["subscribers"] = _merge(infos)
        state, detail = _recv(pub_parent, 30, "publishers")
        if state == "done":
            result["publishers"] = detail
        else:
            result.setdefault("errors", []).append(detail)
        if spec.observer is not None:
            result["observer_received"] = shared.observed.value
        return result
    finally:
        shared.stop.set()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
