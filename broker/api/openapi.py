"""``GET /openapi.json``: an OpenAPI 3.1 description built from the route table and the
body schemas, so it lists exactly the routes served and the bodies enforced."""

from __future__ import annotations

import re
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol

from broker.api.schemas import SCHEMAS

ERRORS = {
    "400": "Malformed request: bad body, query parameter or field (the message names it)",
    "401": "Missing, invalid, revoked or expired token",
    "403": "The token's scope or application does not allow this",
    "404": "No such application, key or device",
    "409": "Name or id already in use, or a field that cannot change",
    "413": "Body over 1 MiB (or a message over max_packet_size)",
    "429": "Too many failed tokens or logins from this address (Retry-After)",
}
QUERY_HELP = {
    "sortField": "Field to sort by",
    "sortDirection": "asc or desc",
    "page": "Page number, from 0",
    "perPage": "Items per page (1-1000, default 100)",
    "filterField": "Field the filter applies to",
    "filter": "Glob (* any characters, ? one) on filterField",
    "query": "Advanced query (JSON; overrides filterField and filter), docs/api.md",
    "excludeConnectionInfo": "true: leave out connectionInfo",
}
FLAGS = ("_actions", "_links", "_embedded")
MEDIA = {"metrics": "text/plain"}  # responses that are not JSON


class RouteLike(Protocol):
    """broker.api.routes.Route, as far as the description needs it."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def summary(self) -> str: ...
    @property
    def response(self) -> str: ...
    @property
    def ok(self) -> int: ...
    @property
    def body(self) -> str | None: ...
    @property
    def query(self) -> tuple[str, ...]: ...
    @property
    def operation(self) -> str: ...
    @property
    def public(self) -> bool: ...
    @property
    def token_if_configured(self) -> bool: ...


def _version() -> str:
    try:
        return version("keybroker")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _operation(route: RouteLike) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"{(\w+)}", route.path)
    ]
    params += [{"name": name, "in": "query", "required": False,
                "description": QUERY_HELP.get(name, name), "schema": {"type": "string"}}
               for name in route.query]
    params += [{"name": name, "in": "query", "required": False,
                "description": "accepted for Losant's clients; ignored",
                "schema": {"type": "string"}} for name in FLAGS]
    operation: dict[str, Any] = {
        "operationId": route.operation,
        "summary": route.summary,
        "parameters": params,
        "responses": {
            str(route.ok): {"description": "Success", "content": {
                MEDIA.get(route.response, "application/json"): {"schema": _ref(route.response)}}},
            **{code: {"description": text,
                      "content": {"application/json": {"schema": _ref("error")}}}
               for code, text in ERRORS.items()},
        },
    }
    if route.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(route.body)}},
        }
    if route.public:
        operation["security"] = []
    elif route.token_if_configured:
        operation["security"] = [{}, {"bearer": []}]  # a token only if so configured
    return operation


def document(routes: Iterable[RouteLike]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "keybroker HTTP API",
            "version": _version(),
            "description": "Losant-compatible management of applications, access keys and "
                           "devices, and device access over HTTP (docs/api.md).",
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
