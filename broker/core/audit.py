"""The audit trail: one JSON object per line, separate from the operational log.

Events: connect_ok, connect_refused, connect_invalid, publish_denied, subscribe_denied,
retain_refused, kick, ban, bad_packet, audit_suppressed; from the HTTP API (listener
"api"): api (an admin token's change: token name, action, target ids), api_refused,
device_auth_ok, device_auth_refused. Fields: time, event, key (public id only; on
connect_refused the key that was tried), client_id, client_ip, peer_ip, listener,
reason; topic on publish_denied, subscribe_denied and retain_refused (the filter for a
SUBSCRIBE).
A secret or password is never passed here, so it can never be written.
WatchedFileHandler reopens the file when logrotate moves it away.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from broker.policy.addresses import source_of
from broker.policy.guard import BruteForceGuard
from keystore.files import tighten_mode

logger = logging.getLogger(__name__)

_FIELDS = ("key", "app", "client_id", "client_ip", "peer_ip", "listener", "reason")
PER_SOURCE_PER_SECOND = 20
MAX_SOURCES = 10_000  # sources throttled at once; beyond that the oldest is dropped


class PerSourceLimit:
    """At most ``per_second`` events per source in each one-second window (a source: an
    IPv4 address or an IPv6 /64, broker.policy.addresses.source_of). The events beyond
    are counted and handed to ``report(source, count)`` once their window is over: at the
    source's next event, when the source is dropped to stay within ``max_sources``, or
    at ``flush`` (called once a second, so a source that went quiet is reported too)."""

    def __init__(self, report: Callable[[str, int], None],
                 per_second: int = PER_SOURCE_PER_SECOND, max_sources: int = MAX_SOURCES) -> None:
        self.report = report
        self.per_second = per_second
        self.max_sources = max_sources
        # source -> [window start, events let through, events held back]
        self._windows: OrderedDict[str, list[float]] = OrderedDict()

    def allow(self, source: str, now: float) -> bool:
        window = self._windows.get(source)
        if window is None or now - window[0] >= 1.0:
            if window is not None and window[2]:
                self.report(source, int(window[2]))
            window = [now, 0, 0]
            self._windows[source] = window
            self._windows.move_to_end(source)
            if len(self._windows) > self.max_sources:
                old, dropped = self._windows.popitem(last=False)
                if dropped[2]:
                    self.report(old, int(dropped[2]))
        if window[1] >= self.per_second:
            window[2] += 1
            return False
        window[1] += 1
        return True

    def flush(self, now: float) -> None:
        for source, window in list(self._windows.items()):
            if now - window[0] >= 1.0:
                if window[2]:
                    self.report(source, int(window[2]))
                del self._windows[source]


DENIALS_PER_SECOND = 20  # audit lines for one session's denials


class Audited(Protocol):
    """A session whose denials are audited: who it is, and its throttle's state (start of
    the current second, lines written in it, lines suppressed)."""

    client_id: str
    denials: tuple[float, int, int] | None

    def audit_fields(self, key: str | None = None) -> dict[str, Any]: ...


class _PrivateWatchedFileHandler(logging.handlers.WatchedFileHandler):
    """WatchedFileHandler that (re)creates its file with mode 0600, also after rotation."""

    def _open(self):  # type: ignore[no-untyped-def]
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)  # noqa: SIM115


class AuditLog:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        # A private logger (not propagated) so audit lines never mix with the operational log.
        self._logger = logging.getLogger(f"keybroker.audit.{id(self)}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        self._handler: logging.Handler | None = None
        self._per_source = PerSourceLimit(self._suppressed)  # see from_source
        self.suppressed = 0  # lines not written because of the limits (metrics)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tighten_mode(path)
            # Audit lines name keys and client IPs: keep the file private like the database.
            self._handler = _PrivateWatchedFileHandler(path, encoding="utf-8")
            self._handler.setFormatter(logging.Formatter("%(message)s"))
            self._logger.addHandler(self._handler)

    @property
    def enabled(self) -> bool:
        return self._handler is not None

    def event(self, event: str, **fields: Any) -> None:
        if self._handler is None:
            return
        record: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "event": event,
        }
        for name in _FIELDS:
            record[name] = fields.pop(name, None)
        record.update(fields)
        self._logger.info(json.dumps(record, separators=(",", ":"), default=str))

    def from_source(self, event: str, **fields: Any) -> None:
        """An event caused by an unauthenticated source (``client_ip``): limited per source
        (see above)."""
        if self._handler is None:
            return
        if self._per_source.allow(source_of(str(fields.get("client_ip"))), time.monotonic()):
            self.event(event, **fields)

    def denied(self, event: str, session: Audited, topic: str, reason: str,
               **extra: object) -> None:
        """A session's denial (a PUBLISH, a SUBSCRIBE filter, a retained message): written
        at most DENIALS_PER_SECOND times a second per session, so a client flooding denied
        PUBLISHes can neither fill the disk nor stall the loop with writes; the excess is
        counted in one ``audit_suppressed`` line. Also one line in the daemon's log."""
        now = time.monotonic()
        start, count, suppressed = session.denials or (now, 0, 0)
        if now - start >= 1.0:
            if suppressed:
                self.suppressed += suppressed
                self.event("audit_suppressed", **session.audit_fields(),
                           reason=f"{suppressed} denials not logged in 1 s")
            start, count, suppressed = now, 0, 0
        if count >= DENIALS_PER_SECOND:
            session.denials = (start, count, suppressed + 1)
            return
        session.denials = (start, count + 1, suppressed)
        logger.info("%s: client %s topic %r: %s", event, session.client_id, topic, reason)
        self.event(event, reason=reason, topic=topic, **session.audit_fields(), **extra)

    def ended_bans(self, guard: BruteForceGuard | None) -> None:
        """One ``ban_ended`` line per ban that is over, with the CONNECTs it refused
        (called once a second, with ``flush_suppressed``)."""
        if guard is not None:
            for source, _, refused in guard.served_bans(time.monotonic()):
                self.event("ban_ended", client_ip=source,
                           reason=f"{refused} CONNECTs refused during the ban")

    def flush_suppressed(self) -> None:
        """Write the counts of lines suppressed in windows that are over (called once a
        second by the daemon, so a source that went quiet is still reported)."""
        self._per_source.flush(time.monotonic())

    def _suppressed(self, source: str, count: int) -> None:
        self.suppressed += count
        self.event("audit_suppressed", client_ip=source,
                   reason=f"{count} events from this source not logged in 1 s")

    def close(self) -> None:
        if self._handler is not None:
            self._logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None

