"""The per-source limit of the audit trail and of the daemon's log lines about CONNECTs:
at most 20 events a second per source, the rest counted and reported once the window is
over; sources apart from each other; the number of sources tracked bounded."""

from __future__ import annotations

from broker.core.audit import PerSourceLimit


def limit(max_sources: int = 10) -> tuple[PerSourceLimit, list[tuple[str, int]]]:
    reported: list[tuple[str, int]] = []
    return PerSourceLimit(lambda source, count: reported.append((source, count)),
                          per_second=20, max_sources=max_sources), reported


def test_twenty_a_second_per_source_and_the_rest_counted() -> None:
    throttle, reported = limit()
    allowed = [throttle.allow("10.0.0.1", 100.0 + i / 1000) for i in range(25)]
    assert allowed == [True] * 20 + [False] * 5
    assert throttle.allow("10.0.0.2", 100.5)  # another source has its own window
    throttle.flush(100.9)
    assert reported == []  # the window is not over yet
    throttle.flush(101.0)
    assert reported == [("10.0.0.1", 5)]
    assert throttle.allow("10.0.0.1", 101.1)  # a new window


def test_the_count_is_reported_at_the_sources_next_event() -> None:
    throttle, reported = limit()
    for _ in range(21):
        throttle.allow("10.0.0.1", 5.0)
    assert throttle.allow("10.0.0.1", 6.5) and reported == [("10.0.0.1", 1)]


def test_sources_beyond_the_bound_drop_the_oldest_and_report_it() -> None:
    throttle, reported = limit(max_sources=2)
    for _ in range(22):
        throttle.allow("a", 1.0)
    throttle.allow("b", 1.1)
    throttle.allow("c", 1.2)  # "a" is dropped, its count reported
    assert reported == [("a", 2)]
