"""Publishers paced only by their own PUBACKs, as paho, mosquitto_pub and every client
library pace them: each keeps ``inflight`` QoS 1 PUBLISHes unacknowledged and sends the
next one when a PUBACK arrives. Subscribers acknowledge every PUBLISH the moment they read
it. Nothing waits for what the subscribers received, so a broker that batches, queues or
drops shows it: the result is delivered / sent per subscriber, next to msg/s.

``run_burst`` runs one workload in this process (the tests use it); the bench runs the
same coroutines with publishers and subscribers in two processes (``run_burst_split``).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from .flows import Cred
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
    pubrec_packet,
    pubrel_packet,
)

MP = mp.get_context("fork")


@dataclass(frozen=True)
class Device:
    """One publisher: its credentials, its topic, the local address it connects from."""

    cred: Cred
    topic: str
    source: str | None = None  # e.g. 127.0.0.7: one address per device


@dataclass(frozen=True)
class BurstSpec:
    host: str
    port: int
    publishers: tuple[Device, ...]
    subscribers: tuple[Cred, ...]
    sub_filter: str
    messages: int  # per publisher
    inflight: int  # PUBLISHes a publisher keeps unacknowledged
    qos: int = 1
    payload: int = 64
    stalled: tuple[Cred, ...] = ()  # subscribe, then never acknowledge anything
    timeout: float = 120.0  # the whole run, connecting included
    settle: float = 2.0  # after the last PUBACK: seconds without a delivery that end the run


@dataclass
class BurstResult:
    sent: int = 0  # PUBLISHes acknowledged by the broker
    delivered: list[int] = field(default_factory=list)  # per subscriber
    stalled_received: list[int] = field(default_factory=list)
    seconds: float = 0.0  # first PUBLISH to last PUBACK
    disconnected: list[str] = field(default_factory=list)  # client ids the broker closed
    errors: list[str] = field(default_factory=list)
    # The prompt subscribers' deliveries/s once a stalled subscriber was disconnected
    # (over their whole run when none was)
    rate_after_stall: float | None = None

    @property
    def complete(self) -> bool:
        expected = self.sent
        return not self.errors and all(n == expected for n in self.delivered)

    @property
    def rate(self) -> float:
        """Deliveries per second over all subscribers."""
        return sum(self.delivered) / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"sent": self.sent, "delivered": self.delivered,
                "delivered_min": min(self.delivered, default=0),
                "stalled_received": self.stalled_received,
                "seconds": round(self.seconds, 3), "msg_per_s": round(self.rate, 1),
                "disconnected": self.disconnected, "errors": self.errors[:5],
                "complete": self.complete,
                "rate_after_stall": None if self.rate_after_stall is None
                else round(self.rate_after_stall, 1)}


async def publish_paced(client: Client, topic: str, count: int, inflight: int,
                        payload: bytes, qos: int = 1) -> int:
    """Publish ``count`` messages keeping ``inflight`` unacknowledged; the number the
    broker acknowledged (PUBACK, or PUBCOMP at QoS 2)."""
    maker = QosPublisher(topic, payload, qos)
    sent = min(inflight, count)
    client.write(b"".join(maker.next() for _ in range(sent)))
    done = 0
    while done < count:
        frames = await client.read_frames(timeout=None)
        replies = []
        for ptype, _, body in frames:
            if ptype in (PUBACK, PUBCOMP):
                done += 1
                if sent < count:
                    replies.append(maker.next())
                    sent += 1
            elif ptype == PUBREC:
                replies.append(pubrel_packet(int.from_bytes(body[:2], "big")))
        if replies:
            client.write(b"".join(replies))
    return done


async def acknowledge_all(client: Client, counter: list[int], index: int,
                          times: list[list[float]], stop: asyncio.Event,
                          acknowledge: bool = True) -> None:
    """Count every PUBLISH read and (``acknowledge``) answer it at once."""
    while not stop.is_set():
        frames = await client.read_frames(timeout=0.1)
        acks = []
        count = 0
        for ptype, flags, body in frames:
            if ptype == PUBLISH:
                count += 1
                if flags & 0x06 and acknowledge:
                    tlen = int.from_bytes(body[:2], "big")
                    packet_id = int.from_bytes(body[2 + tlen:4 + tlen], "big")
                    acks.append(pubrec_packet(packet_id) if flags & 0x04
                                else puback_packet(packet_id))
            elif ptype == PUBREL and acknowledge:
                acks.append(pubcomp_packet(int.from_bytes(body[:2], "big")))
        if count:
            now = time.perf_counter()
            if not counter[index]:
                times[index][0] = now
            times[index][1] = now
            counter[index] += count
        if acks:
            client.write(b"".join(acks))


async def _connect(spec: BurstSpec, cred: Cred, source: str | None = None) -> Client:
    client = Client(spec.host, spec.port)
    await client.connect(cred.client_id, cred.username, cred.password, source=source)
    return client


async def _subscribe(spec: BurstSpec, creds: tuple[Cred, ...]) -> list[Client]:
    clients = []
    for cred in creds:
        client = await _connect(spec, cred)
        codes = await client.subscribe([spec.sub_filter], spec.qos, timeout=10)
        if codes[0] >= 0x80:
            raise RuntimeError(f"{cred.client_id}: SUBSCRIBE {spec.sub_filter!r} refused")
        clients.append(client)
    return clients


class _Readers:
    """The subscribers' reading tasks, and which of them the broker disconnected."""

    def __init__(self, spec: BurstSpec, subs: list[Client], stalled: list[Client]) -> None:
        self.counts = [0] * len(subs)
        self.stalled_counts = [0] * len(stalled)
        self.times = [[0.0, 0.0] for _ in subs]
        self.stalled_times = [[0.0, 0.0] for _ in stalled]
        self.stop = asyncio.Event()
        self.disconnected: list[str] = []
        self.cut: tuple[float, int] | None = None  # (when, deliveries so far)
        names = [c.client_id for c in spec.subscribers] + [c.client_id for c in spec.stalled]
        self.tasks = [
            asyncio.create_task(self._guard(name, acknowledge_all(
                client, counts, index, times, self.stop, acknowledge)))
            for name, (client, counts, index, times, acknowledge) in zip(names, [
                *((c, self.counts, i, self.times, True) for i, c in enumerate(subs)),
                *((c, self.stalled_counts, i, self.stalled_times, False)
                  for i, c in enumerate(stalled))], strict=True)]

    async def _guard(self, name: str, reading: Any) -> None:
        try:
            await reading
        except Exception:  # noqa: BLE001 - a closed connection is a result
            self.disconnected.append(name)
            if self.cut is None:
                self.cut = (time.perf_counter(), sum(self.counts))

    def rate_after_stall(self) -> float | None:
        """Deliveries/s of the prompt subscribers after the first disconnection (over
        their whole run when there was none)."""
        last = max((t[1] for t in self.times), default=0.0)
        start, before = self.cut or (min((t[0] for t in self.times if t[0]), default=0.0), 0)
        if last <= start:
            return None
        return (sum(self.counts) - before) / (last - start)

    async def settle(self, expected: int, quiet: float) -> None:
        """Until every subscriber has ``expected`` messages, or none got one for ``quiet``
        seconds (the rest is not coming)."""
        last, since = sum(self.counts), time.monotonic()
        while min(self.counts, default=expected) < expected:
            await asyncio.sleep(0.02)
            total = sum(self.counts)
            if total != last:
                last, since = total, time.monotonic()
            elif time.monotonic() - since > quiet:
                return

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def run_burst(spec: BurstSpec) -> BurstResult:
    """The whole workload in this event loop."""
    result = BurstResult()
    payload = bytes(spec.payload)
    clients: list[Client] = []
    try:
        async with asyncio.timeout(spec.timeout):
            subs = await _subscribe(spec, spec.subscribers)
            stalled = await _subscribe(spec, spec.stalled)
            clients += subs + stalled
            pubs = [await _connect(spec, d.cred, d.source) for d in spec.publishers]
            clients += pubs
            readers = _Readers(spec, subs, stalled)
            started = time.perf_counter()
            acked = await asyncio.gather(*(
                publish_paced(client, device.topic, spec.messages, spec.inflight, payload,
                              spec.qos)
                for client, device in zip(pubs, spec.publishers, strict=True)),
                return_exceptions=True)
            result.seconds = time.perf_counter() - started
            for device, outcome in zip(spec.publishers, acked, strict=True):
                if isinstance(outcome, BaseException):
                    result.errors.append(f"{device.cred.client_id}: {outcome!r}")
                else:
                    result.sent += outcome
            await readers.settle(result.sent, spec.settle)
            await readers.finish()
            result.delivered = readers.counts
            result.stalled_received = readers.stalled_counts
            result.disconnected = readers.disconnected
            result.rate_after_stall = readers.rate_after_stall()
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        result.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    return result


