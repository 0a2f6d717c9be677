"""Keeps the keystore's change feed short: rows every reader has applied are deleted once
they are older than the retention window.

Every key status or expiry change, key deletion, device removal and ``devices kick``
adds a ``changes`` row (keystore triggers). Its only reader is the daemon's
``ChangeWatcher``, which starts at the newest row and then applies each new one within a
poll interval; a CLI process never reads the feed. So a row the watcher has applied is
needed by nobody, and ``change_retention`` (default 1 day) is only a margin (e.g. for a
second daemon started on the same file). Deletion runs in batches of ``BATCH`` rows, one
short transaction each, yielding to the event loop between them, so a large backlog
never holds the keystore (or the MQTT loop) for long. Expired device tokens of the HTTP
API (docs/api.md) are deleted on the same tick, the same way, and so are the stored
scopes of connection snapshots (docs/cluster.md) that no connection has referred to for
the retention window. The access-key service (broker.authsvc) runs the same pruner, with
its revoker as the feed's reader.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from broker.core.periodic import Periodic
from keystore import KeyStore

logger = logging.getLogger(__name__)

INTERVAL = 60.0  # seconds between two prunes
BATCH = 10_000  # rows per transaction


class ChangePruner(Periodic):
    name = "keybroker-change-pruner"

    def __init__(
        self,
        keystore: KeyStore,
        retention: float,
        consumed: Callable[[], int],
        interval: float = INTERVAL,
        batch: int = BATCH,
    ) -> None:
        """``consumed()`` is the id of the last change every reader has applied."""
        super().__init__(interval)
        self.keystore = keystore
        self.retention = timedelta(seconds=retention)
        self.consumed = consumed
        self.batch = batch

    async def start(self) -> None:
        self.start_ticking()

    async def stop(self) -> None:
        await self.stop_ticking()

    async def tick(self) -> None:
        await self.prune()
        await self.prune_device_tokens()
        await self.prune_scopes()

    async def prune_scopes(self, now: datetime | None = None) -> int:
        """Delete stored scopes no connection snapshot refers to, older than the retention
        window; returns how many."""
        before = (now or datetime.now(UTC)) - self.retention
        total = 0
        while deleted := await self.keystore.prune_connections(before, batch=self.batch):
            total += deleted
            await asyncio.sleep(0)
        if total:
            logger.info("deleted %d stored scopes no connection refers to", total)
        return total

    async def prune_device_tokens(self, now: datetime | None = None) -> int:
        """Delete device tokens that have expired; returns how many."""
        total = 0
        while deleted := await self.keystore.prune_device_tokens(now or datetime.now(UTC),
                                                                 batch=self.batch):
            total += deleted
            await asyncio.sleep(0)
        if total:
            logger.info("deleted %d expired device tokens", total)
        return total

    async def prune(self, now: datetime | None = None) -> int:
        """Delete applied rows older than the retention window; returns how many."""
        before = (now or datetime.now(UTC)) - self.retention
        up_to = self.consumed()
        total = 0
        while deleted := await self.keystore.prune_changes(before, up_to=up_to,
                                                           batch=self.batch):
            total += deleted
            await asyncio.sleep(0)  # CONNECTs and the watcher get the keystore in between
        if total:
            logger.info("change feed: pruned %d applied rows older than %s", total,
                        before.isoformat(timespec="seconds"))
        return total
