"""Devices in the SQL keystore: one application's, but ids are unique across them."""

# SQL text in this module is assembled only from constants, whitelisted names and a
# dialect's fragments; every value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from keystore import plans
from keystore.backend import Page, UntagSpec
from keystore.errors import NotFoundError
from keystore.models import Device, Tag
from keystore.rows import DEVICE_SORT, now_micros, order_by, row_to_device
from keystore.sql.base import SqlBase
from keystore.sql.dialect import Transaction

UPSERT_BATCH = 20_000  # devices read back per statement while planning an upsert
DEVICE_ROW = ("id", "name", "created_at", "updated_at", "app_id")
TAG_ROW = ("device_id", "key", "value", "app_id")


class SqlDevices(SqlBase):
    async def insert_device(self, app_id: str, device_id: str, name: str | None,
                            tags: tuple[Tag, ...], max_devices: int) -> Device:
        now = now_micros()
        async with self.db.transaction() as tx:
            plans.check_new_device(device_id, await self._device_app(tx, device_id), app_id)
            if max_devices:
                await self._check_limit(tx, "device", "devices", app_id, max_devices, 1)
            await tx.insert_rows("devices", DEVICE_ROW, [(device_id, name, now, now, app_id)])
            await self._add_tags(tx, app_id, [(device_id, k, v) for k, v in tags])
            return await self._load_device(tx, app_id, device_id)

    async def upsert_devices(self, app_id: str,
                             wanted: Mapping[str, tuple[str | None, frozenset[Tag]]],
                             max_devices: int) -> int:
        """Plan every batch first, so that the device limit sees all the new devices
        before anything is written."""
        now = now_micros()
        ids = list(wanted)
        async with self.db.transaction() as tx:
            upserts = [await self._plan_upsert(tx, app_id, ids[start:start + UPSERT_BATCH],
                                               wanted, now)
                       for start in range(0, len(ids), UPSERT_BATCH)]
            new = sum(len(plan.new_devices) for plan in upserts)
            if max_devices and new:
                await self._check_limit(tx, "device", "devices", app_id, max_devices, new)
            for plan in upserts:
                await tx.insert_rows("devices", DEVICE_ROW,
                                     [(*row, app_id) for row in plan.new_devices])
                await tx.execute_many("UPDATE devices SET name = $1, updated_at = $2 "
                                      "WHERE id = $3", plan.changed)
                await self._drop_tags(tx, plan.drop_tags)
                await self._add_tags(tx, app_id, plan.add_tags)
        return sum(plan.touched for plan in upserts)

    async def _plan_upsert(self, tx: Transaction, app_id: str, batch: Sequence[str],
                           wanted: Mapping[str, tuple[str | None, frozenset[Tag]]],
                           now: int) -> plans.UpsertPlan:
        """What one batch changes against what is stored: only the differences."""
        ids = self.spelling.list_param(batch)
        names, tags = plans.existing_devices(
            app_id,
            await tx.fetch("SELECT id, name, app_id FROM devices "
                           f"WHERE {self.spelling.in_list('id', 1)}", ids),
            await tx.fetch("SELECT device_id, key, value FROM device_tags "
                           f"WHERE {self.spelling.in_list('device_id', 1)}", ids))
        return plans.plan_upsert(batch, wanted, names, tags, now)

    async def load_device(self, app_id: str, device_id: str) -> Device:
        return await self._load_device(self.db, app_id, device_id)

    async def all_devices(self, app_id: str) -> list[Device]:
        rows = await self.db.fetch(f"SELECT {self.sql.device_columns} FROM devices d "
                                   "WHERE d.app_id = $1 ORDER BY d.id", app_id)
        return [row_to_device(r) for r in rows]

    async def add_tags(self, app_id: str, device_id: str, tags: tuple[Tag, ...]) -> Device:
        async with self.db.transaction() as tx:
            before = await self._load_device(tx, app_id, device_id)
            added = [p for p in tags if p not in before.tags]
            if added:
                await self._add_tags(tx, app_id, [(before.id, k, v) for k, v in added])
                await self._touch(tx, before.id)
            return await self._load_device(tx, app_id, before.id)

    async def remove_tags(self, app_id: str, device_id: str, specs: list[UntagSpec]) -> Device:
        async with self.db.transaction() as tx:
            before = await self._load_device(tx, app_id, device_id)
            doomed = plans.doomed_tags(before, specs)
            if doomed:
                await self._drop_tags(tx, [(before.id, k, v) for k, v in doomed])
                await self._touch(tx, before.id)
            return await self._load_device(tx, app_id, before.id)

    async def change_device(self, app_id: str, device_id: str, name: Any,
                            tags: tuple[Tag, ...] | None) -> Device:
        """Set the name (``...`` leaves it) and replace the tag set (None leaves it)."""
        async with self.db.transaction() as tx:
            before = await self._load_device(tx, app_id, device_id)
            edit = plans.device_edit(before, name, tags)
            if edit.rename:
                await tx.execute("UPDATE devices SET name = $1 WHERE id = $2", name, before.id)
            await self._drop_tags(tx, edit.drop)
            await self._add_tags(tx, app_id, edit.add)
            if edit.touched:
                await self._touch(tx, before.id)
            return await self._load_device(tx, app_id, before.id)

    async def delete_devices(self, app_id: str, device_ids: tuple[str, ...]) -> None:
        async with self.db.transaction(feed=True) as tx:
            missing = await self._missing_devices(tx, app_id, device_ids)
            if missing:
                raise NotFoundError(f"no device {missing[0]!r} (nothing removed)")
            await tx.execute(f"DELETE FROM devices WHERE {self.spelling.in_list('id', 1)}",
                             self.spelling.list_param(device_ids))

    async def page_devices(self, app_id: str, name_glob: str | None, sort: str,
                           descending: bool, offset: int, limit: int) -> Page:
        order = order_by(DEVICE_SORT, sort, descending, "d.id")
        where, params = "d.app_id = $1", [app_id]
        if name_glob is not None:
            where += f" AND d.name {self.spelling.query.pattern_op} $2"
            params.append(self.spelling.query.like(name_glob))
        n = len(params)
        async with self.db.transaction(write=False) as tx:
            total = await tx.value(f"SELECT count(*) FROM devices d WHERE {where}", *params)
            rows = await tx.fetch(
                f"SELECT {self.sql.device_columns} FROM devices d WHERE {where} "
                f"ORDER BY {order} LIMIT ${n + 1} OFFSET ${n + 2}", *params, limit, offset)
        return [row_to_device(r) for r in rows], int(total)

    async def device_app(self, device_id: str) -> str | None:
        return await self._device_app(self.db, device_id)

    async def count_devices(self, app_id: str | None) -> int:
        if app_id is None:
            rows = await self.db.fetch("SELECT count(*) FROM devices")
        else:
            rows = await self.db.fetch("SELECT count(*) FROM devices WHERE app_id = $1", app_id)
        return int(rows[0][0])

    async def _add_tags(self, tx: Transaction, app_id: str,
                        rows: Sequence[tuple[str, str, str]]) -> None:
        """Tag rows (device id, key, value) of devices of ``app_id``."""
        await tx.insert_rows("device_tags", TAG_ROW, [(*row, app_id) for row in rows])

    async def _drop_tags(self, tx: Transaction, rows: Sequence[tuple[str, str, str]]) -> None:
        await tx.execute_many(
            "DELETE FROM device_tags WHERE device_id = $1 AND key = $2 AND value = $3", rows)

    async def _touch(self, tx: Transaction, device_id: str) -> None:
        await tx.execute("UPDATE devices SET updated_at = $1 WHERE id = $2", now_micros(),
                         device_id)
