"""Query parameters as Losant's clients send them, checked before any work is done, and
``parse_json``, the one reader of JSON a request carries (its body, the ``query``
parameter).

Losant's REST client sends ``_actions``/``_links``/``_embedded`` on every call (accepted
and ignored), booleans as ``True``/``true``, numbers as strings and ``query`` as a JSON
string. Anything else a route does not list is refused, naming the parameter.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from multidict import MultiMapping

from broker.api.errors import bad_request

ALWAYS = ("_actions", "_links", "_embedded")
MAX_PER_PAGE = 1000
MAX_PAGE = 1_000_000  # page x perPage stays far below SQLite's 64-bit offsets
DEFAULT_PER_PAGE = 100
TRUE = frozenset({"true", "True", "TRUE", "1"})
FALSE = frozenset({"false", "False", "FALSE", "0"})


def checked_query(raw: MultiMapping[str], allowed: Iterable[str]) -> dict[str, str]:
    """One value per parameter; unknown or repeated parameters are refused."""
    known = set(allowed) | set(ALWAYS)
    out: dict[str, str] = {}
    for name, value in raw.items():
        if name not in known:
            raise bad_request(f"unknown query parameter {name!r}")
        if name in out:
            raise bad_request(f"query parameter {name!r} given more than once")
        out[name] = value
    for name in ALWAYS:
        if name in out:
            as_bool(name, out.pop(name))
    return out


def as_bool(name: str, text: str) -> bool:
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise bad_request(f"invalid {name} {text!r}: must be true or false")


def as_int(name: str, text: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise bad_request(f"invalid {name} {text!r}: must be a whole number") from None
    if value < low or (high is not None and value > high):
        bounds = f"{low} or more" if high is None else f"{low}-{high}"
        raise bad_request(f"invalid {name} {text!r}: must be {bounds}")
    return value


def parse_json(what: str, text: str | bytes) -> Any:
    """JSON that reads back as it was written, or a 400 naming ``what`` and the problem.
    Python's parser takes NaN and Infinity, and reads a number beyond a double (1e999999)
    as infinity; passed on, either would be written out as ``NaN``/``Infinity``, which no
    JSON parser reads (a state message would reach its subscribers as invalid JSON)."""
    try:
        return json.loads(text, parse_float=_finite, parse_constant=_not_json)
    except RecursionError:
        raise bad_request(f"malformed {what}: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError too
        raise bad_request(f"malformed {what}: {exc}") from None


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise ValueError(f"number {shown} is out of range (beyond a 64-bit float)")
    return value


def _not_json(text: str) -> Any:
    raise ValueError(f"{text} is not valid JSON")


@dataclass(frozen=True, slots=True)
class ListQuery:
    """The list parameters of Losant's collection routes."""

    sort_field: str
    descending: bool
    page: int
    per_page: int
    filter_field: str | None
    filter: str | None

    @property
    def offset(self) -> int:
        return self.page * self.per_page

    def wrapper(self, items: list[Any], total: int, **extra: Any) -> dict[str, Any]:
        """Losant's collection wrapper around one page of items."""
        return {
            "items": items,
            "count": len(items),
            "totalCount": total,
            "perPage": self.per_page,
            "page": self.page,
            "sortField": self.sort_field,
            "sortDirection": "desc" if self.descending else "asc",
            "filterField": self.filter_field,
            "filter": self.filter,
            **extra,
        }


LIST_PARAMS = ("sortField", "sortDirection", "page", "perPage", "filterField", "filter")


def list_query(query: Mapping[str, str], *, sort_fields: tuple[str, ...], default_sort: str,
               default_desc: bool, filter_fields: tuple[str, ...]) -> ListQuery:
    sort = query.get("sortField", default_sort)
    if sort not in sort_fields:
        raise bad_request(f"invalid sortField {sort!r}: use one of {', '.join(sort_fields)}")
    direction = query.get("sortDirection")
    if direction is not None and direction not in ("asc", "desc"):
        raise bad_request(f"invalid sortDirection {direction!r}: use asc or desc")
    descending = default_desc if direction is None else direction == "desc"
    filter_field = query.get("filterField") or None
    text = query.get("filter") or None
    if filter_field is not None and filter_field not in filter_fields:
        raise bad_request(
            f"invalid filterField {filter_field!r}: use one of {', '.join(filter_fields)}")
    if filter_field is None:
        text = None  # Losant ignores a filter without a filterField
    return ListQuery(
        sort_field=sort,
        descending=descending,
        page=as_int("page", query.get("page", "0"), 0, MAX_PAGE),
        per_page=as_int("perPage", query.get("perPage", str(DEFAULT_PER_PAGE)), 1,
                        MAX_PER_PAGE),
        filter_field=filter_field if text is not None else None,
        filter=text,
    )
