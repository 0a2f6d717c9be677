"""Brute-force guard: too many failed CONNECTs from one client IP within a window bans that
IP for a while; the ban doubles on each repeat offence up to a cap (spec §2 step 1).

Pure and synchronous (time is passed in), so it is tested without sockets. Memory is
bounded: at most ``max_tracked`` IPs are remembered, least recently seen dropped first,
so an attack from many addresses cannot grow the daemon without limit.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from netaddr import AddrFormatError, IPNetwork


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


def source_of(ip: str) -> str:
    """What the guard counts per: the IPv4 address, or the IPv6 /64 (one host can hold a
    whole /64 and would otherwise get a fresh address for every attempt)."""
    if ":" not in ip:
        return ip
    try:
        return str(IPNetwork(f"{ip}/64").cidr)
    except (AddrFormatError, ValueError):
        return ip


class BruteForceGuard:
    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def banned_until(self, ip: str, now: float) -> float | None:
        """The end of the ban in force for ``ip`` at ``now``, or None."""
        record = self._records.get(source_of(ip))
        if record is None or record.banned_until <= now:
            return None
        return record.banned_until

    def record_failure(self, ip: str, now: float) -> float | None:
        """Count one failed CONNECT; returns the ban's end when this failure starts a ban."""
        settings = self.settings
        if not settings.enabled:
            return None
        ip = source_of(ip)
        record = self._records.get(ip)
        if record is None:
            record = self._records[ip] = _Record()
            if len(self._records) > settings.max_tracked:
                self._records.popitem(last=False)
        else:
            self._records.move_to_end(ip)
        failures = record.failures
        failures.append(now)
        while failures and failures[0] <= now - settings.window:
            failures.popleft()
        if len(failures) < settings.max_failures or record.banned_until > now:
            return None
        duration = min(settings.ban * (2**record.offences), settings.max_ban)
        record.offences += 1
        record.banned_until = now + duration
        failures.clear()
        return record.banned_until

    def record_success(self, ip: str) -> None:
        """A good CONNECT does not clear recent failures: otherwise one valid key would let
        an attacker interleave successes and guess other keys' secrets without end."""