# ------------------------------------------------------------------ two processes


def _child(role: str, spec: BurstSpec, conn: Any) -> None:
    try:
        asyncio.run(_side(role, spec, conn))
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc(limit=5)))


async def _side(role: str, spec: BurstSpec, conn: Any) -> None:
    if role == "sub":
        subs = await _subscribe(spec, spec.subscribers)
        stalled = await _subscribe(spec, spec.stalled)
        readers = _Readers(spec, subs, stalled)
        conn.send(("ready", None))
        total = await asyncio.to_thread(conn.recv)  # the publishers' acknowledged count
        await readers.settle(total, spec.settle)
        await readers.finish()
        conn.send(("done", {"delivered": readers.counts, "stalled": readers.stalled_counts,
                            "disconnected": readers.disconnected,
                            "after": readers.rate_after_stall()}))
        await asyncio.gather(*(c.close() for c in subs + stalled), return_exceptions=True)
        return
    payload = bytes(spec.payload)
    pubs = [await _connect(spec, d.cred, d.source) for d in spec.publishers]
    conn.send(("ready", None))
    await asyncio.to_thread(conn.recv)  # go
    started = time.perf_counter()
    acked = await asyncio.gather(*(
        publish_paced(client, device.topic, spec.messages, spec.inflight, payload, spec.qos)
        for client, device in zip(pubs, spec.publishers, strict=True)),
        return_exceptions=True)
    seconds = time.perf_counter() - started
    errors = [repr(a) for a in acked if isinstance(a, BaseException)]
    sent = sum(a for a in acked if isinstance(a, int))
    conn.send(("done", {"sent": sent, "seconds": seconds, "errors": errors}))
    await asyncio.gather(*(c.close() for c in pubs), return_exceptions=True)


