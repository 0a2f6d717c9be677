"""The seam between the keystore and a database: a small dialect interface.

keystore.sql runs every operation of the keystore (each statement written once, with
numbered parameters ``$1``, ``$2`` ...) over a ``Dialect``. SQLite (keystore.sqlite.dialect)
and PostgreSQL (keystore.postgres.dialect) each implement it with what truly differs
between them and nothing else: the driver's calls and its parameter marks, how a
transaction is taken (SQLite's one writer, BEGIN IMMEDIATE; a PostgreSQL pool), how a
driver's errors become the keystore's (``conflict`` below; a lost server is an
UnavailableError), how committed changes are noticed (a polled marker, or LISTEN/NOTIFY),
and a ``Spelling`` of the few SQL fragments the two write differently. No dialect decides
anything about applications, devices or keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from keystore.errors import ConflictError
from keystore.query import Dialect as QueryDialect

Row = Sequence[Any]


@dataclass(frozen=True, slots=True)
class Spelling:
    """How one database writes what the keystore's statements need (keystore.sql.statements
    puts these fragments together; everything else is the same text on both)."""

    query: QueryDialect  # the advanced key query's spelling (keystore.query)
    # A list-valued column from a subquery: (element expression, "FROM ..." rest).
    array: Callable[[str, str], str]
    pair: Callable[[str, str], str]  # two values as one list element
    # "column is one of the texts of parameter n", and that parameter's value from a list.
    in_list: Callable[[str, int], str]
    list_param: Callable[[Sequence[str]], Any]
    ordered_join: str  # a join the planner takes in the order written
    # A row-lock clause ("UPDATE", "KEY SHARE", "UPDATE SKIP LOCKED"); "" where one writer
    # holds the whole database anyway.
    row_lock: Callable[[str], str]
    add_change: str  # one change-feed row: $1 its kind, $2 its subject


class Transaction(Protocol):
    """One open transaction of a dialect."""

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...
    async def value(self, sql: str, *args: Any) -> Any:
        """The first column of the first row (None: no row)."""
    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; returns how many rows it changed."""
    async def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...
    async def insert_rows(self, table: str, columns: Sequence[str],
                          rows: Sequence[Sequence[Any]]) -> None:
        """Insert many rows at once (the fastest bulk path the database has)."""


class Dialect(Protocol):
    location: str  # shown to operators: a file path, or a URL without its password
    spelling: Spelling

    def transaction(self, *, write: bool = True,
                    feed: bool = False) -> AbstractAsyncContextManager[Transaction]:
        """One transaction: a write, or (``write=False``) one consistent snapshot for
        reads of more than one statement. ``feed``: the write makes change-feed rows
        (the triggers of deletes and key changes, ``add_change``)."""
    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """The rows of one reading statement, in a transaction of its own."""
    async def lookup(self, sql: str, *args: Any) -> list[Row]:
        """``fetch`` for a primary-key read on the fastest path the database has (CONNECT)."""
    async def commit_marker(self) -> tuple[int, int] | None:
        """A value that moves whenever anyone commits, or None where the change feed's
        newest id is that value."""
    async def watch_changes(self, wake: Callable[[], None]) -> bool:
        """Call ``wake`` when changes are committed, if the database can push: True if
        it will."""
    async def close(self) -> None: ...


def conflict(detail: str) -> ConflictError:
    """The error a dialect raises for a unique or foreign-key violation: a concurrent
    writer got there first (the keystore's own checks saw the state before it)."""
    return ConflictError(f"conflicts with a concurrent change ({detail})")
