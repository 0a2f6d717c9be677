"""JSON Schemas (2020-12) of the API's bodies, Losant's definitions by name.

Request bodies are checked against them before any work is done, and ``GET
/openapi.json`` publishes the same objects, so the description cannot drift from what
is enforced. Field rules the keystore owns (topic grammar, tag lengths, addresses) are
checked there; the schemas fix shapes, types and the set of fields.
"""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError as SchemaError

from broker.api.errors import bad_request

_NAME = {"type": "string", "minLength": 1, "maxLength": 255}
_TEXT = {"type": "string", "maxLength": 4096}
_STRINGS = {"type": "array", "items": {"type": "string"}, "maxItems": 10_000}
_TAG = {
    "type": "object",
    "properties": {"key": {"type": "string"}, "value": {"type": "string"}},
    "required": ["key", "value"],
    "additionalProperties": False,
}
_TAGS = {"type": "array", "items": {"$ref": "#/components/schemas/deviceTag"},
         "maxItems": 10_000}
_DATE = {"type": ["string", "null"], "description": "ISO-8601; no offset means UTC"}
_TIME = {"description": "ISO-8601 string, milliseconds since the epoch, or {\"$date\": ...}"}
_ID = {"type": "string", "pattern": "^[0-9a-f]{24}$"}
_DATE_OUT = {"type": ["string", "null"], "format": "date-time"}
_IMMUTABLE = {"not": {}, "description": "fixed at creation: present means refused"}
_KEY_FIELDS: dict[str, Any] = {
    "name": {"type": ["string", "null"], "maxLength": 255},
    "description": {"type": ["string", "null"], "maxLength": 4096},
    "status": {"enum": ["active", "inactive"]},
    "filterType": {"enum": ["all", "none", "whitelist", "blacklist"]},
    "pubTopics": _STRINGS,
    "subTopics": _STRINGS,
    "addressFilterType": {"enum": ["all", "whitelist", "blacklist"]},
    "addresses": _STRINGS,
    "expirationDate": _DATE,
}