def run_burst_split(spec: BurstSpec) -> BurstResult:
    """The workload with subscribers and publishers in two processes of their own, so
    that the load generator is not what limits the rate."""
    result = BurstResult()
    pipes = {role: MP.Pipe() for role in ("sub", "pub")}
    procs = {role: MP.Process(target=_child, args=(role, spec, pipes[role][1]), daemon=True)
             for role in pipes}
    try:
        for role in ("sub", "pub"):
            procs[role].start()
            state, detail = _recv(pipes[role][0], spec.timeout)
            if state != "ready":
                result.errors.append(f"{role}: {detail}")
                return result
        pipes["pub"][0].send("go")
        state, pub = _recv(pipes["pub"][0], spec.timeout)
        if state != "done":
            result.errors.append(f"publishers: {pub}")
            pipes["sub"][0].send(0)
            return result
        result.sent, result.seconds, result.errors = pub["sent"], pub["seconds"], pub["errors"]
        pipes["sub"][0].send(result.sent)
        state, sub = _recv(pipes["sub"][0], spec.settle + 30)
        if state != "done":
            result.errors.append(f"subscribers: {sub}")
            return result
        result.delivered, result.stalled_received = sub["delivered"], sub["stalled"]
        result.disconnected, result.rate_after_stall = sub["disconnected"], sub["after"]
        return result
    finally:
        for proc in procs.values():
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def _recv(conn: Any, timeout: float) -> tuple[str, Any]:
    if not conn.poll(timeout):
        return "error", f"no answer within {timeout:.0f}s"
    try:
        return conn.recv()  # type: ignore[no-any-return]
    except EOFError:
        return "error", "process exited"
