"""Tokens of the HTTP API (docs/api.md#tokens): admin tokens for operators, device tokens
that a device gets for its access key (``POST /auth/device``).

A token is ``<kind>.<id>.<secret>``: the id finds the row, the secret is checked against
its salted HMAC exactly like an access key's secret (keystore.credentials). The token
exists only in the value returned at creation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from keystore import credentials
from keystore.apps import AppOps
from keystore.connect import ConnectResolver, TokenLookup
from keystore.errors import ValidationError
from keystore.models import AccessKey, ApiToken
from keystore.scopes import DEFAULT_SCOPES, validate_scopes
from keystore.validation import as_str_list, coerce_utc, dedupe, validate_key_name

log = logging.getLogger(__name__)

ADMIN = "kba"
DEVICE = "kbd"
KEEP_DEVICE_TOKENS = 16  # newest tokens kept per (key, device); older ones are deleted
LAST_USED_EVERY = timedelta(minutes=1)  # an admin token's last use is written this often


def mint(kind: str) -> tuple[str, str, str]:
    """(token, id, secret) for a new token of ``kind``."""
    token_id, secret = credentials.new_object_id(), credentials.new_secret()
    return f"{kind}.{token_id}.{secret}", token_id, secret


def split_token(token: str, kind: str) -> tuple[str, str] | None:
    """(id, secret) of a token of ``kind``, or None when it is not one."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != kind or len(parts[1]) != 24 or not parts[2]:
        return None
    return parts[1], parts[2]


class TokenOps(AppOps):
    _resolver: ConnectResolver

    # --- admin tokens -------------------------------------------------------------------

    async def create_token(
        self, name: str, *, app: str | None = None, scopes: Iterable[str] = DEFAULT_SCOPES,
        expires_at: datetime | str | None = None,
    ) -> tuple[ApiToken, str]:
        """A new admin token for one application (``app``) or, with app None, for all.
        Returns (token row, token): the token is shown this once and stored hashed."""
        checked_name = validate_key_name(name, "token name")
        if checked_name is None:
            raise ValidationError("invalid token name None: a name is required")
        checked_scopes = validate_scopes(scopes)
        expires = coerce_utc(expires_at, "expiration date")
        if expires is not None and expires <= datetime.now(UTC):
            raise ValidationError(f"invalid expiration date {expires.isoformat()}: in the past")
        app_id = None if app is None else (await self.app(app)).id
        token, token_id, secret = mint(ADMIN)
        salt, digest = credentials.hash_secret(secret)
        row = await self.backend.insert_api_token(token_id, checked_name, app_id,
                                                  checked_scopes, salt, digest, expires)
        log.info("created API token %s (%s)", row.name, row.id)
        return row, token

    async def list_tokens(self) -> list[ApiToken]:
        return await self.backend.all_api_tokens()

    async def get_token(self, ref: str) -> ApiToken:
        """An admin token by id or name."""
        if not isinstance(ref, str):
            raise ValidationError(f"invalid token {ref!r}: must be a name or an id")
        return await self.backend.load_api_token(ref)

    async def revoke_tokens(self, refs: Iterable[str]) -> list[ApiToken]:
        """Revoke admin tokens (all, or none if one does not exist); they stop working at
        once (every request reads its token's row)."""
        revoked = await self.backend.revoke_api_tokens(dedupe(as_str_list(refs, "tokens")))
        log.info("revoked %d API tokens", len(revoked))
        return revoked

    async def check_token(self, token: str, now: datetime) -> ApiToken | None:
        """The active, unexpired admin token this is, else None (same cost either way)."""
        parts = split_token(token, ADMIN) if isinstance(token, str) else None
        if parts is None:
            credentials.verify_secret("", None, None)
            return None
        row = await self.backend.api_token_row(parts[0])
        salt, digest = (row[1], row[2]) if row is not None else (None, None)
        if not credentials.verify_secret(parts[1], salt, digest) or row is None:
            return None
        found = row[0]
        if not found.is_usable(now):
            return None
        if found.last_used is None or now - found.last_used > LAST_USED_EVERY:
            await self.backend.touch_api_token(found.id, now)  # at most once a minute
        return found

    # --- device tokens ------------------------------------------------------------------

    async def create_device_token(self, key: AccessKey, device_id: str,
                                  ttl: float) -> tuple[str, datetime]:
        """A token for ``device_id`` under ``key`` (both already checked by the caller),
        valid ``ttl`` seconds. Returns (token, expiry)."""
        if ttl <= 0:
            raise ValidationError(f"invalid token TTL {ttl!r}: must be more than 0 seconds")
        token, token_id, secret = mint(DEVICE)
        salt, digest = credentials.hash_secret(secret)
        expires = datetime.now(UTC) + timedelta(seconds=ttl)
        await self.backend.insert_device_token(token_id, key.key, device_id, salt, digest,
                                               expires, KEEP_DEVICE_TOKENS)
        return token, expires

    async def device_token_lookup(self, token: str, now: datetime) -> TokenLookup | None:
        """The key, device and scope a device token stands for, as of now; None for a
        token that is not one, wrong, expired, or whose key or device is gone."""
        parts = split_token(token, DEVICE) if isinstance(token, str) else None
        if parts is None:
            credentials.verify_secret("", None, None)
            return None
        return await self._resolver.token_lookup(parts[0], parts[1], now)

    async def prune_device_tokens(self, before: datetime, batch: int = 10_000) -> int:
        """Delete at most ``batch`` device tokens that expired before ``before``."""
        return await self.backend.prune_device_tokens(before, batch)
