"""The console's routes: (method, path, page handler, scope resource, scope action)."""

from __future__ import annotations

from aiohttp import web

from broker.console import pages
from broker.console.web import STATIC, Console, Handler, redirect

APP = "/console/apps/{applicationId}"
KEY = APP + "/keys/{applicationKeyId}"
DEVICE = APP + "/devices/{deviceId}"

PAGES: tuple[tuple[str, str, Handler, str, str], ...] = (
    ("GET", "/console/apps", pages.apps, "applications", "get"),
    ("GET", "/console/status", pages.status, "metrics", "get"),
    ("POST", "/console/apps", pages.create_app, "applications", "post"),
    ("GET", APP, pages.app_home, "applicationKeys", "get"),
    ("POST", APP + "/delete", pages.delete_app, "application", "delete"),
    ("GET", APP + "/keys", pages.keys, "applicationKeys", "get"),
    ("POST", APP + "/keys", pages.create_key, "applicationKeys", "post"),
    ("GET", APP + "/keys/new", pages.new_key, "applicationKeys", "post"),
    ("POST", APP + "/keys/bulk", pages.bulk_keys, "applicationKey", "patch"),
    ("GET", KEY, pages.key_detail, "applicationKey", "get"),
    ("POST", KEY, pages.edit_key, "applicationKey", "patch"),
    ("GET", KEY + "/created", pages.key_created, "applicationKeys", "post"),
    ("POST", KEY + "/status", pages.key_status, "applicationKey", "patch"),
    ("POST", KEY + "/delete", pages.delete_key, "applicationKey", "delete"),
    ("GET", APP + "/devices", pages.devices, "devices", "get"),
    ("POST", APP + "/devices", pages.create_device, "devices", "post"),
    ("GET", DEVICE, pages.device_detail, "device", "get"),
    ("POST", DEVICE + "/tags", pages.device_tags, "device", "patch"),
    ("POST", DEVICE + "/kick", pages.device_kick, "device", "patch"),
    ("POST", DEVICE + "/delete", pages.device_delete, "device", "delete"),
    ("POST", DEVICE + "/key", pages.device_key, "applicationKeys", "post"),
)


def add_console(app: web.Application, console: Console) -> None:
    async def home(_request: web.Request) -> web.StreamResponse:
        return redirect("/console/apps")

    app.router.add_route("GET", "/console", home)
    app.router.add_route("GET", "/console/signin", console.signin_form)
    app.router.add_route("POST", "/console/signin", console.signin)
    app.router.add_route("POST", "/console/signout", console.signout)
    app.router.add_static("/console/static", STATIC)
    for method, path, handler, resource, action in PAGES:
        app.router.add_route(method, path, console.page(resource, action, handler))
