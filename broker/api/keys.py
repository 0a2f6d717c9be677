"""``/applications/{applicationId}/keys[/{applicationKeyId}]``: access keys, Losant's
field names (docs/api.md#routes)."""

from __future__ import annotations

from typing import Any

from broker.api.applications import application
from broker.api.context import Call
from broker.api.params import LIST_PARAMS, list_query, parse_json
from keystore.keys import UNSET
from keystore.models import AccessKey, KeyStatus
from keystore.validation import parse_when

LIST_QUERY = (*LIST_PARAMS, "query")
SORT_FIELDS = ("creationDate", "lastUpdated", "key", "id", "status", "name")
FILTER_FIELDS = ("key", "status", "name")
# Losant field -> keystore argument, for the fields POST and PATCH share.
FIELDS = {
    "name": "name",
    "description": "description",
    "filterType": "topic_mode",
    "pubTopics": "pub_topics",
    "subTopics": "sub_topics",
    "addressFilterType": "address_mode",
    "addresses": "addresses",
    "expirationDate": "expires_at",
}


def _fields(body: dict[str, Any]) -> dict[str, Any]:
    """The keystore arguments for the shared fields of a POST or PATCH body."""
    out = {FIELDS[name]: value for name, value in body.items() if name in FIELDS}
    if isinstance(out.get("expires_at"), str):
        out["expires_at"] = parse_when(out["expires_at"], "expirationDate")  # naive = UTC
    return out


async def access_key(call: Call) -> AccessKey:
    app = await application(call)
    key = await call.api.keystore.get_key_by_id(call.path["applicationKeyId"], app=app.id)
    call.targets["key"] = key.key
    return key


async def list_keys(call: Call) -> dict[str, Any]:
    q = list_query(call.query, sort_fields=SORT_FIELDS, default_sort="creationDate",
                   default_desc=True, filter_fields=FILTER_FIELDS)
    app = await application(call)
    query: Any = None
    if "query" in call.query:
        query = parse_json("query", call.query["query"])  # overrides filterField and filter
    elif q.filter is not None and q.filter_field is not None:
        # status is an enum: an exact match; key and name are globs
        query = {q.filter_field: {"$eq" if q.filter_field == "status" else "$like": q.filter}}
    keys, total = await call.api.keystore.page_keys(
        query, sort=q.sort_field, descending=q.descending, offset=q.offset,
        limit=q.per_page, app=app.id)
    return q.wrapper([k.to_losant() for k in keys], total, applicationId=app.id)


async def create_key(call: Call) -> dict[str, Any]:
    app = await application(call)
    body = call.body
    spec = _fields(body)
    spec["device_ids"] = body.get("deviceIds", ())
    spec["device_tags"] = [(tag["key"], tag["value"]) for tag in body.get("deviceTags", ())]
    ks = call.api.keystore
    (key, secret), = await ks.create_keys([spec], app=app.id)
    call.targets["key"] = key.key
    if body.get("status") == KeyStatus.INACTIVE.value:
        # Nobody holds the secret before this response, so the moment it was active is moot.
        (key,) = await ks.set_status([key.key], KeyStatus.INACTIVE, app=app.id)
    return {**key.to_losant(), "secret": secret}


async def get_key(call: Call) -> dict[str, Any]:
    return (await access_key(call)).to_losant()


async def patch_key(call: Call) -> dict[str, Any]:
    body = call.body  # deviceIds and deviceTags are refused by the schema
    key = await access_key(call)
    ks = call.api.keystore
    changes = _fields(body)
    if changes:
        key = await ks.update_key(key.key, app=key.app_id, **{
            name: changes.get(name, UNSET) for name in FIELDS.values()})
    if "status" in body:
        (key,) = await ks.set_status([key.key], body["status"], app=key.app_id)
    return key.to_losant()


async def delete_key(call: Call) -> dict[str, Any]:
    key = await access_key(call)
    await call.api.keystore.delete_keys([key.key], app=key.app_id)
    return {"success": True}
