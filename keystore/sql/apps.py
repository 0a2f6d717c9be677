"""Applications in the SQL keystore."""

# SQL text in this module is assembled only from constants and whitelisted column names;
# every value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

from typing import Any

from keystore import credentials
from keystore.errors import ConflictError
from keystore.models import Application
from keystore.rows import APP_COLUMNS, now_micros, row_to_app
from keystore.sql.base import SqlBase


class SqlApps(SqlBase):
    async def insert_app(self, name: str, description: str | None, max_keys: int | None,
                         max_devices: int | None) -> Application:
        now = now_micros()
        async with self.db.transaction() as tx:
            if await tx.value("SELECT 1 FROM applications WHERE name = $1", name):
                raise ConflictError(f"application name {name!r} is already used")
            app_id = credentials.new_object_id()
            await tx.execute(
                "INSERT INTO applications (id, name, description, max_keys, max_devices, "
                "created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6)",
                app_id, name, description, max_keys, max_devices, now)
            return await self._load_app(tx, app_id)

    async def load_app(self, ref: str) -> Application:
        return await self._load_app(self.db, ref)

    async def all_apps(self) -> list[Application]:
        rows = await self.db.fetch(f"SELECT {APP_COLUMNS} FROM applications a ORDER BY a.name")
        return [row_to_app(r) for r in rows]

    async def change_app(self, ref: str, changes: dict[str, Any]) -> Application:
        """``changes``: column -> value, of columns keystore.apps whitelists."""
        async with self.db.transaction() as tx:
            app = await self._load_app(tx, ref)
            name = changes.get("name")
            if name is not None and await tx.value(
                    "SELECT 1 FROM applications WHERE name = $1 AND id != $2", name, app.id):
                raise ConflictError(f"application name {name!r} is already used")
            if changes:
                assigns = ", ".join(f"{column} = ${n}"
                                    for n, column in enumerate(changes, start=1))
                n = len(changes)
                await tx.execute(
                    f"UPDATE applications SET {assigns}, updated_at = ${n + 1} "
                    f"WHERE id = ${n + 2}", *changes.values(), now_micros(), app.id)
            return await self._load_app(tx, app.id)

    async def delete_apps(self, refs: tuple[str, ...]) -> list[Application]:
        """Delete applications with all their keys and devices (all, or none if one is
        missing). Triggers write a change for every key, device and application."""
        async with self.db.transaction(feed=True) as tx:
            apps = [await self._load_app(tx, ref) for ref in refs]
            for app in dict((a.id, a) for a in apps).values():
                await tx.execute("DELETE FROM access_keys WHERE app_id = $1", app.id)
                await tx.execute("DELETE FROM devices WHERE app_id = $1", app.id)
                await tx.execute("DELETE FROM applications WHERE id = $1", app.id)
        return apps
