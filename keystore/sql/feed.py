"""The change feed in the SQL keystore: rows written by triggers (and ``add_change``),
read in id order, pruned from the oldest."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from keystore.models import Change
from keystore.rows import from_micros, to_micros
from keystore.sql.base import SqlBase


class SqlFeed(SqlBase):
    async def change_marker(self) -> tuple[int, int]:
        """Moves whenever anyone commits: the dialect's own marker, else the feed's newest
        id (ids become visible in order)."""
        marker = await self.db.commit_marker()
        return marker if marker is not None else (await self.latest_change_id(), 0)

    async def latest_change_id(self) -> int:
        rows = await self.db.fetch("SELECT COALESCE(MAX(id), 0) FROM changes")
        return int(rows[0][0])

    async def changes_since(self, change_id: int, limit: int) -> list[Change]:
        rows = await self.db.fetch(
            "SELECT id, kind, subject, at FROM changes WHERE id > $1 ORDER BY id LIMIT $2",
            change_id, limit)
        return [Change(int(r[0]), str(r[1]), str(r[2]), from_micros(r[3])) for r in rows]

    async def add_change(self, kind: str, subject: str) -> None:
        async with self.db.transaction(feed=True) as tx:
            await tx.execute(self.spelling.add_change, kind, subject)

    async def prune_changes(self, before: datetime, up_to: int | None, batch: int) -> int:
        """One id range of at most ``batch`` rows from the oldest, in one short write."""
        async with self.db.transaction() as tx:
            oldest = await tx.value("SELECT MIN(id) FROM changes")
            if oldest is None:
                return 0
            last = oldest + batch - 1 if up_to is None else min(oldest + batch - 1, up_to)
            return await tx.execute("DELETE FROM changes WHERE id BETWEEN $1 AND $2 AND at < $3",
                                    oldest, last, to_micros(before))

    async def watch_changes(self, wake: Callable[[], None]) -> bool:
        return await self.db.watch_changes(wake)
