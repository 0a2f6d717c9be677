"""The audit trail: one JSON object per line, separate from the operational log.

Events: connect_ok, connect_refused, connect_invalid, publish_denied, subscribe_denied,
retain_refused, kick, ban, bad_packet, audit_suppressed; from the HTTP API (listener
"api"): api (an admin token's change: token name, action, target ids), api_refused,
device_auth_ok, device_auth_refused. Fields: time, event, key (public
id only), client_id, client_ip, peer_ip, listener, reason; topic on publish_denied,
subscribe_denied and retain_refused (the filter for a SUBSCRIBE).
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.policy.addresses import source_of
from broker.policy.guard import BruteForceGuard
from keystore.files import tighten_mode

_FIELDS = ("key", "app", "client_id", "client_ip", "peer_ip", "listener", "reason")
PER_SOURCE_PER_SECOND = 20
MAX_SOURCES = 10_000  # sources throttled at once; beyond that the oldest is dropped


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
        # source -> [window start, lines written, lines suppressed] (see from_source)
        self._sources: OrderedDict[str, list[float]] = OrderedDict()
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
        source = source_of(str(fields.get("client_ip")))
        now = time.monotonic()
        state = self._sources.get(source)
        if state is None or now - state[0] >= 1.0:
            if state is not None and state[2]:
                self._suppressed(source, state)
            state = [now, 0, 0]
            self._sources[source] = state
            self._sources.move_to_end(source)
            if len(self._sources) > MAX_SOURCES:
                old, dropped = self._sources.popitem(last=False)
                if dropped[2]:
                    self._suppressed(old, dropped)
        if state[1] >= PER_SOURCE_PER_SECOND:
            state[2] += 1
            return
        state[1] += 1
        self.event(event, **fields)

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
        now = time.monotonic()
        for source, state in list(self._sources.items()):
            if now - state[0] >= 1.0:
                if state[2]:
                    self._suppressed(source, state)
                del self._sources[source]

    def _suppressed(self, source: str, state: list[float]) -> None:
        self.suppressed += int(state[2])
        self.event("audit_suppressed", client_ip=source,
                   reason=f"{int(state[2])} events from this source not logged in 1 s")

    def close(self) -> None:
        if self._handler is not None:
            self._logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None

