"""The brute-force guard's rules, with time passed in."""

from __future__ import annotations

from broker.guard import BruteForceGuard, GuardSettings


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


def test_success_does_not_clear_recent_failures() -> None:
    """One valid key must not let an attacker interleave successes between guesses."""
    g = guard()
    g.record_failure("ip", 0)
    g.record_failure("ip", 1)
    g.record_success("ip")
    assert g.record_failure("ip", 2) == 62


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
