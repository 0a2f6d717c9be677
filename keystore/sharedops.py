"""Backend operations that are the same steps on either database: a backend provides its
transactions (``_write``, ``_read``) and its ``statements`` module (the SQL of each step,
in its dialect), and these run them. What differs between SQLite and PostgreSQL stays in
the backends; what a step decides lives in keystore.plans.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from keystore import plans
from keystore.backend import UntagSpec
from keystore.models import AccessKey, Device, Tag
from keystore.rows import now_micros


class Statements(Protocol):
    """The steps a backend's statements module offers (``conn``: its connection type)."""

    async def device_app(self, conn: Any, device_id: str) -> str | None: ...
    async def load_device(self, conn: Any, app_id: str, device_id: str) -> Device: ...
    async def insert_device(self, conn: Any, app_id: str, device_id: str, name: str | None,
                            now: int) -> None: ...
    async def rename_device(self, conn: Any, device_id: str, name: str | None) -> None: ...
    async def touch_device(self, conn: Any, device_id: str) -> None: ...
    async def add_device_tags(self, conn: Any, app_id: str,
                              rows: Sequence[tuple[str, str, str]]) -> None: ...
    async def drop_device_tags(self, conn: Any, rows: Sequence[tuple[str, str, str]]) -> None: ...
    async def resolve_key(self, conn: Any, app_id: str, key_or_prefix: str) -> str: ...
    async def load_keys(self, conn: Any, keys: Iterable[str]) -> dict[str, AccessKey]: ...


class SharedOps:
    statements: Statements

    def _write(self) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    def _read(self) -> AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    async def insert_device(self, app_id: str, device_id: str, name: str | None,
                            tags: tuple[Tag, ...]) -> Device:
        now = now_micros()
        sql = self.statements
        async with self._write() as conn:
            plans.check_new_device(device_id, await sql.device_app(conn, device_id), app_id)
            await sql.insert_device(conn, app_id, device_id, name, now)
            await sql.add_device_tags(conn, app_id, [(device_id, k, v) for k, v in tags])
            return await sql.load_device(conn, app_id, device_id)

    async def add_tags(self, app_id: str, device_id: str, tags: tuple[Tag, ...]) -> Device:
        sql = self.statements
        async with self._write() as conn:
            before = await sql.load_device(conn, app_id, device_id)
            added = [p for p in tags if p not in before.tags]
            if added:
                await sql.add_device_tags(conn, app_id, [(before.id, k, v) for k, v in added])
                await sql.touch_device(conn, before.id)
            return await sql.load_device(conn, app_id, before.id)

    async def remove_tags(self, app_id: str, device_id: str, specs: list[UntagSpec]) -> Device:
        sql = self.statements
        async with self._write() as conn:
            before = await sql.load_device(conn, app_id, device_id)
            doomed = plans.doomed_tags(before, specs)
            if doomed:
                await sql.drop_device_tags(conn, [(before.id, k, v) for k, v in doomed])
                await sql.touch_device(conn, before.id)
            return await sql.load_device(conn, app_id, before.id)

    async def change_device(self, app_id: str, device_id: str, name: Any,
                            tags: tuple[Tag, ...] | None) -> Device:
        """Set the name (``...`` leaves it) and replace the tag set (None leaves it)."""
        sql = self.statements
        async with self._write() as conn:
            before = await sql.load_device(conn, app_id, device_id)
            edit = plans.device_edit(before, name, tags)
            if edit.rename:
                await sql.rename_device(conn, before.id, name)
            await sql.drop_device_tags(conn, edit.drop)
            await sql.add_device_tags(conn, app_id, edit.add)
            if edit.touched:
                await sql.touch_device(conn, before.id)
            return await sql.load_device(conn, app_id, before.id)

    async def load_key(self, app_id: str, key_or_prefix: str) -> AccessKey:
        sql = self.statements
        async with self._read() as conn:
            key = await sql.resolve_key(conn, app_id, key_or_prefix)
            return (await sql.load_keys(conn, [key]))[key]

    async def keys_by_id(self, keys: Iterable[str]) -> dict[str, AccessKey]:
        async with self._read() as conn:
            return await self.statements.load_keys(conn, list(dict.fromkeys(keys)))
