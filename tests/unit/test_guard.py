"""The brute-force guard's rules, with time passed in."""

from __future__ import annotations

from broker.policy.guard import BruteForceGuard, GuardSettings


def guard(**overrides: float) -> BruteForceGuard:
    values = {"max_failures": 3, "window": 10.0, "ban": 60.0, "max_ban": 200.0}
    values.update(overrides)
    return BruteForceGuard(GuardSettings(**values))  # type: ignore[arg-type]


def test_ban_starts_at_the_threshold_within_the_window() -> None:
    g = guard()
    assert g.record_failure("1.2.3.4", 0) is None
    assert g.record_failure("1.2.3.4", 1) is None
    assert g.banned_until("1.2.3.4", 1) is None
    assert g.record_failure("1.2.3.4", 2) == 62
    assert g.banned_until("1.2.3.4", 30) == 62
    assert g.banned_until("5.6.7.8", 30) is None  # other IPs unaffected


def test_failures_outside_the_window_do_not_count() -> None:
    g = guard()
    g.record_failure("ip", 0)
    g.record_failure("ip", 5)
    assert g.record_failure("ip", 11) is None  # the one at t=0 slid out of the window
    assert g.banned_until("ip", 11) is None


def test_ban_lifts_and_doubles_on_repeat_up_to_the_cap() -> None:
    g = guard()
    now = 0.0
    ends = []
    for _ in range(4):
        for _ in range(3):
            end = g.record_failure("ip", now)
        assert end is not None
        ends.append(end - now)
        assert g.banned_until("ip", end - 0.001) == end
        now = end  # the ban has lifted
        assert g.banned_until("ip", now) is None
    assert ends == [60, 120, 200, 200]


def test_ipv6_sources_are_grouped_by_64() -> None:
    g = guard()
    for i in range(3):  # three addresses of one /64
        g.record_failure(f"2001:db8:1:2::{i + 1}", float(i))
    assert g.banned_until("2001:db8:1:2::ffff", 3) == 62
    assert g.banned_until("2001:db8:1:3::1", 3) is None  # another /64


def test_memory_is_bounded_under_many_source_addresses() -> None:
    g = guard(max_tracked=1000)
    for i in range(20_000):
        g.record_failure(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 0)
    assert len(g) == 1000


def test_disabled_guard_never_bans() -> None:
    g = guard(max_failures=0)
    for t in range(100):
        assert g.record_failure("ip", t) is None
    assert g.banned_until("ip", 50) is None


def test_a_ban_survives_a_flood_of_other_failing_sources() -> None:
    """Bans used to be evicted first when the table was full: 100,000 other failing
    sources (easy with IPv6 /64s) lifted an attacker's ban."""
    g = guard(max_tracked=1000)
    for t in range(3):
        g.record_failure("203.0.113.9", float(t))
    assert g.banned_until("203.0.113.9", 3) == 62
    for i in range(20_000):
        g.record_failure(f"2001:db8:{i // 65536:x}:{i % 65536:x}::1", 4)
        g.banned_until("203.0.113.9", 4)  # checking it must not help either
    assert g.banned_until("203.0.113.9", 5) == 62
    assert len(g) <= 2 * 1000


def test_a_served_ban_lets_the_source_be_tracked_again() -> None:
    g = guard(max_tracked=10)
    for t in range(3):
        g.record_failure("ip", float(t))
    assert g.banned_until("ip", 70) is None  # ban (until 62) served
    for t in range(3):
        end = g.record_failure("ip", 70.0 + t)
    assert end == 72 + 120  # the second offence lasts twice as long
