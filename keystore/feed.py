"""The change feed, connection status and CONNECT lookups: what a running daemon reads
and writes besides the operators' changes (docs/live-changes.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime

from keystore.backend import Backend
from keystore.connect import ConnectLookup, ConnectResolver
from keystore.errors import ValidationError
from keystore.models import Change
from keystore.validation import dedupe, validate_device_id


class FeedOps:
    backend: Backend
    _resolver: ConnectResolver

    async def connect_lookup(self, key: str, secret: str, device_id: str) -> ConnectLookup:
        """Key + secret + device facts + scope for one CONNECT (cached; see keystore.connect)."""
        return await self._resolver.lookup(key, secret, device_id)

    async def change_marker(self) -> tuple[int, int]:
        """Moves whenever anyone (this process or another) commits a change."""
        return await self.backend.change_marker()

    async def watch_changes(self, wake: Callable[[], None]) -> bool:
        """Have ``wake()`` called as soon as a change is committed, where the backend can
        push (PostgreSQL's LISTEN/NOTIFY); False if it cannot (SQLite: poll the marker)."""
        return await self.backend.watch_changes(wake)

    async def latest_change_id(self) -> int:
        return await self.backend.latest_change_id()

    async def changes_since(self, change_id: int, limit: int = 10_000) -> list[Change]:
        """Change-feed rows after ``change_id``, oldest first (written by triggers)."""
        return await self.backend.changes_since(change_id, limit)

    async def request_kick(self, device_id: str) -> None:
        """Ask a running daemon to disconnect the session of ``device_id`` (operators)."""
        await self.backend.add_change("kick", validate_device_id(device_id))

    async def prune_changes(
        self, before: datetime, *, up_to: int | None = None, batch: int = 10_000
    ) -> int:
        """Delete the oldest change rows written before ``before`` (and with an id of at
        most ``up_to``, the last one every reader has applied): at most ``batch`` of them,
        in one short transaction. Returns how many; 0 means nothing (more) to prune.
        Callers loop, yielding between batches (broker.services.prune); ids keep increasing."""
        if batch < 1:
            raise ValidationError(f"invalid prune batch {batch!r}: must be 1 or more")
        return await self.backend.prune_changes(before, up_to, batch)

    async def mark_keys_used(self, keys: Iterable[str], when: datetime) -> None:
        wanted = dedupe(keys)
        if wanted:
            await self.backend.mark_keys_used(wanted, when)

    async def set_devices_connected(
        self, ids: Iterable[str], connected: bool, when: datetime
    ) -> None:
        wanted = dedupe(ids)
        if wanted:
            await self.backend.set_devices_connected(wanted, connected, when)
