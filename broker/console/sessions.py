"""Console sessions: server-side, found by a random id in an ``HttpOnly``,
``SameSite=Strict`` cookie; idle timeout 8 h, absolute 24 h; at most ``limit`` at once
(the oldest dropped). A session remembers its admin token by id, so revoking the token
ends the session at its next request. A new key's secret waits in the session for one
page view (``reveal``), never in a URL: reloading that page finds it gone.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

IDLE = 8 * 3600.0
ABSOLUTE = 24 * 3600.0
LIMIT = 10_000
PER_TOKEN = 20  # sessions one token may hold (its oldest ends): no token can evict others
REVEALS = 16  # secrets waiting for their one view, per session (oldest dropped)
FLASHES = 10


@dataclass(frozen=True, slots=True)
class Reveal:
    key_id: str
    key: str
    secret: str


@dataclass(slots=True)
class Session:
    id: str
    token_id: str
    csrf: str
    created: float
    seen: float
    flash: list[str] = field(default_factory=list)
    reveals: dict[str, Reveal] = field(default_factory=dict)


class Sessions:
    def __init__(self, idle: float = IDLE, absolute: float = ABSOLUTE,
                 limit: int = LIMIT) -> None:
        self.idle, self.absolute, self.limit = idle, absolute, limit
        self._items: OrderedDict[str, Session] = OrderedDict()

    def create(self, token_id: str) -> Session:
        now = time.monotonic()
        mine = [s.id for s in self._items.values() if s.token_id == token_id]
        for old in mine[: max(0, len(mine) - PER_TOKEN + 1)]:
            del self._items[old]
        session = Session(secrets.token_urlsafe(32), token_id, secrets.token_urlsafe(32), now,
                          now)
        self._items[session.id] = session
        while len(self._items) > self.limit:
            self._items.popitem(last=False)
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id (its idle clock restarts), or None."""
        if not session_id:
            return None
        session = self._items.get(session_id)
        if session is None:
            return None
        now = time.monotonic()
        if now - session.seen > self.idle or now - session.created > self.absolute:
            del self._items[session_id]
            return None
        session.seen = now
        self._items.move_to_end(session_id)
        return session

    def drop(self, session_id: str) -> None:
        self._items.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._items)


def reveal_later(session: Session, reveal: Reveal) -> str:
    """Keep a secret for exactly one view; returns the id the page asks for it by."""
    ticket = secrets.token_urlsafe(16)
    session.reveals[ticket] = reveal
    while len(session.reveals) > REVEALS:
        del session.reveals[next(iter(session.reveals))]
    return ticket


def flash(session: Session, message: str) -> None:
    session.flash.append(message)
    del session.flash[:-FLASHES]
