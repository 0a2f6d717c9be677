"""What the daemon counts (docs/observability.md), and how Prometheus reads it.

On the hot path only plain integers move: each component counts its own events in
attributes it owns (``Traffic`` for messages and denials, the auth plugin and
``KeyBroker`` for CONNECTs, the registry for kicks, the guard for bans, the audit log for
suppressed lines) — no lock, no allocation per message. Latencies go into ``Buckets``
(fixed bucket counts, one bisect per observation). ``BrokerCollector`` turns all of it
into Prometheus metric families at scrape time, with the well-kept ``prometheus-client``
writing the exposition format; gauges (connections, sessions, queues, retained messages,
subscriptions) are read off the live structures then. Label values come from fixed sets
(QoS, listener names from the config, refusal reasons, kick causes): never a device id,
key or topic.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from broker.core.counters import KICK_CAUSES, Buckets
from broker.core.periodic import Periodic

if TYPE_CHECKING:
    from broker.core.audit import AuditLog
    from broker.mqtt.broker import KeyBroker
    from broker.policy.guard import BruteForceGuard
    from broker.services.live import ChangeWatcher, FeedReader
    from keystore import KeyStore

PROTOCOLS = {4: "3.1.1", 5: "5.0"}  # MQTT protocol levels, as metrics name them


class LoopProbe(Periodic):
    """Event-loop lag: how late a timer fires, measured every ``interval`` seconds."""

    name = "keybroker-loop-probe"

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(interval)
        self.lag = Buckets((0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0))
        self.last = 0.0
        self.last_seen = time.monotonic()
        self._due = 0.0

    async def start(self) -> None:
        self._due = asyncio.get_running_loop().time() + self.interval
        self.start_ticking()

    async def tick(self) -> None:
        now = asyncio.get_running_loop().time()
        self.last = max(0.0, now - self._due)
        self.lag.observe(self.last)
        self._due = now + self.interval
        self.last_seen = time.monotonic()


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    msgs_in: int
    msgs_out: int
    refused: int
    connected: int


class History(Periodic):
    """A sample of the main counters every ``interval`` seconds for the last ``keep``
    samples: the console's status page computes rates from it."""

    name = "keybroker-metrics-history"

    def __init__(self, collector: BrokerCollector, interval: float = 5.0,
                 keep: int = 200) -> None:
        super().__init__(interval)
        self.collector = collector
        self.samples: deque[Sample] = deque(maxlen=keep)

    async def start(self) -> None:
        self.samples.append(self.collector.sample())
        self.start_ticking()

    async def tick(self) -> None:
        self.samples.append(self.collector.sample())

    def since(self, seconds: float) -> tuple[Sample, Sample] | None:
        """(oldest sample within ``seconds``, now), or None before two samples exist."""
        now = self.collector.sample()
        older = [s for s in self.samples if now.at - s.at <= seconds + 0.5]
        return (older[0], now) if older else None


