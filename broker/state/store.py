"""The broker-state store interface, and where the state lives.

A store keeps a ``Snapshot`` (broker.state.model) and applies ``Batch``es to it, each
atomically. The embedded implementation is one SQLite file beside the keystore
(broker.state.sqlite; broker.daemon.restore opens the configured one); a server database
(PostgreSQL, with a keystore there) would implement the same three calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from broker.core.settings import Settings
from broker.state.model import Batch, Snapshot
from keystore.errors import KeybrokerError

IN_MEMORY = ":memory:"


class StateError(KeybrokerError):
    """The broker state cannot be read or written (the daemon does not start on it)."""


class StateStore(Protocol):
    location: str  # shown to operators

    async def load(self) -> Snapshot: ...

    async def write(self, batch: Batch) -> None: ...

    async def close(self) -> None: ...


def state_file(settings: Settings) -> Path:
    """``[persistence] path``, else beside the keystore: ``data/keybroker.db`` ->
    ``data/keybroker.state.db`` (an in-memory keystore gets an in-memory state). Absolute,
    like the keystore's path in messages and the start-up line."""
    if settings.state_path is not None:
        path = settings.state_path
        return path if str(path) == IN_MEMORY else path.absolute()
    db = settings.db_path
    if str(db) == IN_MEMORY:
        return db
    return db.with_name(f"{db.stem}.state.db").absolute()

