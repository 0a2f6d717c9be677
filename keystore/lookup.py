"""Finding one stored thing by what an operator types for it: one rule for applications,
API tokens and access keys.

A reference names a thing by its id (ids and keys are lowercase hex, so case does not
matter there), by its name (exact), and an access key also by its key or by a prefix of
its key of at least ``MIN_PREFIX_LEN`` hex characters. A whole id or key always means
that thing, whatever else is named like it; otherwise the reference must name exactly
one thing, and an ambiguous one is refused with the candidates listed on one line.

``Lookup.sql`` is the one statement both databases run (numbered parameters ``$N``, as every
statement of keystore.sql); ``Lookup.params`` are its values and ``Lookup.pick`` applies
the rule to the rows it returns.
"""

# SQL text here is assembled only from the constants below; every value is a bound
# parameter.
# ruff: noqa: S608

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from keystore import credentials
from keystore.errors import NotFoundError, ValidationError
from keystore.validation import MIN_PREFIX_LEN

LISTED = 5  # candidates an ambiguity error names
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class Lookup:
    noun: str  # how messages name the thing: "application"
    table: str  # "applications a"
    ids: tuple[str, ...]  # columns a reference names the thing by whole: ("a.id",)
    name: str  # the name column
    label: str  # the column an ambiguity lists candidates by
    prefix: str | None = None  # a lowercase-hex column a reference may be a prefix of
    scope: str | None = None  # the application column, when names are unique within one

    def sql(self, columns: str) -> str:
        """SELECT (whole id?), label, name, ``columns`` of the things a reference may
        name. Parameters: 1 the
        reference, 2 it in lowercase, 3 the application (scoped lookups), then the
        prefix range [low, high) (prefix lookups). Each alternative is one index lookup
        (the scope is repeated in each so that the planner can see that)."""
        whole = " OR ".join(f"{column} = $2" for column in self.ids)
        terms = [*(f"{column} = $2" for column in self.ids), f"{self.name} = $1"]
        after = 3
        if self.scope is not None:
            terms = [f"{self.scope} = $3 AND {term}" for term in terms]
            after = 4
        if self.prefix is not None:
            # "|| ''" keeps the planner off the application's index for this term: a
            # range of the primary key reads a few rows, the application's index all of
            # its keys.
            terms.append(f"{self.prefix} >= ${after} AND {self.prefix} < ${after + 1}"
                         + (f" AND {self.scope} || '' = $3" if self.scope else ""))
        where = " OR ".join(f"({term})" for term in terms)
        return (f"SELECT ({whole}), {self.label}, {self.name}, {columns} FROM {self.table} "
                f"WHERE {where} ORDER BY 1 DESC, 2 LIMIT {LISTED + 1}")

    def params(self, ref: object, scope: str | None = None) -> tuple[str, ...]:
        """The values of ``sql`` for a reference (and, scoped, the application id)."""
        if not isinstance(ref, str):
            raise ValidationError(f"invalid {self.noun} {ref!r}: must be a name or an id")
        lowered = ref.strip().lower()
        values: tuple[str, ...] = (ref.strip(), lowered)
        if self.scope is not None:
            assert scope is not None
            values += (scope,)
        if self.prefix is not None:
            # An empty range when the reference cannot be a prefix of a key.
            prefix = lowered if _is_prefix(lowered) else ""
            values += (prefix, prefix + "g" if prefix else "")  # hex sorts below "g"
        return values

    def pick(self, ref: str, rows: Sequence[Sequence[Any]]) -> Sequence[Any]:
        """The ``columns`` of the one thing ``ref`` names (rows from ``sql``, whole-id
        matches first)."""
        if not rows:
            raise NotFoundError(self._missing(ref))
        if rows[0][0] or len(rows) == 1:
            return tuple(rows[0])[3:]
        listed = ", ".join(f"{row[1]} ({row[2]})" if row[2] is not None else str(row[1])
                           for row in rows[:LISTED])
        more = ", ..." if len(rows) > LISTED else ""
        raise NotFoundError(f"{self.noun} {ref!r} is ambiguous: it names {listed}{more}; "
                            "give one of them whole")

    def _missing(self, ref: str) -> str:
        if self.prefix is not None and len(ref.strip()) < MIN_PREFIX_LEN:
            return (f"no {self.noun} {ref!r} (by name; a key prefix needs at least "
                    f"{MIN_PREFIX_LEN} characters)")
        return f"no {self.noun} {ref!r}"


def _is_prefix(text: str) -> bool:
    return MIN_PREFIX_LEN <= len(text) < credentials.KEY_HEX_LEN and set(text) <= _HEX


APPLICATION = Lookup("application", "applications a", ("a.id",), "a.name", "a.id")
API_TOKEN = Lookup("API token", "api_tokens t", ("t.id",), "t.name", "t.id")
ACCESS_KEY = Lookup("access key", "access_keys k", ("k.key", "k.id"), "k.name", "k.key",
                    prefix="k.key", scope="k.app_id")
