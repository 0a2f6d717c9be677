"""Compile a Losant-style advanced key query (JSON) into a parameterised SQL condition.

Shape: an object whose members are ANDed. A member is either a logical operator
(``$and`` / ``$or`` / ``$nor`` over a non-empty list of sub-queries) or a field:
``{"field": value}`` means ``$eq``; ``{"field": {"$op": value, ...}}`` ANDs several
operators. Unknown fields, unknown operators and wrongly typed values are a
ValidationError naming them.

Fields (Losant REST names) and what they compare:
  id, key, name, description     text (null = no value)
  status                         active / inactive
  filterType                     topic mode: all / none / whitelist (= only) / blacklist (= except)
  addressFilterType              all / whitelist (= only) / blacklist (= except)
  allDevices                     true / false (our extension)
  creationDate, lastUpdated,     ISO-8601 dates (no offset = UTC); null = no value
  expirationDate, lastUsed
  deviceIds, pubTopics,          lists of text
  subTopics, addresses
  deviceTags                     list of "key=value" strings, e.g. {"deviceTags": "floor=1"} or
                                 {"deviceTags": {"$startsWith": "floor="}}

Operators: $eq $ne $gt $gte $lt $lte $in $nin on text, dates and list elements;
$startsWith $endsWith $contains $like on text and list elements; enums and booleans take
$eq $ne $in $nin. Text comparison is exact and case-sensitive ($gt etc. compare by code
point). ``$like`` is a glob: ``*`` any run of characters, ``?`` one character, nothing
else is special and there is no escape. On a null text field every operator except
``$eq: null``, ``$ne``, ``$nin`` is false (MongoDB semantics: ``$ne``/``$nin`` match a
missing value).

List fields: a condition holds when ANY element satisfies it. The negative operators
are the negation of that: ``$ne: x`` = no element equals x, ``$nin: [..]`` = no element
is in the list (both hold for an empty list). ``{"pubTopics": []}`` matches an empty
list and ``{"pubTopics": {"$ne": []}}`` a non-empty one.

Safety: field names map through a fixed whitelist to SQL text written here; every
value reaches the database only as a bound parameter. Pattern operators are
case-sensitive like $eq, with the user's text escaped so that wildcards in a
$startsWith/$endsWith/$contains value are literal characters.

Dialects: the same query compiles for SQLite (``?N`` parameters, GLOB, ``json_each``) and
PostgreSQL (``$n`` parameters, LIKE with backslash escapes, ``jsonb_array_elements_text``
in the "C" collation, so text compares by code point as in SQLite).
"""

# SQL text in this module is assembled only from constants, whitelisted names and
# numbered placeholders; every value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from keystore.errors import ValidationError
from keystore.rows import to_micros

MAX_DEPTH = 16
MAX_PARAMS = 10_000

