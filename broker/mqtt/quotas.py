"""Counted quotas: how many things, and how many bytes, each bucket holds (an access key,
an application, a device's reserve), and whether one more fits. Retained messages
(broker.mqtt.retained) and subscriptions (broker.mqtt.routing) are bounded this way."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Usage:
    count: int = 0
    size: int = 0


@dataclass(frozen=True, slots=True)
class Limit:
    """At most ``count`` things and ``size`` bytes (0 = no limit), set by the settings
    ``names`` (count, size; "" for a bound that does not exist), which the refusal's one
    line names."""

    count: int
    size: int
    names: tuple[str, str]

    def refusal(self, usage: Usage | None, size: int, what: str) -> str | None:
        """Why one more thing of ``size`` bytes does not fit, or None."""
        count, used = (usage.count, usage.size) if usage is not None else (0, 0)
        if (self.count and count >= self.count) or (self.size and used + size > self.size):
            bounds = ", ".join(f"{name} {value}" for name, value in
                               zip(self.names, (self.count, self.size), strict=True) if name)
            return f"{what} quota reached ({bounds})"
        return None


class Quotas:
    """Usage by bucket name; a bucket is forgotten when it holds nothing."""

    __slots__ = ("buckets",)

    def __init__(self) -> None:
        self.buckets: dict[str, Usage] = {}

    def get(self, bucket: str) -> Usage | None:
        return self.buckets.get(bucket)

    def charge(self, bucket: str, size: int, count: int = 1) -> None:
        """Add ``count`` things of ``size`` bytes in all (negative: release them)."""
        usage = self.buckets.get(bucket)
        if usage is None:
            usage = self.buckets[bucket] = Usage()
        usage.count += count
        usage.size += size
        if usage.count <= 0 and usage.size <= 0:
            del self.buckets[bucket]
