"""Everything CONNECT needs from the keystore, in one round trip when nothing changed.

``ConnectResolver.lookup`` reads the auth generation and the key in a single backend call
(so an unknown key and a wrong secret cost the same: one read, one HMAC). Resolved scopes
and device existence are cached in memory, bounded, for as long as the generation
(bumped whenever devices or their tags change) stays the same, so a tag change is seen by
the very next CONNECT.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from keystore import credentials
from keystore.backend import Backend
from keystore.models import AccessKey

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class ConnectLookup:
    key: AccessKey | None  # None: unknown key or wrong secret (indistinguishable)
    device_registered: bool  # a device of the key's application
    device_in_scope: bool
    scope: frozenset[str] | None  # None = all devices (unrestricted key)


@dataclass(frozen=True, slots=True)
class TokenLookup:
    """What a device token stands for now: its key and device, checked like a CONNECT."""

    facts: ConnectLookup
    device_id: str
    expires_at: datetime


class Lru(Generic[K, V]):
    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[K, V] = OrderedDict()

    def get(self, name: K) -> V | None:
        value = self.items.get(name)
        if value is not None:
            self.items.move_to_end(name)
        return value

    def put(self, name: K, value: V) -> None:
        self.items[name] = value
        self.items.move_to_end(name)
        if len(self.items) > self.size:
            self.items.popitem(last=False)


class ConnectResolver:
    def __init__(self, backend: Backend, *, max_scopes: int = 4096,
                 max_devices: int = 100_000) -> None:
        self.backend = backend
        self.generation: int | None = None
        self._scopes: Lru[str, frozenset[str]] = Lru(max_scopes)
        self._devices: Lru[str, str] = Lru(max_devices)  # device id -> its application

    async def lookup(self, key: str, secret: str, device_id: str) -> ConnectLookup:
        if not isinstance(key, str) or not isinstance(secret, str):
            credentials.verify_secret("", None, None)  # the same cost as a wrong secret
            return ConnectLookup(None, False, False, None)
        row = await self.backend.connect_row(key)
        seen = self._observe(row.generation)
        if not credentials.verify_secret(secret, row.salt, row.secret_hash) or row.key is None:
            return ConnectLookup(None, False, False, None)
        if row.listed_scope is not None and self._scopes.get(row.key.key) is None \
                and self.generation == seen:
            self._scopes.put(row.key.key, row.listed_scope)  # read with the key already
        return await self._facts(row.key, device_id, seen)

    async def verified_lookup(self, key: str, device_id: str) -> ConnectLookup:
        """The facts of ``lookup`` for a key whose secret an earlier request of the same
        CONNECT checked (an external engine asks for credentials and for admission in two
        requests, keybroker.authsvc): the key is read fresh, the secret is not looked at."""
        row = await self.backend.connect_row(key)
        seen = self._observe(row.generation)
        if row.key is None:
            return ConnectLookup(None, False, False, None)
        return await self._facts(row.key, device_id, seen)

    async def token_lookup(self, token_id: str, secret: str,
                           now: datetime) -> TokenLookup | None:
        """A device token (keystore.tokens): its secret, expiry, key and device, with the
        key's scope as of now, in one round trip when nothing changed."""
        row = await self.backend.device_token_row(token_id)
        if row is None:
            credentials.verify_secret(secret, None, None)
            return None
        seen = self._observe(row.generation)
        if not credentials.verify_secret(secret, row.salt, row.secret_hash) or \
                row.key is None or now >= row.expires_at:
            return None
        facts = await self._facts(row.key, row.device_id, seen)
        return TokenLookup(facts, row.device_id, row.expires_at)

    def _observe(self, generation: int) -> int:
        """Drop the caches when the generation moved; returns it (see _facts)."""
        if generation != self.generation:
            self.generation = generation
            self._scopes = Lru(self._scopes.size)
            self._devices = Lru(self._devices.size)
        return generation

    async def _facts(self, access_key: AccessKey, device_id: str, seen: int) -> ConnectLookup:
        """Device registration and scope for an authenticated key. ``seen`` is the
        generation its row was read under: results are cached only if no newer lookup
        moved on meanwhile."""
        if access_key.all_devices:  # every device of the key's application
            registered = await self._app_of(device_id, seen) == access_key.app_id
            return ConnectLookup(access_key, registered, registered, None)
        scope = self._scopes.get(access_key.key)
        if scope is None:
            scope = await self.backend.scope_of(access_key)
            if self.generation == seen:
                self._scopes.put(access_key.key, scope)
        in_scope = device_id in scope
        registered = in_scope or await self._app_of(device_id, seen) == access_key.app_id
        return ConnectLookup(access_key, registered, in_scope, scope)

    async def _app_of(self, device_id: str, seen: int) -> str:
        """The device's application ("" for no device); a device of another application
        is, for this key, no device at all."""
        known = self._devices.get(device_id)
        if known is None:
            known = await self.backend.device_app(device_id) or ""
            # While we awaited, a concurrent lookup may have seen a newer generation and
            # reset the caches: a result read under the older one must not land there.
            if self.generation == seen:
                self._devices.put(device_id, known)
        return known