_LOGICAL = ("$and", "$or", "$nor")
_COMPARE = {"$eq": "=", "$ne": "!=", "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_PATTERN = ("$startsWith", "$endsWith", "$contains", "$like")
_SET = ("$in", "$nin")
ALL_OPERATORS = (*_COMPARE, *_SET, *_PATTERN)


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one database spells what the compiler writes."""

    name: str
    placeholder: Callable[[int], str]  # the n-th parameter (1-based)
    pattern_op: str  # a case-sensitive wildcard match
    pattern: Callable[[str, str], str]  # (operator, user text) -> pattern
    like: Callable[[str], str]  # a $like pattern (* and ? wildcards) -> pattern
    json_elements: str  # SELECT yielding column "v" for each element of JSON array {}


def like_to_glob(text: str) -> str:
    """A ``$like`` pattern as an SQLite GLOB (or fnmatch) pattern: only ``*`` and ``?``
    are wildcards, so ``[`` is made literal."""
    return text.replace("[", "[[]")


def _glob(op: str, text: str) -> str:
    if op == "$like":
        return like_to_glob(text)
    literal = "".join(f"[{c}]" if c in "*?[" else c for c in text)
    return {"$startsWith": f"{literal}*", "$endsWith": f"*{literal}",
            "$contains": f"*{literal}*"}[op]


def _escape_like(text: str) -> str:
    return "".join("\\" + c if c in "\\%_" else c for c in text)


def _pg_like(text: str) -> str:
    return "".join({"*": "%", "?": "_"}.get(c, _escape_like(c)) for c in text)


def _pg_pattern(op: str, text: str) -> str:
    if op == "$like":
        return _pg_like(text)
    literal = _escape_like(text)
    return {"$startsWith": f"{literal}%", "$endsWith": f"%{literal}",
            "$contains": f"%{literal}%"}[op]


SQLITE = Dialect("sqlite", lambda n: f"?{n}", "GLOB", _glob, like_to_glob,
                 "SELECT value AS v FROM json_each({})")
POSTGRES = Dialect("postgresql", lambda n: f"${n}", "LIKE", _pg_pattern, _pg_like,
                   'SELECT jsonb_array_elements_text({}) COLLATE "C" AS v')


@dataclass(frozen=True, slots=True)
class _Field:
    kind: str  # text | enum | bool | date | list | json
    sql: str  # column expression; for lists a SELECT yielding one column "v"
    operators: tuple[str, ...]
    values: Mapping[str, str] | None = None  # enum: accepted value -> stored value


_TEXT_OPS = ALL_OPERATORS
_EQ_SET = ("$eq", "$ne", "$in", "$nin")
_DATE_OPS = (*_COMPARE, *_SET)
_TOPIC_MODES = {
    "all": "all",
    "none": "none",
    "whitelist": "only",
    "blacklist": "except",
    "only": "only",
    "except": "except",
}
_ADDRESS_MODES = {
    "all": "all",
    "whitelist": "only",
    "blacklist": "except",
    "only": "only",
    "except": "except",
}

FIELDS: dict[str, _Field] = {
    "id": _Field("text", "k.id", _TEXT_OPS),
    "key": _Field("text", "k.key", _TEXT_OPS),
    "name": _Field("text", "k.name", _TEXT_OPS),
    "description": _Field("text", "k.description", _TEXT_OPS),
    "status": _Field("enum", "k.status", _EQ_SET, {"active": "active", "inactive": "inactive"}),
    "filterType": _Field("enum", "k.topic_mode", _EQ_SET, _TOPIC_MODES),
    "addressFilterType": _Field("enum", "k.address_mode", _EQ_SET, _ADDRESS_MODES),
    "allDevices": _Field("bool", "k.all_devices", ("$eq", "$ne")),
    "creationDate": _Field("date", "k.created_at", _DATE_OPS),
    "lastUpdated": _Field("date", "k.updated_at", _DATE_OPS),
    "expirationDate": _Field("date", "k.expires_at", _DATE_OPS),
    "lastUsed": _Field("date", "k.last_used", _DATE_OPS),
    "deviceIds": _Field(
        "list", "SELECT device_id AS v FROM key_devices WHERE key = k.key", _TEXT_OPS
    ),
    "deviceTags": _Field(
        "list", "SELECT tkey || '=' || tvalue AS v FROM key_tags WHERE key = k.key", _TEXT_OPS
    ),
    # JSON arrays: the dialect's element SELECT over the column (see Dialect).
    "pubTopics": _Field("json", "k.pub_topics", _TEXT_OPS),
    "subTopics": _Field("json", "k.sub_topics", _TEXT_OPS),
    "addresses": _Field("json", "k.addresses", _TEXT_OPS),
}


class _Params(list[Any]):
    """The bound values, each added where its placeholder is written."""

    def __init__(self, dialect: Dialect, before: list[Any]) -> None:
        super().__init__(before)
        self.dialect = dialect

    def add(self, value: Any) -> str:
        self.append(value)
        return self.dialect.placeholder(len(self))


def compile_query(query: Mapping[str, Any] | str | None, dialect: Dialect = SQLITE,
                  before: list[Any] | None = None) -> tuple[str, list[Any]]:
    """Return (SQL condition over access_keys aliased ``k``, parameters). ``before`` are
    parameters of the statement that come ahead of the condition (PostgreSQL numbers
    them); the returned list starts with them."""
    params = _Params(dialect, before or [])
    if query is None:
        return "TRUE", list(params)
    if isinstance(query, str):
        if not query.strip():
            return "TRUE", list(params)
        try:
            query = json.loads(query)
        except json.JSONDecodeError as exc:
            raise ValidationError(f"invalid query JSON: {exc.msg} at position {exc.pos}") from None
    sql = _compile_object(query, params, depth=0)
    if len(params) > MAX_PARAMS:
        raise ValidationError(f"query too large: more than {MAX_PARAMS} values")
    return sql, list(params)


def _compile_object(query: Any, params: _Params, depth: int) -> str:
    if not isinstance(query, Mapping):
        raise ValidationError(f"invalid query {_show(query)}: expected a JSON object")
    if depth > MAX_DEPTH:
        raise ValidationError(f"query nested deeper than {MAX_DEPTH} levels")
    parts: list[str] = []
    for member, value in query.items():
        if member in _LOGICAL:
            parts.append(_compile_logical(member, value, params, depth))
        elif isinstance(member, str) and member.startswith("$"):
            raise ValidationError(
                f"unknown query operator {member!r}: use $and, $or or $nor at this level"
            )
        elif member in FIELDS:
            parts.append(_compile_field(member, value, params))
        else:
            raise ValidationError(
                f"unknown query field {member!r}: known fields are {', '.join(FIELDS)}"
            )
    return "(" + " AND ".join(parts) + ")" if parts else "TRUE"


def _compile_logical(op: str, value: Any, params: _Params, depth: int) -> str:
    if not isinstance(value, list) or not value:
        raise ValidationError(f"invalid {op} {_show(value)}: expected a non-empty list of queries")
    subs = [_compile_object(sub, params, depth + 1) for sub in value]
    if op == "$and":
        return "(" + " AND ".join(subs) + ")"
    joined = "(" + " OR ".join(subs) + ")"
    return joined if op == "$or" else f"(NOT {joined})"


def _compile_field(name: str, value: Any, params: _Params) -> str:
    field = FIELDS[name]
    if isinstance(value, Mapping):
        if not value:
            raise ValidationError(f"invalid condition on {name!r}: empty operator object")
        parts = []
        for op, operand in value.items():
            if op not in ALL_OPERATORS:
                raise ValidationError(f"unknown query operator {op!r} on field {name!r}")
            if op not in field.operators:
                raise ValidationError(f"operator {op!r} does not apply to field {name!r}")
            parts.append(_condition(name, field, op, operand, params))
        return "(" + " AND ".join(parts) + ")"
    return _condition(name, field, "$eq", value, params)


def _condition(name: str, field: _Field, op: str, operand: Any, params: _Params) -> str:
    if field.kind == "list":
        return _list_condition(name, field.sql, op, operand, params)
    if field.kind == "json":
        return _list_condition(name, params.dialect.json_elements.format(field.sql), op,
                               operand, params)
    encode = _encoder(name, field)
    return _scalar_condition(field.sql, op, operand, encode, name, params)


def _scalar_condition(
    column: str,
    op: str,
    operand: Any,
    encode: Callable[[Any, str], Any],
    name: str,
    params: _Params,
) -> str:
    if op in _SET:
        if not isinstance(operand, list):
            raise ValidationError(
                f"invalid {op} value {_show(operand)} for {name!r}: expected a list"
            )
        values = [encode(v, op) for v in operand if v is not None]
        tests = []
        if values:
            tests.append(f"{column} IN ({','.join(params.add(v) for v in values)})")
        if any(v is None for v in operand):
            tests.append(f"{column} IS NULL")
        found = "(" + " OR ".join(tests) + ")" if tests else "FALSE"
        # coalesce: "NULL IN (...)" is NULL, and a missing value is "not in" the list.
        return found if op == "$in" else f"(NOT coalesce({found}, FALSE))"
    if op in ("$eq", "$ne") and operand is None:
        return f"({column} IS {'' if op == '$eq' else 'NOT '}NULL)"
    if op == "$ne":
        # null-safe: a missing value is "not equal"
        return f"({column} IS DISTINCT FROM {params.add(encode(operand, op))})"
    if op in _COMPARE:
        return f"({column} {_COMPARE[op]} {params.add(encode(operand, op))})"
    dialect = params.dialect
    pattern = dialect.pattern(op, _text(operand, op, name))
    return f"({column} {dialect.pattern_op} {params.add(pattern)})"


def _list_condition(name: str, elements: str, op: str, operand: Any, params: _Params) -> str:
    """``elements`` is a SELECT yielding one column "v" per element."""
    if op in ("$eq", "$ne") and operand == []:
        empty = f"NOT EXISTS ({elements})"
        return f"({empty})" if op == "$eq" else f"(NOT {empty})"
    # Any element satisfies the positive form; $ne / $nin negate "any element equals / is in".
    positive = {"$ne": "$eq", "$nin": "$in"}.get(op, op)

    def element(v: Any, o: str) -> str:
        return _text(v, o, name)

    if positive in _SET:
        if not isinstance(operand, list):
            raise ValidationError(
                f"invalid {op} value {_show(operand)} for {name!r}: expected a list"
            )
    elif operand is None:
        raise ValidationError(f"invalid {op} value null for list field {name!r}")
    inner = _scalar_condition("v", positive, operand, element, name, params)
    exists = f"EXISTS (SELECT 1 FROM ({elements}) AS elements WHERE {inner})"
    return f"(NOT {exists})" if positive != op else f"({exists})"


def _encoder(name: str, field: _Field) -> Callable[[Any, str], Any]:
    if field.kind == "text":
        return lambda v, op: _text(v, op, name)
    if field.kind == "date":
        return lambda v, op: _date(v, op, name)
    if field.kind == "bool":

        def boolean(v: Any, op: str) -> int:
            if not isinstance(v, bool):
                raise ValidationError(
                    f"invalid {op} value {_show(v)} for {name!r}: expected true or false"
                )
            return int(v)

        return boolean
    assert field.values is not None
    values = field.values

    def enum(v: Any, op: str) -> str:
        if not isinstance(v, str) or v not in values:
            raise ValidationError(
                f"invalid {op} value {_show(v)} for {name!r}: expected one of {', '.join(values)}"
            )
        return values[v]

    return enum


def _text(value: Any, op: str, name: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"invalid {op} value {_show(value)} for {name!r}: expected a string")
    return value


def _date(value: Any, op: str, name: str) -> int:
    if not isinstance(value, str):
        raise ValidationError(
            f"invalid {op} value {_show(value)} for {name!r}: expected an ISO-8601 date string"
        )
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValidationError(
            f"invalid {op} value {value!r} for {name!r}: not an ISO-8601 date"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return to_micros(when)


def _show(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
