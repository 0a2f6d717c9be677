"""Everything CONNECT needs from the keystore, in one round trip when nothing changed.

``ConnectResolver.lookup`` reads the auth generation and the key row in a single query
(so an unknown key and a wrong secret cost the same: one query, one HMAC). That query is a
primary-key read of about 10 µs, so it runs synchronously on a private read-only
connection rather than paying aiosqlite's thread round trip (WAL readers are not blocked
by writers; if the file is busy anyway, it falls back to the shared async connection).
Resolved scopes and device existence are cached in memory, bounded, for as long as the
generation (bumped by triggers on device and tag inserts/deletes, see migrations._V3) stays
the same, so a tag change is seen by the very next CONNECT.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from keystore import credentials
from keystore.db import KEY_COLUMN_COUNT, KEY_COLUMNS, from_micros, row_to_key
from keystore.models import AccessKey

if TYPE_CHECKING:
    from keystore.store import KeyStore

log = logging.getLogger(__name__)

LAST_USED = 13  # position of last_used in KEY_COLUMNS

K = TypeVar("K")
V = TypeVar("V")

# KEY_COLUMNS is our own constant; the key is a bound parameter.
LOOKUP_SQL = (
    "SELECT (SELECT value FROM meta WHERE name = 'auth_generation'), "  # noqa: S608
    + KEY_COLUMNS
    + ", k.salt, k.secret_hash FROM (SELECT 1) LEFT JOIN access_keys k ON k.key = ?"
)


@dataclass(frozen=True, slots=True)
class ConnectLookup:
    key: AccessKey | None  # None: unknown key or wrong secret (indistinguishable)
    device_registered: bool
    device_in_scope: bool
    scope: frozenset[str] | None  # None = all devices (unrestricted key)


class _Lru(Generic[K, V]):
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
    def __init__(self, store: KeyStore, *, max_scopes: int = 4096,
                 max_devices: int = 100_000) -> None:
        self.store = store
        self.generation: int | None = None
        self._scopes: _Lru[str, frozenset[str]] = _Lru(max_scopes)
        self._devices: _Lru[str, bool] = _Lru(max_devices)
        self._ro: sqlite3.Connection | None = None
        self._keys: _Lru[tuple[Any, ...], AccessKey] = _Lru(max_scopes)

    def _read_now(self, key: str) -> list[Any] | None:
        """The lookup row from the read-only connection, or None to use the async path."""
        path = self.store.path
        if path is None or path == ":memory:":
            return None
        try:
            if self._ro is None:
                uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
                self._ro = sqlite3.connect(uri, uri=True, isolation_level=None,
                                           check_same_thread=False)
                self._ro.execute("PRAGMA busy_timeout = 0")
            return self._ro.execute(LOOKUP_SQL, (key,)).fetchall()
        except sqlite3.Error as exc:
            log.debug("read-only CONNECT lookup unavailable (%s); using the shared connection",
                      exc)
            return None

    def close(self) -> None:
        if self._ro is not None:
            self._ro.close()
            self._ro = None

    async def lookup(self, key: str, secret: str, device_id: str) -> ConnectLookup:
        rows = self._read_now(key)
        if rows is None:
            rows = await self.store._fetchall(LOOKUP_SQL, (key,))
        row = rows[0]
        if row[0] != self.generation:
            self.generation = row[0]
            self._scopes = _Lru(self._scopes.size)
            self._devices = _Lru(self._devices.size)
        seen = row[0]  # results read below are cached only if no newer lookup moved on
        if not credentials.verify_secret(secret, row[-2], row[-1]):
            return ConnectLookup(None, False, False, None)
        access_key = self._key_from_row(row[1 : 1 + KEY_COLUMN_COUNT])
        if access_key.all_devices:
            registered = await self._exists(device_id, seen)
            return ConnectLookup(access_key, registered, registered, None)
        scope = self._scopes.get(access_key.key)
        if scope is None:
            scope = await self.store.resolve_scope(access_key) or frozenset()
            if self.generation == seen:
                self._scopes.put(access_key.key, scope)
        in_scope = device_id in scope
        registered = in_scope or await self._exists(device_id, seen)
        return ConnectLookup(access_key, registered, in_scope, scope)

    def _key_from_row(self, row: tuple[Any, ...]) -> AccessKey:
        """Parse a key row, reusing the AccessKey of an identical row (the row is read
        fresh on every CONNECT; only its parse is cached). last_used, which changes on
        every connection, is left out of the identity and taken from the row."""
        identity = row[:LAST_USED] + row[LAST_USED + 1 :]
        cached = self._keys.get(identity)
        if cached is None:
            cached = row_to_key(row)
            self._keys.put(identity, cached)
        last_used = from_micros(row[LAST_USED])
        return cached if cached.last_used == last_used else replace(cached, last_used=last_used)

    async def _exists(self, device_id: str, seen: int) -> bool:
        known = self._devices.get(device_id)
        if known is None:
            known = await self.store.device_exists(device_id)
            # While we awaited, a concurrent lookup may have seen a newer generation and
            # reset the caches: a result read under the older one must not land there.
            if self.generation == seen:
                self._devices.put(device_id, known)
        return known