class BrokerCollector(Collector):
    """Prometheus families read off one daemon's components at scrape time."""

    def __init__(self, broker: KeyBroker, watcher: ChangeWatcher | None,
                 probe: LoopProbe | None) -> None:
        self.broker = broker
        self.watcher = watcher
        self.probe = probe

    def sample(self) -> Sample:
        broker = self.broker
        traffic = broker.traffic
        return Sample(time.monotonic(), sum(traffic.msgs_in), sum(traffic.msgs_out),
                      sum(broker.connects_refused.values()),
                      sum(1 for s in broker.registry.sessions.values() if s.online))

    def collect(self) -> Iterator[Metric]:
        yield from self._connections()
        yield from self._traffic()
        yield from self._state()
        yield from self._health()

    def _connections(self) -> Iterator[Metric]:
        broker = self.broker
        open_ = GaugeMetricFamily("keybroker_connections", "Open MQTT connections",
                                  labels=["listener"])
        by_listener = dict.fromkeys((item.name for item in broker.settings.listeners), 0)
        for connection in broker.admission.connections:
            name = connection.info.listener
            by_listener[name] = by_listener.get(name, 0) + 1
        for name, count in sorted(by_listener.items()):
            open_.add_metric([name], count)
        yield open_
        accepted = CounterMetricFamily("keybroker_connects_accepted",
                                       "CONNECTs accepted (CONNACK 0)")
        accepted.add_metric([], broker.connects_accepted)
        yield accepted
        refused = CounterMetricFamily(
            "keybroker_connects_refused",
            "CONNECTs refused, by CONNACK code and reason (docs/access.md#connect)",
            labels=["code", "reason"])
        for (code, reason), count in sorted(broker.connects_refused.items()):
            refused.add_metric([str(code), reason], count)
        for reason, count in sorted(broker.admission.invalid.items()):
            refused.add_metric(["none", reason], count)  # no valid CONNECT at all
        yield refused
        connacks = CounterMetricFamily(
            "keybroker_connacks", "CONNACKs sent, by protocol (3.1.1, 5.0, or other for "
            "an unsupported level) and return or reason code (0: accepted)",
            labels=["protocol", "code"])
        for (level, code), count in sorted(broker.admission.connacks.items()):
            connacks.add_metric([PROTOCOLS.get(level, "other"), str(code)], count)
        yield connacks
        yield broker.connack_latency.family(
            "keybroker_connect_seconds", "CONNECT read to CONNACK written")
        auth = broker.auth_plugin
        if auth is not None:
            yield auth.lookup_latency.family(
                "keybroker_keystore_lookup_seconds", "Keystore lookup of one CONNECT")

    def _traffic(self) -> Iterator[Metric]:
        traffic = self.broker.traffic
        for name, values, what in (
                ("keybroker_messages_received", traffic.msgs_in, "PUBLISH accepted"),
                ("keybroker_received_bytes", traffic.bytes_in, "Payload bytes accepted"),
                ("keybroker_messages_sent", traffic.msgs_out, "PUBLISH written to sessions"),
                ("keybroker_sent_bytes", traffic.bytes_out, "PUBLISH bytes written")):
            family = CounterMetricFamily(name, what + ", by QoS", labels=["qos"])
            for qos, value in enumerate(values):
                family.add_metric([str(qos)], value)
            yield family
        denied = CounterMetricFamily("keybroker_denials", "Denied PUBLISH, SUBSCRIBE filters, "
                                     "deliveries and retained messages", labels=["kind"])
        for kind, value in traffic.denied.items():
            denied.add_metric([kind], value)
        yield denied
        dropped = CounterMetricFamily("keybroker_messages_dropped",
                                      "Messages for a session not kept, by reason",
                                      labels=["reason"])
        for reason, value in traffic.dropped.items():
            dropped.add_metric([reason], value)
        yield dropped
        flow = self.broker.flow_counters
        paused = GaugeMetricFamily("keybroker_publishers_paused",
                                   "Connections paused now: a session they feed is past "
                                   "its bounds")
        paused.add_metric([], flow.paused)
        yield paused
        counted: tuple[tuple[str, float, str], ...] = (
                ("keybroker_publisher_pauses", flow.pauses, "Pauses of publishing connections"),
                ("keybroker_publisher_pause_seconds", flow.pause_seconds,
                 "Seconds publishing connections spent paused (ended pauses)"),
                ("keybroker_slow_consumers", flow.slow_consumers,
                 "Sessions disconnected for draining nothing past their bounds"))
        for name, amount, what in counted:
            counter = CounterMetricFamily(name, what)
            counter.add_metric([], amount)
            yield counter

    def _state(self) -> Iterator[Metric]:
        broker = self.broker
        sessions = broker.registry.sessions.values()
        persistent = online = queued = queued_bytes = 0
        for session in sessions:
            persistent += not session.clean_session
            online += session.online
            queued += len(session.outbox)
            queued_bytes += session.outbox.held_bytes
        for name, value, what in (
                ("keybroker_sessions", len(broker.registry), "Sessions (online and offline)"),
                ("keybroker_sessions_online", online, "Sessions with a live connection"),
                ("keybroker_sessions_persistent", persistent, "Sessions with clean_session 0"),
                ("keybroker_queued_messages", queued, "QoS 1/2 messages in flight or waiting"),
                ("keybroker_queued_bytes", queued_bytes, "Bytes of those messages"),
                ("keybroker_subscriptions", len(broker.router.subtree), "Subscriptions"),
                ("keybroker_retained_messages", broker.router.retained.usage.count,
                 "Retained messages"),
                ("keybroker_retained_bytes", broker.router.retained.usage.size,
                 "Bytes of retained messages (topic and payload)")):
            gauge = GaugeMetricFamily(name, what)
            gauge.add_metric([], value)
            yield gauge
        kicks = CounterMetricFamily("keybroker_kicks", "Sessions disconnected by the daemon",
                                    labels=["cause"])
        for cause in (*KICK_CAUSES, "other"):
            kicks.add_metric([cause], broker.registry.kicks.get(cause, 0))
        yield kicks

    def _health(self) -> Iterator[Metric]:
        yield from health_families(self.broker.guard, self.broker.audit, self.watcher,
                                   self.probe)


def health_families(guard: BruteForceGuard | None, audit: AuditLog,
                    reader: FeedReader | None, probe: LoopProbe | None) -> Iterator[Metric]:
    """Guard bans, suppressed audit lines, change-feed and event-loop lag: the families the
    daemon and ``keybroker authsvc`` share."""
    bans = CounterMetricFamily("keybroker_guard_bans", "Sources banned by the brute-force "
                               "guard (MQTT, API and console failures alike)")
    bans.add_metric([], guard.bans if guard is not None else 0)
    yield bans
    banned = GaugeMetricFamily("keybroker_guard_banned_sources", "Sources banned now")
    banned.add_metric([], guard.banned_count(time.monotonic()) if guard is not None else 0)
    yield banned
    suppressed = CounterMetricFamily("keybroker_audit_suppressed",
                                     "Audit lines not written (per-source and per-session "
                                     "limits)")
    suppressed.add_metric([], audit.suppressed)
    yield suppressed
    if reader is not None:
        lag = GaugeMetricFamily("keybroker_change_feed_lag_seconds",
                                "Seconds since the change feed was last read")
        lag.add_metric([], max(0.0, time.monotonic() - reader.last_read))
        yield lag
    if probe is not None:
        yield probe.lag.family("keybroker_event_loop_lag_seconds",
                            "How late a 0.5 s timer fired")


@dataclass(slots=True)
class Observability:
    """One daemon's metrics registry, loop probe and counter history."""

    registry: CollectorRegistry
    collector: BrokerCollector
    probe: LoopProbe
    history: History

    @classmethod
    def of(cls, broker: KeyBroker, watcher: ChangeWatcher | None) -> Observability:
        probe = LoopProbe()
        collector = BrokerCollector(broker, watcher, probe)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        return cls(registry, collector, probe, History(collector))

    async def start(self) -> None:
        await self.probe.start()
        await self.history.start()

    async def stop(self) -> None:
        await self.history.stop_ticking()
        await self.probe.stop_ticking()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


READY_TIMEOUT = 2.0  # seconds the keystore has to answer a readiness probe


async def keystore_answers(keystore: KeyStore) -> bool:
    """Does the keystore answer (its change marker) within READY_TIMEOUT?"""
    try:
        await asyncio.wait_for(keystore.change_marker(), READY_TIMEOUT)
    except Exception:  # noqa: BLE001 - any failure means "not ready"
        return False
    return True
