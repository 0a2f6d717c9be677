"""The scopes of HTTP API admin tokens, in Losant's grammar (docs/api.md#tokens).

A route of the API is one action on one resource, e.g. ``applicationKeys.post`` (create
a key) or ``device.sendCommand``. A token's scope list grants a route when it holds:

* ``all.Application``: every route;
* ``all.Application.read``: every read-only route (GET);
* ``<resource>.*``: every action on the resource (``applicationKeys.*``);
* ``<resource>.<action>``: that action alone.

Which applications a token reaches is separate: one, or all (``ApiToken.app_id``).
"""

from __future__ import annotations

from collections.abc import Iterable

from keystore.errors import ValidationError

ALL = "all.Application"
ALL_READ = "all.Application.read"
DEFAULT_SCOPES = (ALL,)

# resource -> its actions (Losant's names); GET routes are the read-only ones.
ACTIONS: dict[str, tuple[str, ...]] = {
    "applications": ("get", "post"),
    "application": ("get", "patch", "delete"),
    "applicationKeys": ("get", "post"),
    "applicationKey": ("get", "patch", "delete"),
    "devices": ("get", "post"),
    "device": ("get", "patch", "delete", "sendState", "sendCommand"),
    "metrics": ("get",),  # GET /metrics, when [api] metrics_auth is on
}
READ_ACTIONS = frozenset({"get"})


def _known() -> frozenset[str]:
    names = {ALL, ALL_READ}
    for resource, actions in ACTIONS.items():
        names.add(f"{resource}.*")
        names.update(f"{resource}.{action}" for action in actions)
    return frozenset(names)


KNOWN = _known()


def validate_scopes(scopes: Iterable[object]) -> tuple[str, ...]:
    """A token's scope list: known names only, at least one, duplicates dropped."""
    if isinstance(scopes, str | bytes):
        raise ValidationError(f"invalid scopes {scopes!r}: expected a list")
    out: list[str] = []
    for scope in scopes:
        if not isinstance(scope, str) or scope not in KNOWN:
            raise ValidationError(
                f"unknown scope {scope!r}: use {ALL}, {ALL_READ}, RESOURCE.* or "
                f"RESOURCE.ACTION (resources: {', '.join(ACTIONS)})")
        if scope not in out:
            out.append(scope)
    if not out:
        raise ValidationError("a token needs at least one scope")
    return tuple(out)


def grants(scopes: Iterable[str], resource: str, action: str) -> bool:
    """Does a scope list allow ``action`` on ``resource``?"""
    wanted = (ALL, f"{resource}.*", f"{resource}.{action}")
    for scope in scopes:
        if scope in wanted or (scope == ALL_READ and action in READ_ACTIONS):
            return True
    return False
