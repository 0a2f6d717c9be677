"""API tokens, device tokens and the status the daemon records, in the SQL keystore."""

# SQL text in this module is assembled only from constants and a dialect's fragments;
# every value is a bound parameter.
# ruff: noqa: S608, S105

from __future__ import annotations

import json
from datetime import datetime

from keystore import lookup
from keystore.backend import DeviceTokenRow
from keystore.errors import ConflictError
from keystore.models import ApiToken
from keystore.rows import TOKEN_COLUMNS, now_micros, row_to_token, to_device_token_row, to_micros
from keystore.sql.base import Reader, SqlBase
from keystore.sql.statements import TOKEN_LOOKUP_SQL


class SqlTokens(SqlBase):
    async def insert_api_token(self, token_id: str, name: str, app_id: str | None,
                               scopes: tuple[str, ...], salt: bytes, secret_hash: bytes,
                               expires_at: datetime | None) -> ApiToken:
        async with self.db.transaction() as tx:
            if await tx.value("SELECT 1 FROM api_tokens WHERE name = $1", name):
                raise ConflictError(f"token name {name!r} is already used")
            await tx.execute(
                "INSERT INTO api_tokens (id, name, app_id, scopes, salt, secret_hash, status, "
                "created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, 'active', $7, $8)",
                token_id, name, app_id, json.dumps(scopes), salt, secret_hash, now_micros(),
                to_micros(expires_at) if expires_at is not None else None)
            return await self._token(tx, token_id)

    async def _token(self, conn: Reader, ref: str) -> ApiToken:
        return row_to_token(await self._named(conn, lookup.API_TOKEN, TOKEN_LOOKUP_SQL, ref))

    async def all_api_tokens(self) -> list[ApiToken]:
        rows = await self.db.fetch(
            f"SELECT {TOKEN_COLUMNS} FROM api_tokens t ORDER BY t.created_at, t.id")
        return [row_to_token(r) for r in rows]

    async def load_api_token(self, ref: str) -> ApiToken:
        return await self._token(self.db, ref)

    async def revoke_api_tokens(self, refs: tuple[str, ...]) -> list[ApiToken]:
        async with self.db.transaction() as tx:
            tokens = [await self._token(tx, ref) for ref in refs]
            await tx.execute("UPDATE api_tokens SET status = 'revoked' "
                             f"WHERE {self.spelling.in_list('id', 1)}",
                             self.spelling.list_param([t.id for t in tokens]))
            return [await self._token(tx, t.id) for t in tokens]

    async def touch_api_token(self, token_id: str, when: datetime) -> None:
        async with self.db.transaction() as tx:
            await tx.execute("UPDATE api_tokens SET last_used = $1 WHERE id = $2",
                             to_micros(when), token_id)

    async def api_token_row(self, token_id: str) -> tuple[ApiToken, bytes, bytes] | None:
        rows = await self.db.fetch(
            f"SELECT {TOKEN_COLUMNS}, t.salt, t.secret_hash FROM api_tokens t WHERE t.id = $1",
            token_id)
        if not rows:
            return None
        return row_to_token(rows[0]), rows[0][-2], rows[0][-1]

    async def insert_device_token(self, token_id: str, key: str, device_id: str, salt: bytes,
                                  secret_hash: bytes, expires_at: datetime, keep: int) -> None:
        async with self.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO device_tokens (id, key, device_id, salt, secret_hash, created_at, "
                "expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                token_id, key, device_id, salt, secret_hash, now_micros(), to_micros(expires_at))
            # A device that logs in again and again keeps only its newest tokens.
            await tx.execute(
                "DELETE FROM device_tokens WHERE key = $1 AND device_id = $2 AND id NOT IN "
                "(SELECT id FROM device_tokens WHERE key = $1 AND device_id = $2 "
                "ORDER BY created_at DESC LIMIT $3)", key, device_id, keep)

    async def device_token_row(self, token_id: str) -> DeviceTokenRow | None:
        rows = await self.db.fetch(self.sql.device_token, token_id)
        return to_device_token_row(rows[0]) if rows else None

    async def prune_device_tokens(self, before: datetime, batch: int) -> int:
        async with self.db.transaction() as tx:
            return await tx.execute(
                "DELETE FROM device_tokens WHERE id IN (SELECT id FROM device_tokens "
                "WHERE expires_at < $1 LIMIT $2)", to_micros(before), batch)

    # --- status -------------------------------------------------------------------------

    async def mark_keys_used(self, keys: tuple[str, ...], when: datetime) -> None:
        async with self.db.transaction() as tx:
            await tx.execute(
                f"UPDATE access_keys SET last_used = $1 WHERE {self.spelling.in_list('key', 2)}",
                to_micros(when), self.spelling.list_param(keys))

    async def set_devices_connected(self, ids: tuple[str, ...], connected: bool,
                                    when: datetime) -> None:
        async with self.db.transaction() as tx:
            await tx.execute(
                "UPDATE devices SET connected = $1, last_seen = $2 "
                f"WHERE {self.spelling.in_list('id', 3)}",
                int(connected), to_micros(when), self.spelling.list_param(ids))
