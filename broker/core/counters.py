"""The counting primitives of broker.services.metrics, kept apart so that the parts that count
(routing, sessions, the auth plugin, the broker) import nothing else of it: plain ints on
the hot path, fixed latency buckets, bounded label sets."""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client.core import HistogramMetricFamily

DENIAL_KINDS = ("publish", "subscribe", "delivery", "retain")
KICK_CAUSES = ("slow_consumer", "operator_kick", "key_deleted", "key_inactive", "key_expired",
               "ip_denied", "device_deleted", "app_deleted")
# Why a message for a session was not kept (keybroker_messages_dropped_total{reason}):
# QoS 1/2 for an offline session past its bounds; QoS 0 for a live session past twice its
# byte bound; QoS 1/2 that could not wait (HTTP API, Will) for a live session past four
# times its bounds; QoS 1/2 held for a session that may no longer read their topic (its
# key changed); an MQTT 5 message whose Message Expiry Interval passed before it was sent,
# or larger than the Maximum Packet Size its subscriber takes.
DROP_REASONS = ("offline_queue_full", "qos0_past_bounds", "live_queue_full", "not_readable",
                "expired", "too_large_for_client")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Traffic:
    """Messages in and out by QoS, their bytes, and denials by kind (plain ints)."""

    __slots__ = ("msgs_in", "bytes_in", "msgs_out", "bytes_out", "denied", "dropped")

    def __init__(self) -> None:
        self.msgs_in = [0, 0, 0]
        self.bytes_in = [0, 0, 0]
        self.msgs_out = [0, 0, 0]
        self.bytes_out = [0, 0, 0]
        self.denied = dict.fromkeys(DENIAL_KINDS, 0)
        self.dropped = dict.fromkeys(DROP_REASONS, 0)


class FlowCounters:
    """Flow control (broker.mqtt.flow): publishers paused now and in all, for how long, and
    the slow consumers disconnected."""

    __slots__ = ("paused", "pauses", "pause_seconds", "slow_consumers", "held")

    def __init__(self) -> None:
        self.paused = 0  # connections paused now
        self.held = 0  # bytes of packets paused connections hold, all together
        self.pauses = 0
        self.pause_seconds = 0.0  # of pauses that have ended
        self.slow_consumers = 0


class Buckets:
    """A latency histogram as fixed bucket counts (seconds)."""

    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.count += 1

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            cumulative.append((bound, running))
        return HistogramMetricFamily(name, documentation, buckets=cumulative,
                                     sum_value=self.total)


def count_into(table: dict[str, int], key: str, allowed: tuple[str, ...]) -> None:
    """Count ``key`` in ``table``, as "other" when it is not one of ``allowed``."""
    key = key if key in allowed else "other"
    table[key] = table.get(key, 0) + 1
