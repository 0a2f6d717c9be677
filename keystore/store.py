"""KeyStore: the keystore's API, by resource (applications, devices, keys, change feed), over
its one backend (keystore.sql) in the dialect of an SQLite file (keystore.sqlite, the
default) or, named by a ``postgresql://`` URL, of a PostgreSQL database (keystore.postgres).

Every public operation is one backend transaction and validates its whole input first,
so a refused call writes nothing.

    async with KeyStore.open(path) as ks:
        key, secret = await ks.create_key(device_tags=["floor=1"])
"""

from __future__ import annotations

import os
from collections.abc import Generator
from types import TracebackType
from typing import Any, Self

from keystore.apps import DEFAULT_APP, validate_limit
from keystore.backend import Backend
from keystore.connect import ConnectResolver, Lru
from keystore.connections import SCOPE_CACHE, ConnectionOps
from keystore.defaults import DEFAULT_DEVICE_PREFIX, DEFAULT_POOL_SIZE, DEFAULT_STATEMENT_TIMEOUT
from keystore.devices import DeviceOps
from keystore.feed import FeedOps
from keystore.keys import KeyOps
from keystore.location import is_url
from keystore.sql.backend import SqlBackend
from keystore.sql.dialect import Dialect
from keystore.sqlite.dialect import SqliteDialect
from keystore.tokens import TokenOps
from keystore.topics import validate_device_prefix


class KeyStore(DeviceOps, KeyOps, TokenOps, FeedOps, ConnectionOps):
    def __init__(self, backend: Backend, *, device_prefix: str, max_keys: int,
                 max_devices: int = 0) -> None:
        self.backend = backend
        self.device_prefix = device_prefix
        # The limits of applications that set none (keystore.apps).
        self.max_keys = max_keys
        self.max_devices = max_devices
        self.default_app = DEFAULT_APP
        self._resolver = ConnectResolver(backend)
        self._scopes = Lru(SCOPE_CACHE)
        self._digests = Lru(SCOPE_CACHE)
        self._stored = Lru(SCOPE_CACHE)

    @property
    def location(self) -> str:
        """Where the keystore lives (a file path, or a URL without its password)."""
        return self.backend.location

    @classmethod
    def open(
        cls, target: str | os.PathLike[str], *, device_prefix: str = DEFAULT_DEVICE_PREFIX,
        max_keys: int = 0, max_devices: int = 0, pool_size: int = DEFAULT_POOL_SIZE,
        statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT, create: bool = True,
    ) -> Opener:
        """Open (creating and migrating if needed) the keystore at ``target``: an SQLite
        file path, or a ``postgresql://user@host:port/dbname`` URL (then ``pool_size``
        connections at most, each statement cancelled after ``statement_timeout`` s).
        ``max_keys``, ``max_devices``: the limits of applications that set none (0: no
        limit). ``create=False``: a missing or empty SQLite file is a NotFoundError, not a
        new keystore (a PostgreSQL database is made by its administrator; keybroker
        creates its tables). A file that is not a keystore is refused either way,
        unchanged."""
        return Opener(os.fspath(target), device_prefix, (max_keys, max_devices), pool_size,
                      statement_timeout, create)

    async def close(self) -> None:
        await self.backend.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Opener:
    """Result of KeyStore.open: use ``async with`` (closes on exit) or ``await`` it
    (then call ``await ks.close()``)."""

    def __init__(self, target: str, device_prefix: str, limits: tuple[int, int],
                 pool_size: int, statement_timeout: float, create: bool) -> None:
        self._args = (target, device_prefix, limits, pool_size, statement_timeout, create)
        self._store: KeyStore | None = None

    async def _open(self) -> KeyStore:
        target, device_prefix, (max_keys, max_devices), pool_size, timeout, create = self._args
        validate_limit(max_keys, "max_keys")
        validate_limit(max_devices, "max_devices")
        validate_device_prefix(device_prefix)
        db: Dialect
        if is_url(target):
            # Imported here: asyncpg costs every SQLite user (each CLI call) its load time.
            from keystore.postgres.dialect import PostgresDialect

            db = await PostgresDialect.open(target, pool_size=pool_size,
                                            statement_timeout=timeout)
        else:
            db = await SqliteDialect.open(target, create=create)
        return KeyStore(SqlBackend(db), device_prefix=device_prefix, max_keys=max_keys,
                        max_devices=max_devices)

    def __await__(self) -> Generator[Any, None, KeyStore]:
        return self._open().__await__()

    async def __aenter__(self) -> KeyStore:
        self._store = await self._open()
        return self._store

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._store is not None:
            await self._store.close()
