"""Compile a Losant-style advanced key query (JSON) into a parameterised SQL condition.

Shape: an object whose members are ANDed. A member is either a logical operator
(``$and`` / ``$or`` / ``$nor`` over a non-empty list of sub-queries) or a field:
``{"field": value}`` means ``$eq``; ``{"field": {"$op": value, ...}}`` ANDs several
operators. Unknown fields, unknown operators and wrongly typed values are a
ValidationError naming them.

Fields (Losant REST names) and what they compare:
  key, name, description         text (null = no value)
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
value reaches SQLite only as a ``?`` parameter. Pattern operators use GLOB (which,
unlike LIKE, is case-sensitive like $eq), with the user's text escaped so that ``*``,
``?`` and ``[`` in a $startsWith/$endsWith/$contains value are literal characters.
"""

# SQL text in this module is assembled only from constants, whitelisted names and
# '?' placeholder counts; every value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from keystore.errors import ValidationError
from keystore.sqlite.db import to_micros

MAX_DEPTH = 16
MAX_PARAMS = 10_000

_LOGICAL = ("$and", "$or", "$nor")
_COMPARE = {"$eq": "=", "$ne": "!=", "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_PATTERN = ("$startsWith", "$endsWith", "$contains", "$like")
_SET = ("$in", "$nin")
ALL_OPERATORS = (*_COMPARE, *_SET, *_PATTERN)


@dataclass(frozen=True, slots=True)
class _Field:
    kind: str  # text | enum | bool | date | list
    sql: str  # column expression, or for lists a SELECT yielding one column "v"
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
    "pubTopics": _Field("list", "SELECT value AS v FROM json_each(k.pub_topics)", _TEXT_OPS),
    "subTopics": _Field("list", "SELECT value AS v FROM json_each(k.sub_topics)", _TEXT_OPS),
    "addresses": _Field("list", "SELECT value AS v FROM json_each(k.addresses)", _TEXT_OPS),
}


def compile_query(query: Mapping[str, Any] | str | None) -> tuple[str, list[Any]]:
    """Return (SQL condition over access_keys aliased ``k``, parameters)."""
    if query is None:
        return "1", []
    if isinstance(query, str):
        if not query.strip():
            return "1", []
        try:
            query = json.loads(query)
        except json.JSONDecodeError as exc:
            raise ValidationError(f"invalid query JSON: {exc.msg} at position {exc.pos}") from None
    params: list[Any] = []
    sql = _compile_object(query, params, depth=0)
    if len(params) > MAX_PARAMS:
        raise ValidationError(f"query too large: more than {MAX_PARAMS} values")
    return sql, params


def _compile_object(query: Any, params: list[Any], depth: int) -> str:
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
    return "(" + " AND ".join(parts) + ")" if parts else "1"


def _compile_logical(op: str, value: Any, params: list[Any], depth: int) -> str:
    if not isinstance(value, list) or not value:
        raise ValidationError(f"invalid {op} {_show(value)}: expected a non-empty list of queries")
    subs = [_compile_object(sub, params, depth + 1) for sub in value]
    if op == "$and":
        return "(" + " AND ".join(subs) + ")"
    joined = "(" + " OR ".join(subs) + ")"
    return joined if op == "$or" else f"(NOT {joined})"


def _compile_field(name: str, value: Any, params: list[Any]) -> str:
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


def _condition(name: str, field: _Field, op: str, operand: Any, params: list[Any]) -> str:
    if field.kind == "list":
        return _list_condition(name, field, op, operand, params)
    encode = _encoder(name, field)
    return _scalar_condition(field.sql, op, operand, encode, name, params)


def _scalar_condition(
    column: str,
    op: str,
    operand: Any,
    encode: Callable[[Any, str], Any],
    name: str,
    params: list[Any],
) -> str:
    if op in _SET:
        if not isinstance(operand, list):
            raise ValidationError(
                f"invalid {op} value {_show(operand)} for {name!r}: expected a list"
            )
        values = [encode(v, op) for v in operand if v is not None]
        tests = []
        if values:
            tests.append(f"{column} IN ({','.join('?' * len(values))})")
            params.extend(values)
        if any(v is None for v in operand):
            tests.append(f"{column} IS NULL")
        found = "(" + " OR ".join(tests) + ")" if tests else "0"
        # coalesce: "NULL IN (...)" is NULL, and a missing value is "not in" the list.
        return found if op == "$in" else f"(NOT coalesce({found}, 0))"
    if op in ("$eq", "$ne") and operand is None:
        return f"({column} IS {'' if op == '$eq' else 'NOT '}NULL)"
    if op == "$ne":
        params.append(encode(operand, op))
        return f"({column} IS NOT ?)"  # null-safe: a missing value is "not equal"
    if op in _COMPARE:
        params.append(encode(operand, op))
        return f"({column} {_COMPARE[op]} ?)"
    params.append(_glob(op, _text(operand, op, name)))
    return f"({column} GLOB ?)"


def _list_condition(name: str, field: _Field, op: str, operand: Any, params: list[Any]) -> str:
    if op in ("$eq", "$ne") and operand == []:
        empty = f"NOT EXISTS ({field.sql})"
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
    exists = f"EXISTS (SELECT 1 FROM ({field.sql}) WHERE {inner})"
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


def like_to_glob(text: str) -> str:
    """A ``$like`` pattern as an SQLite GLOB (or fnmatch) pattern: only ``*`` and ``?``
    are wildcards, so ``[`` is made literal."""
    return text.replace("[", "[[]")


def _glob(op: str, text: str) -> str:
    if op == "$like":
        return like_to_glob(text)
    literal = "".join(f"[{c}]" if c in "*?[" else c for c in text)
    return {"$startsWith": f"{literal}*", "$endsWith": f"*{literal}", "$contains": f"*{literal}*"}[
        op
    ]


def _show(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