def _object(properties: dict[str, Any], required: tuple[str, ...] = (),
            description: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    if description:
        schema["description"] = description
    return schema


def _open(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A response object (clients must accept fields added later)."""
    return {"type": "object", "properties": properties, "required": list(required)}


def _collection(item: str) -> dict[str, Any]:
    return _open({
        "items": {"type": "array", "items": {"$ref": f"#/components/schemas/{item}"}},
        "count": {"type": "integer"},
        "totalCount": {"type": "integer"},
        "perPage": {"type": "integer"},
        "page": {"type": "integer"},
        "sortField": {"type": "string"},
        "sortDirection": {"enum": ["asc", "desc"]},
        "filterField": {"type": ["string", "null"]},
        "filter": {"type": ["string", "null"]},
        "applicationId": _ID,
    }, ("items", "count", "totalCount", "perPage", "page"))


_STATE = _object({"data": {"type": "object"}, "time": _TIME, "meta": {}}, ("data",))

SCHEMAS: dict[str, dict[str, Any]] = {
    # --- requests
    "applicationPost": _object(
        {"name": _NAME, "description": _KEY_FIELDS["description"],
         "maxKeys": {"type": "integer", "minimum": 0,
                     "description": "0: no limit; left out: the daemon's [keystore] max_keys"},
         "maxDevices": {"type": "integer", "minimum": 0,
                        "description": "0: no limit; left out: the daemon's [keystore] "
                                       "max_devices"}},
        ("name",)),
    "applicationPatch": _object(
        {"name": _NAME, "description": _KEY_FIELDS["description"],
         "maxKeys": {"type": "integer", "minimum": 0},
         "maxDevices": {"type": "integer", "minimum": 0}}),
    "applicationKeyPost": _object(
        {**_KEY_FIELDS, "deviceIds": _STRINGS, "deviceTags": _TAGS},
        description="No deviceIds and no deviceTags: the key is for every device of the "
                    "application. The device restriction cannot be changed later."),
    "applicationKeyPatch": _object(
        {**_KEY_FIELDS, "deviceIds": _IMMUTABLE, "deviceTags": _IMMUTABLE},
        description="deviceIds and deviceTags cannot be changed."),
    "devicePost": _object({"name": _NAME, "tags": _TAGS}, ("name",)),
    "devicePatch": _object({"name": _NAME, "tags": _TAGS}),
    "deviceState": _STATE,
    "deviceStates": {"oneOf": [{"$ref": "#/components/schemas/deviceState"},
                               {"type": "array", "minItems": 1, "maxItems": 1000,
                                "items": {"$ref": "#/components/schemas/deviceState"}}]},
    "deviceCommand": _object({"name": _NAME, "payload": {}, "time": _TIME}, ("name",)),
    "deviceCredentials": _object(
        {"deviceId": {"type": "string", "minLength": 1, "maxLength": 128},
         "key": {"type": "string", "maxLength": 256},
         "secret": {"type": "string", "maxLength": 1024},
         "tokenTTL": {"type": "integer", "minimum": 1,
                      "description": "seconds; at most [api] max_device_token_ttl"}},
        ("deviceId", "key", "secret")),
    "deviceTag": _TAG,
    # --- responses
    "error": _open({"type": {"type": "string"}, "message": {"type": "string"}},
                   ("type", "message")),
    "success": _open({"success": {"const": True}}, ("success",)),
    "application": _open({
        "id": _ID, "applicationId": _ID, "name": {"type": "string"},
        "description": {"type": ["string", "null"]}, "maxKeys": {"type": "integer"},
        "maxDevices": {"type": "integer"}, "creationDate": _DATE_OUT, "lastUpdated": _DATE_OUT,
    }, ("id", "applicationId", "name")),
    "applications": _collection("application"),
    "applicationKey": _open({
        "id": _ID, "applicationKeyId": _ID, "applicationId": _ID, "key": {"type": "string"},
        "name": {"type": ["string", "null"]}, "description": {"type": ["string", "null"]},
        "status": {"enum": ["active", "inactive"]},
        "deviceIds": {"type": "array", "items": {"type": "string"}},
        "deviceTags": {"type": "array", "items": {"$ref": "#/components/schemas/deviceTag"}},
        "allDevices": {"type": "boolean"},
        "filterType": {"enum": ["all", "none", "whitelist", "blacklist"]},
        "pubTopics": {"type": "array", "items": {"type": "string"}},
        "subTopics": {"type": "array", "items": {"type": "string"}},
        "addressFilterType": {"enum": ["all", "whitelist", "blacklist"]},
        "addresses": {"type": "array", "items": {"type": "string"}},
        "creationDate": _DATE_OUT, "lastUpdated": _DATE_OUT, "expirationDate": _DATE_OUT,
        "lastUsed": _DATE_OUT,
    }, ("id", "applicationKeyId", "applicationId", "key", "status")),
    "applicationKeyPostResponse": {"allOf": [
        {"$ref": "#/components/schemas/applicationKey"},
        _open({"secret": {"type": "string", "description": "shown this once"}}, ("secret",)),
    ]},
    "applicationKeys": _collection("applicationKey"),
    "device": _open({
        "id": {"type": "string"}, "deviceId": {"type": "string"}, "applicationId": _ID,
        "name": {"type": ["string", "null"]},
        "tags": {"type": "array", "items": {"$ref": "#/components/schemas/deviceTag"}},
        "deviceClass": {"const": "standalone"},
        "creationDate": _DATE_OUT, "lastUpdated": _DATE_OUT,
        "connectionInfo": _open({"connected": {"enum": [0, 1]}, "time": _DATE_OUT,
                                 "protocol": {"enum": ["MQTT 3.1.1", "MQTT 5.0"]}},
                                ("connected",)),
    }, ("id", "deviceId", "applicationId", "tags")),
    "devices": _collection("device"),
    "authedDevice": _open({
        "applicationId": _ID, "deviceId": {"type": "string"}, "token": {"type": "string"},
        "filterType": {"enum": ["all", "none", "whitelist", "blacklist"]},
        "pubTopics": {"type": "array", "items": {"type": "string"}},
        "subTopics": {"type": "array", "items": {"type": "string"}},
        "restricted": {"type": "boolean"},
        "expirationDate": _DATE_OUT,
    }, ("applicationId", "deviceId", "token")),
    "openapi": {"type": "object", "description": "this document"},
    "metrics": {"type": "string", "description": "Prometheus text exposition format"},
    "health": _open({"status": {"type": "string"}}, ("status",)),
}

_RESOLVE = {"components": {"schemas": SCHEMAS}}
_VALIDATORS = {
    name: Draft202012Validator({**schema, **_RESOLVE}) for name, schema in SCHEMAS.items()
}


def check_body(name: str, body: Any) -> Any:
    """``body`` if it fits schema ``name``; else a 400 naming the field and the reason."""
    error = min(_VALIDATORS[name].iter_errors(body), key=_depth_first, default=None)
    if error is None:
        return body
    raise bad_request(describe(error))


def _depth_first(error: SchemaError) -> tuple[int, str]:
    # Report the outermost problem first (an unknown field before a wrong type within).
    return len(error.absolute_path), str(list(error.absolute_path))


def describe(error: SchemaError) -> str:
    where = ".".join(str(part) for part in error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        place = f" in {where}" if where else ""
        return f"unknown field {extra[0]!r}{place} (allowed: {', '.join(allowed)})"
    if error.validator == "required":
        return f"{error.message.split(' ')[0]} is required" + (f" in {where}" if where else "")
    if error.validator == "not" and error.schema is _IMMUTABLE:
        return f"{where} cannot be changed after creation; create a new key"
    if error.validator == "oneOf":
        return "invalid body: expected a deviceState object or a non-empty array of them"
    subject = f"field {where!r}" if where else "body"
    if error.validator in ("maxLength", "minLength", "maxItems", "minItems"):
        # jsonschema's message repeats the whole value: a megabyte in an error line
        return f"invalid {subject}: {error.validator} is {error.validator_value}"
    message = error.message if len(error.message) <= 200 else error.message[:200] + "..."
    return f"invalid {subject}: {message}"
