"""Brute-force guard: too many failed CONNECTs from one client IP within a window bans that
IP for a while; the ban doubles on each repeat offence up to a cap (docs/limits.md#guard).

Pure and synchronous (time is passed in), so it is tested without sockets. Memory is
bounded: at most ``max_tracked`` unbanned sources are remembered (least recently failed
dropped first) and at most as many banned ones, so an attack from many addresses cannot
grow the daemon without limit; bans are never the ones dropped.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from broker.policy.addresses import source_of


@dataclass(frozen=True, slots=True)
class GuardSettings:
    max_failures: int = 20
    window: float = 60.0
    ban: float = 60.0
    max_ban: float = 3600.0
    max_tracked: int = 100_000

    @property
    def enabled(self) -> bool:
        return self.max_failures > 0


@dataclass(slots=True)
class _Record:
    failures: deque[float] = field(default_factory=deque)
    banned_until: float = 0.0
    offences: int = 0  # bans so far; the next ban lasts ban * 2**offences (capped)
    refused: int = 0  # CONNECTs refused during the current ban (audited once, at its end)


class BruteForceGuard:
    """Failures are tracked per source in least-recently-failed order; a banned source
    moves to a table of its own that is never evicted before its ban ends, so an attacker
    cannot flush its own ban out by failing from many other addresses (easy with IPv6
    /64s). Only unbanned sources are evicted to make room."""

    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings
        self._records: OrderedDict[str, _Record] = OrderedDict()  # not banned, LRU order
        self._banned: dict[str, _Record] = {}
        self._served: list[tuple[str, float, int]] = []  # ended bans not yet reported
        self.bans = 0  # bans started (metrics)

    def __len__(self) -> int:
        return len(self._records) + len(self._banned)

    def banned_until(self, ip: str, now: float) -> float | None:
        """The end of the ban in force for ``ip`` at ``now``, or None."""
        source = source_of(ip)
        record = self._banned.get(source)
        if record is None:
            return None
        if record.banned_until <= now:  # served: tracked again like any other source
            self._serve(source, record)
            return None
        return record.banned_until

    def _serve(self, source: str, record: _Record) -> None:
        self._served.append((source, record.banned_until, record.refused))
        record.refused = 0
        del self._banned[source]
        self._track(source, record)

    def refused(self, ip: str) -> None:
        """A CONNECT was refused because its source is banned (counted, not audited)."""
        record = self._banned.get(source_of(ip))
        if record is not None:
            record.refused += 1

    def served_bans(self, now: float) -> list[tuple[str, float, int]]:
        """Bans that have ended: (source, end, CONNECTs refused during it), each reported
        once; the sources are tracked again like any other."""
        for source, record in [(source, record) for source, record in self._banned.items()
                               if record.banned_until <= now]:
            self._serve(source, record)
        out, self._served = self._served, []
        return out

    def _track(self, source: str, record: _Record) -> None:
        self._records[source] = record
        while len(self._records) > self.settings.max_tracked:
            self._records.popitem(last=False)

    def record_failure(self, ip: str, now: float) -> float | None:
        """Count one failed CONNECT; returns the ban's end when this failure starts a ban."""
        settings = self.settings
        if not settings.enabled:
            return None
        source = source_of(ip)
        if self.banned_until(source, now) is not None:
            return None  # already banned: nothing to count
        record = self._records.get(source)
        if record is None:
            if len(self._banned) >= settings.max_tracked:
                return None  # full of bans: a new source cannot be tracked until one ends
            record = _Record()
            self._track(source, record)
        else:
            self._records.move_to_end(source)
        failures = record.failures
        failures.append(now)
        while failures and failures[0] <= now - settings.window:
            failures.popleft()
        if len(failures) < settings.max_failures:
            return None
        duration = min(settings.ban * (2**record.offences), settings.max_ban)
        record.offences += 1
        record.banned_until = now + duration
        failures.clear()
        del self._records[source]
        self._banned[source] = record
        self.bans += 1
        return record.banned_until

    def banned_count(self, now: float) -> int:
        """Sources whose ban is in force at ``now``."""
        return sum(1 for record in self._banned.values() if record.banned_until > now)
