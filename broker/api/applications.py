"""``/applications`` and ``/applications/{applicationId}``."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from broker.api.context import Call
from broker.api.errors import not_found
from broker.api.params import LIST_PARAMS, list_query
from keystore.models import Application
from keystore.query import like_to_glob

LIST_QUERY = LIST_PARAMS
SORT = {
    "name": lambda a: a.name,
    "id": lambda a: a.id,
    "creationDate": lambda a: a.created_at,
    "lastUpdated": lambda a: a.updated_at,
}


async def application(call: Call) -> Application:
    """The application of the path, by id only (names are not API ids)."""
    app = await call.api.keystore.app(call.app_id)
    if app.id != call.app_id:
        raise not_found(f"no application {call.app_id!r}")
    call.targets["app"] = app.id
    return app


async def list_applications(call: Call) -> dict[str, Any]:
    q = list_query(call.query, sort_fields=tuple(SORT), default_sort="name",
                   default_desc=False, filter_fields=("name",))
    apps = await call.api.keystore.list_apps()
    bound = call.admin.token.app_id
    if bound is not None:
        apps = [a for a in apps if a.id == bound]
    if q.filter is not None:
        apps = [a for a in apps if fnmatchcase(a.name, like_to_glob(q.filter))]
    apps.sort(key=SORT[q.sort_field], reverse=q.descending)
    page = apps[q.offset : q.offset + q.per_page]
    return q.wrapper([a.to_json() for a in page], len(apps))


async def create_application(call: Call) -> dict[str, Any]:
    body = call.body  # tokens for one application are refused (callers.admin_refusal)
    app = await call.api.keystore.create_app(
        body["name"], description=body.get("description"),
        max_keys=body.get("maxKeys", ...), max_devices=body.get("maxDevices", ...))
    call.targets["app"] = app.id
    return app.to_json()


async def get_application(call: Call) -> dict[str, Any]:
    return (await application(call)).to_json()


async def patch_application(call: Call) -> dict[str, Any]:
    app = await application(call)
    body = call.body
    if "maxKeys" in body:
        call.require_all_apps("change the key limit of its application")
    if "maxDevices" in body:
        call.require_all_apps("change the device limit of its application")
    changed = await call.api.keystore.update_app(
        app.id, name=body.get("name", ...), description=body.get("description", ...),
        max_keys=body.get("maxKeys", ...), max_devices=body.get("maxDevices", ...))
    return changed.to_json()


async def delete_application(call: Call) -> dict[str, Any]:
    app = await application(call)
    await call.api.keystore.delete_apps([app.id])
    return {"success": True}
