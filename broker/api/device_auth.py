"""``POST /auth/device``: a device exchanges its access key and secret for a token
(docs/api.md#device-access), checked exactly like an MQTT CONNECT."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from broker.api.context import Call
from broker.api.errors import bad_request
from keystore.models import iso


async def authenticate_device(call: Call) -> dict[str, Any]:
    api, body, source = call.api, call.body, call.source
    settings = api.settings
    ttl = body.get("tokenTTL", settings.api_device_token_ttl)
    if ttl > settings.api_max_device_token_ttl:
        raise bad_request(f"invalid tokenTTL {ttl!r}: at most "
                          f"{settings.api_max_device_token_ttl} seconds")
    api.callers.check_not_banned(source)
    device_id = body["deviceId"]
    found = await api.keystore.connect_lookup(body["key"], body["secret"], device_id)
    caller = api.callers.device(found, device_id, source, datetime.now(UTC),
                                event="device_auth_refused")
    key = caller.key
    token, expires = await api.keystore.create_device_token(key, device_id, ttl)
    call.targets.update(key=key.key, device_id=device_id, app=key.app_id)
    api.audit.event("device_auth_ok", key=key.key, app=key.app_id, client_id=device_id,
                    client_ip=source.client_ip, peer_ip=source.peer_ip, listener="api")
    return {
        "applicationId": key.app_id,
        "deviceId": device_id,
        "token": token,
        "filterType": key.topic_mode.losant,
        "pubTopics": list(key.pub_topics),
        "subTopics": list(key.sub_topics),
        "restricted": not key.all_devices,
        "expirationDate": iso(expires),
    }
