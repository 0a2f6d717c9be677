"""Every row of every table of a keystore, read outside the KeyStore API: to check that a
refused call wrote nothing, or that a secret is stored nowhere (either backend)."""

# Table names come from the database's own catalog, not from input.
# ruff: noqa: S608

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import asyncpg

from keystore.location import is_url
from tests.support.postgres import run_sync

Dump = dict[str, list[tuple[Any, ...]]]


def dump(target: str | Path) -> Dump:
    if is_url(str(target)):
        return run_sync(lambda: _dump_postgres(str(target)))
    with contextlib.closing(sqlite3.connect(target)) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr)
                for t in tables}


async def _dump_postgres(url: str) -> Dump:
    conn = await asyncpg.connect(url)
    try:
        tables = [r[0] for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'")]
        return {t: sorted((tuple(r) for r in await conn.fetch(f'SELECT * FROM "{t}"')), key=repr)
                for t in tables}
    finally:
        await conn.close()


def dump_text(target: str | Path) -> bytes:
    """Everything stored, as bytes to search for a value (files and sidecars for SQLite)."""
    if is_url(str(target)):
        return repr(dump(target)).encode()
    path = Path(target)
    return b"".join(p.read_bytes() for p in path.parent.iterdir()
                    if p.name.startswith(path.name))
