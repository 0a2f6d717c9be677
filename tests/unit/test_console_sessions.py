"""Console sessions stay bounded: per token, per session (secrets waiting for their one
view, messages), and in time."""

from __future__ import annotations

from broker.console.sessions import (
    FLASHES,
    PER_TOKEN,
    REVEALS,
    Reveal,
    Sessions,
    flash,
    reveal_later,
)


def test_one_token_cannot_crowd_out_the_others() -> None:
    sessions = Sessions()
    other = sessions.create("b")
    mine = [sessions.create("a") for _ in range(PER_TOKEN + 5)]
    assert sessions.get(other.id) is other
    assert all(sessions.get(s.id) is None for s in mine[:5])  # its own oldest ended
    assert all(sessions.get(s.id) is s for s in mine[5:])
    assert len(sessions) == PER_TOKEN + 1


def test_waiting_secrets_and_messages_are_capped() -> None:
    session = Sessions().create("a")
    tickets = [reveal_later(session, Reveal(str(i), "k", "s")) for i in range(REVEALS + 3)]
    assert list(session.reveals) == tickets[3:]
    for i in range(FLASHES + 4):
        flash(session, f"m{i}")
    assert session.flash == [f"m{i}" for i in range(4, FLASHES + 4)]


def test_idle_and_absolute_timeouts() -> None:
    sessions = Sessions(idle=-1)
    assert sessions.get(sessions.create("a").id) is None
    sessions = Sessions(absolute=-1)
    assert sessions.get(sessions.create("a").id) is None
    sessions = Sessions()
    session = sessions.create("a")
    sessions.drop(session.id)
    assert sessions.get(session.id) is None
