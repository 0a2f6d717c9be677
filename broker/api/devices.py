"""``/applications/{applicationId}/devices[/{deviceId}[/state|/command]]``.

State and commands sent over HTTP go through the broker exactly as an MQTT PUBLISH of
the application would: the caller's policy decides whether it may publish the topic
(a device token: its key's scope; an admin token: any device of the application), then
the message is routed at QoS 1, each subscriber checked by its own policy.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from broker import policy
from broker.api.applications import application
from broker.api.context import Call
from broker.api.errors import ApiError, bad_request, forbidden
from broker.api.params import LIST_PARAMS, as_bool, list_query
from broker.api.schemas import check_body
from broker.policy.limits import topic_limit_problem
from broker.topics.mounts import mount_of
from keystore import credentials
from keystore.models import Device, iso

LIST_QUERY = (*LIST_PARAMS, "excludeConnectionInfo")
GET_QUERY = ("excludeConnectionInfo",)
SORT_FIELDS = ("name", "deviceId", "id", "creationDate", "lastUpdated")
QOS = 1  # an HTTP 200 promises delivery as a PUBACK does


def device_json(call: Call, device: Device, connection_info: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": device.id,
        "deviceId": device.id,
        "applicationId": device.app_id,
        "name": device.name,
        "tags": [{"key": k, "value": v} for k, v in device.tags],
        "deviceClass": "standalone",
        "creationDate": iso(device.created_at),
        "lastUpdated": iso(device.updated_at),
    }
    if connection_info:
        protocol = call.api.protocol(device.id)
        out["connectionInfo"] = {"connected": int(protocol is not None),
                                 "time": iso(device.last_seen)}
        if protocol is not None:
            out["connectionInfo"]["protocol"] = f"MQTT {protocol}"
    return out


def _with_connection_info(call: Call) -> bool:
    text = call.query.get("excludeConnectionInfo")
    return text is None or not as_bool("excludeConnectionInfo", text)


async def device(call: Call) -> Device:
    app = await application(call)
    found = await call.api.keystore.get_device(call.path["deviceId"], app=app.id)
    call.targets["device_id"] = found.id
    return found


async def list_devices(call: Call) -> dict[str, Any]:
    q = list_query(call.query, sort_fields=SORT_FIELDS, default_sort="name",
                   default_desc=False, filter_fields=("name",))
    app = await application(call)
    devices, total = await call.api.keystore.page_devices(
        name_glob=q.filter, sort=q.sort_field, descending=q.descending, offset=q.offset,
        limit=q.per_page, app=app.id)
    info = _with_connection_info(call)
    return q.wrapper([device_json(call, d, info) for d in devices], total,
                     applicationId=app.id)


async def create_device(call: Call) -> dict[str, Any]:
    app = await application(call)
    body = call.body
    tags = [(tag["key"], tag["value"]) for tag in body.get("tags", ())]
    created = await call.api.keystore.add_device(credentials.new_object_id(),
                                                 name=body["name"], tags=tags, app=app.id)
    call.targets["device_id"] = created.id
    return device_json(call, created)


async def get_device(call: Call) -> dict[str, Any]:
    return device_json(call, await device(call), _with_connection_info(call))


async def patch_device(call: Call) -> dict[str, Any]:
    current = await device(call)
    body = call.body
    tags = body.get("tags")
    changed = await call.api.keystore.update_device(
        current.id, name=body.get("name", ...), app=current.app_id,
        tags=None if tags is None else [(tag["key"], tag["value"]) for tag in tags])
    return device_json(call, changed)


async def delete_device(call: Call) -> dict[str, Any]:
    current = await device(call)
    await call.api.keystore.remove_devices([current.id], app=current.app_id)
    return {"success": True}


# --- state and commands --------------------------------------------------------------------


async def send_state(call: Call) -> dict[str, Any]:
    body = call.body
    states = body if isinstance(body, list) else [body]
    if not states or len(states) > 1000:
        raise bad_request("invalid body: expected a deviceState object or an array of 1-1000")
    for index, state in enumerate(states):
        try:
            check_body("deviceState", state)
        except ApiError as exc:
            where = f"state #{index + 1}: " if isinstance(body, list) else ""
            raise bad_request(where + exc.message) from None
    await _publish(call, "state", states)
    return {"success": True}


async def send_command(call: Call) -> dict[str, Any]:
    await _publish(call, "command", [call.body])
    return {"success": True}


async def _publish(call: Call, kind: str, messages: list[dict[str, Any]]) -> None:
    """Check, then route each message on ``PREFIX/<deviceId>/<kind>`` (all or none)."""
    settings = call.api.settings
    device_id = call.path["deviceId"]
    topic = f"{settings.device_prefix}/{device_id}/{kind}"
    caller = call.device_caller()
    if caller is not None:
        if not call.api.callers.may_publish(caller, settings.max_publish_rate):
            raise ApiError(429, "TooManyRequests",
                           f"over max_publish_rate ({settings.max_publish_rate:g}/s)")
        decision = policy.check_publish(caller.policy, topic)
        if not decision.allowed:
            call.api.audit.event("publish_denied", key=caller.key.key, app=caller.key.app_id,
                                 client_id=caller.device_id, client_ip=call.source.client_ip,
                                 peer_ip=call.source.peer_ip, listener="api", topic=topic,
                                 reason=decision.reason)
            raise forbidden(f"device token may not publish to {topic!r}: {decision.reason}")
        app_id = caller.key.app_id
    else:
        app_id = (await device(call)).app_id  # any device of the application; 404 if none
    problem = topic_limit_problem(topic, settings.max_topic_length, settings.max_topic_levels)
    if problem is not None:
        raise bad_request(f"invalid topic {topic!r}: {problem}")
    now = iso(datetime.now(UTC))
    payloads = []
    for message in messages:
        payload = json.dumps(message if "time" in message else {**message, "time": now},
                             separators=(",", ":")).encode()
        if len(payload) > settings.max_packet_size:
            raise ApiError(413, "PayloadTooLarge",
                           f"message of {len(payload)} bytes is over max_packet_size "
                           f"({settings.max_packet_size})")
        payloads.append(payload)
    call.targets["device_id"] = device_id
    for payload in payloads:
        call.api.publish(mount_of(app_id), topic, payload, QOS)
