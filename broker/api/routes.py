"""The route table: one entry per action, Losant's paths and names. The router and ``GET
/openapi.json`` are both built from it, so the description lists exactly what is served.

``endpoint`` runs one request through its route, in this order: who is calling (401),
the path's ids (404), may they (403), query parameters and body (400), the handler, and
an audit line for every change an admin makes.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from broker.api import applications, device_auth, devices, health, keys
from broker.api.callers import Admin, Caller, DeviceCaller, admin_refusal
from broker.api.context import SOURCE, Api, Call
from broker.api.errors import bad_request, forbidden, not_found, within_body_timeout
from broker.api.openapi import document
from broker.api.params import checked_query, parse_json
from broker.api.schemas import check_body
from keystore.errors import ValidationError
from keystore.validation import validate_device_id

Handler = Callable[[Call], Awaitable[Any]]
OBJECT_ID = re.compile(r"[0-9a-f]{24}")


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # Losant's path template
    handler: Handler
    resource: str  # keystore.scopes resource; "" for the public routes
    action: str
    summary: str
    response: str  # schema name (broker.api.schemas)
    ok: int = 200
    body: str | None = None  # schema name of the request body
    query: tuple[str, ...] = ()
    device: bool = False  # device tokens may call it (within their key's scope)
    # A token is needed only when [api] metrics_auth is on (GET /metrics).
    token_if_configured: bool = False

    @property
    def operation(self) -> str:
        return f"{self.resource}.{self.action}" if self.resource else self.action

    @property
    def public(self) -> bool:
        return not self.resource


APP = "/applications/{applicationId}"
KEY = APP + "/keys/{applicationKeyId}"
DEVICE = APP + "/devices/{deviceId}"


async def _openapi(call: Call) -> Any:
    return document(ROUTES)


ROUTES: tuple[Route, ...] = (
    Route("GET", "/applications", applications.list_applications, "applications", "get",
          "List applications", "applications", query=applications.LIST_QUERY),
    Route("POST", "/applications", applications.create_application, "applications", "post",
          "Create an application", "application", ok=201, body="applicationPost"),
    Route("GET", APP, applications.get_application, "application", "get",
          "Get an application", "application"),
    Route("PATCH", APP, applications.patch_application, "application", "patch",
          "Change an application", "application", body="applicationPatch"),
    Route("DELETE", APP, applications.delete_application, "application", "delete",
          "Delete an application with its keys and devices", "success"),
    Route("GET", APP + "/keys", keys.list_keys, "applicationKeys", "get",
          "List access keys", "applicationKeys", query=keys.LIST_QUERY),
    Route("POST", APP + "/keys", keys.create_key, "applicationKeys", "post",
          "Create an access key (the secret is in this response only)",
          "applicationKeyPostResponse", ok=201, body="applicationKeyPost"),
    Route("GET", KEY, keys.get_key, "applicationKey", "get", "Get an access key",
          "applicationKey"),
    Route("PATCH", KEY, keys.patch_key, "applicationKey", "patch", "Change an access key",
          "applicationKey", body="applicationKeyPatch"),
    Route("DELETE", KEY, keys.delete_key, "applicationKey", "delete",
          "Delete an access key (its sessions are disconnected)", "success"),
    Route("GET", APP + "/devices", devices.list_devices, "devices", "get", "List devices",
          "devices", query=devices.LIST_QUERY),
    Route("POST", APP + "/devices", devices.create_device, "devices", "post",
          "Create a device (its id is generated)", "device", ok=201, body="devicePost"),
    Route("GET", DEVICE, devices.get_device, "device", "get", "Get a device", "device",
          query=devices.GET_QUERY),
    Route("PATCH", DEVICE, devices.patch_device, "device", "patch",
          "Change a device's name or tags", "device", body="devicePatch"),
    Route("DELETE", DEVICE, devices.delete_device, "device", "delete",
          "Delete a device (its session is disconnected)", "success"),
    Route("POST", DEVICE + "/state", devices.send_state, "device", "sendState",
          "Send state: published on PREFIX/{deviceId}/state", "success", body="deviceStates",
          device=True),
    Route("POST", DEVICE + "/command", devices.send_command, "device", "sendCommand",
          "Send a command: published on PREFIX/{deviceId}/command", "success",
          body="deviceCommand", device=True),
    Route("POST", "/auth/device", device_auth.authenticate_device, "", "authenticateDevice",
          "Exchange an access key and secret for a device token", "authedDevice",
          body="deviceCredentials"),
    Route("GET", "/openapi.json", _openapi, "", "openapi",
          "This description (OpenAPI 3.1)", "openapi"),
    Route("GET", "/metrics", health.metrics, "metrics", "get",
          "Prometheus metrics (text format); a token only with [api] metrics_auth",
          "metrics", token_if_configured=True),
    Route("GET", "/healthz", health.healthz, "", "healthz",
          "Alive: the event loop answers", "health"),
    Route("GET", "/readyz", health.readyz, "", "readyz",
          "Ready: listeners bound and the keystore reachable (else 503)", "health"),
)


# --- one request -----------------------------------------------------------------------------


def _checked_path(raw: dict[str, str]) -> dict[str, str]:
    """The path's ids, or 404: application and key ids are 24 hex; device ids follow the
    keystore's rule (an MQTT client id)."""
    path = {name: value for name, value in raw.items() if not name.startswith("_")}
    for name in ("applicationId", "applicationKeyId"):
        if name in path and not OBJECT_ID.fullmatch(path[name]):
            what = "application" if name == "applicationId" else "access key"
            raise not_found(f"no {what} {path[name]!r}")
    if "deviceId" in path:
        try:
            validate_device_id(path["deviceId"])
        except ValidationError:
            raise not_found(f"no device {path['deviceId']!r}") from None
    return path


def _authorize(route: Route, caller: Caller, path: dict[str, str]) -> None:
    app_id = path.get("applicationId")
    if isinstance(caller, DeviceCaller):
        if not route.device:
            raise forbidden(f"a device token cannot call {route.operation}")
        if app_id != caller.key.app_id:
            raise forbidden("this device token is for another application")
        return
    refusal = admin_refusal(caller.token, route.resource, route.action, app_id)
    if refusal is not None:
        raise forbidden(refusal)


async def _body(request: web.Request, schema: str | None) -> Any:
    if schema is None:
        return None
    raw = await within_body_timeout(request.read())  # over client_max_size: 413
    if not raw.strip():
        raise bad_request("missing JSON body")
    body = parse_json("JSON body", raw)
    if schema == "deviceStates":
        return body  # each state is checked by the handler, naming its position
    return check_body(schema, body)


def endpoint(api: Api, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        source = request[SOURCE]
        public = route.public or (route.token_if_configured and not
                                  api.settings.api_metrics_auth)
        caller = None if public else \
            await api.callers.caller(request.headers.get("Authorization"), source)
        path = _checked_path(dict(request.match_info))
        if caller is not None:
            _authorize(route, caller, path)
        call = Call(api, request, route.operation, caller, source, path,
                    checked_query(request.query, route.query), await _body(request, route.body))
        data = await route.handler(call)
        if isinstance(data, web.StreamResponse):
            return data  # not JSON (the Prometheus text format)
        if isinstance(caller, Admin) and route.method != "GET":
            api.audit.event("api", token=caller.name, action=route.operation,
                            client_ip=source.client_ip, peer_ip=source.peer_ip,
                            listener="api", **call.targets)
        return web.json_response(data, status=route.ok)

    return handle
