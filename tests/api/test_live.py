"""The API and MQTT are one daemon: keys made over HTTP let devices in, changes made over
HTTP reach live sessions through the change feed, and state and commands sent over HTTP
are published like an MQTT PUBLISH (same policy, same routing)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from tests.api.conftest import ApiEnv, refused
from tests.support.harness import Client, StartDaemon, revocation_bound


def _connected(api: ApiEnv, device: str, key: dict[str, Any]) -> Client:
    client = Client(api.daemon.port(), device, key["key"], key["secret"])
    assert client.connect() == 0
    return client


def _kicked(api: ApiEnv, client: Client) -> None:
    """Disconnected within the bound docs/live-changes.md promises."""
    assert client.disconnected.wait(revocation_bound(api.daemon.settings)), \
        "session still connected"


def test_a_key_created_over_http_authenticates_an_mqtt_device(api: ApiEnv) -> None:
    c = api.client()
    device = c.devices.post(applicationId=api.app_id, device={"name": "sensor"})
    key = c.application_keys.post(applicationId=api.app_id,
                                  applicationKey={"deviceIds": [device["deviceId"]]})
    with _connected(api, device["deviceId"], key):
        assert c.device.get(applicationId=api.app_id,
                            deviceId=device["deviceId"])["connectionInfo"]["connected"] == 1
    with Client(api.daemon.port(), device["deviceId"], key["key"], "wrong") as bad:
        assert bad.connect() == 4


def test_deactivating_or_deleting_over_http_disconnects_within_2s(api: ApiEnv) -> None:
    c = api.client()
    for device in ("d1", "d2", "d3"):
        api.daemon.ks("add_device", device)
    first = c.application_keys.post(applicationId=api.app_id, applicationKey={"deviceIds": ["d1"]})
    second = c.application_keys.post(applicationId=api.app_id,
                                     applicationKey={"deviceIds": ["d2"]})
    third = c.application_keys.post(applicationId=api.app_id, applicationKey={"deviceIds": ["d3"]})
    s1, s2, s3 = (_connected(api, d, k) for d, k in (("d1", first), ("d2", second),
                                                    ("d3", third)))
    try:
        c.application_key.patch(applicationId=api.app_id, applicationKeyId=first["id"],
                                applicationKey={"status": "inactive"})
        _kicked(api, s1)
        c.application_key.delete(applicationId=api.app_id, applicationKeyId=second["id"])
        _kicked(api, s2)
        c.device.delete(applicationId=api.app_id, deviceId="d3")
        _kicked(api, s3)
        with Client(api.daemon.port(), "d1", first["key"], first["secret"]) as again:
            assert again.connect() == 5  # inactive
    finally:
        for session in (s1, s2, s3):
            session.close()


def test_state_and_commands_over_http_reach_mqtt_subscribers(api: ApiEnv) -> None:
    for device in ("thermo", "panel"):
        api.daemon.ks("add_device", device)
    key, secret = api.daemon.ks("create_key", device_ids=["thermo", "panel"])
    with Client(api.daemon.port(), "panel", key.key, secret) as panel:
        assert panel.connect() == 0
        assert panel.subscribe("losant/thermo/#", qos=1) == 1
        auth = api.client(token="").auth.authenticate_device(
            credentials={"deviceId": "thermo", "key": key.key, "secret": secret})
        as_device = api.client(token=auth["token"])
        assert as_device.device.send_state(
            applicationId=api.app_id, deviceId="thermo",
            deviceState=[{"data": {"temp": 20}}, {"data": {"temp": 21}, "time": 5}],
        ) == {"success": True}
        first, second = panel.get(), panel.get()
        assert first is not None and second is not None
        assert first.topic == "losant/thermo/state" and first.qos == 1
        assert json.loads(first.payload)["data"] == {"temp": 20}
        assert json.loads(first.payload)["time"]  # stamped by the daemon
        assert json.loads(second.payload) == {"data": {"temp": 21}, "time": 5}

        api.client().device.send_command(applicationId=api.app_id, deviceId="thermo",
                                         deviceCommand={"name": "reboot", "payload": {"in": 3}})
        command = panel.get()
        assert command is not None and command.topic == "losant/thermo/command"
        body = json.loads(command.payload)
        assert body["name"] == "reboot" and body["payload"] == {"in": 3}


def _strict_json(payload: bytes) -> Any:
    """What any JSON parser reads: no NaN or Infinity."""
    def refuse(text: str) -> Any:
        raise AssertionError(f"{text} in {payload!r}: not JSON")

    return json.loads(payload, parse_constant=refuse)


@pytest.mark.parametrize("number", ["1e999999", "-1e999999", "NaN", "Infinity", "-Infinity"])
def test_state_with_a_number_json_cannot_carry_is_400_and_not_published(
    api: ApiEnv, number: str,
) -> None:
    api.daemon.ks("add_device", "meter")
    key, secret = api.daemon.ks("create_key", device_ids=["meter"])
    state = f"/applications/{api.app_id}/devices/meter/state"
    with Client(api.daemon.port(), "meter", key.key, secret) as watcher:
        assert watcher.connect() == 0
        assert watcher.subscribe("losant/meter/state", qos=1) == 1
        refused = api.http("POST", state, data=f'{{"data": {{"x": {number}}}}}',
                           headers={"Content-Type": "application/json"})
        assert refused.status_code == 400, refused.text
        assert refused.json()["type"] == "Validation"
        assert number in refused.json()["message"]
        # The largest double is fine, and reaches subscribers as JSON.
        accepted = api.http("POST", state, json={"data": {"x": 1.7976931348623157e308}})
        assert accepted.status_code == 200, accepted.text
        message = watcher.get()
        assert message is not None
        assert _strict_json(message.payload)["data"] == {"x": 1.7976931348623157e308}
        assert watcher.get(0.3) is None  # the refused state was never published


def test_a_device_token_publishes_only_in_its_keys_scope(api: ApiEnv) -> None:
    for device in ("mine", "sibling", "stranger"):
        api.daemon.ks("add_device", device)
    key, secret = api.daemon.ks("create_key", device_ids=["mine", "sibling"])
    outsider, outsider_secret = api.daemon.ks("create_key", device_ids=["stranger"])
    with Client(api.daemon.port(), "stranger", outsider.key, outsider_secret) as watcher:
        assert watcher.connect() == 0
        assert watcher.subscribe("losant/stranger/#") == 0
        token = api.client(token="").auth.authenticate_device(
            credentials={"deviceId": "mine", "key": key.key, "secret": secret})["token"]
        device = api.client(token=token)
        device.device.send_command(applicationId=api.app_id, deviceId="sibling",
                                   deviceCommand={"name": "hello"})  # in its scope
        refused(lambda: device.device.send_state(applicationId=api.app_id, deviceId="stranger",
                                                 deviceState={"data": {}}), 403, "not_in_scope")
        refused(lambda: device.devices.get(applicationId=api.app_id), 403, "device token")
        refused(lambda: device.application_keys.post(applicationId=api.app_id,
                                                     applicationKey={}), 403, "device token")
        assert watcher.topics_received(0.3) == []


def test_device_login_is_checked_like_a_connect(api: ApiEnv) -> None:
    api.daemon.ks("add_device", "in-scope")
    api.daemon.ks("add_device", "out-of-scope")
    key, secret = api.daemon.ks("create_key", device_ids=["in-scope"])
    auth = api.client(token="").auth
    ok = auth.authenticate_device(credentials={"deviceId": "in-scope", "key": key.key,
                                               "secret": secret, "tokenTTL": 60})
    assert ok["applicationId"] == api.app_id and ok["restricted"] is True
    assert ok["filterType"] == "none" and ok["token"].startswith("kbd.")
    for credentials, needle in (
        ({"deviceId": "in-scope", "key": key.key, "secret": "wrong"}, "invalid key or secret"),
        ({"deviceId": "in-scope", "key": "0" * 32, "secret": secret}, "invalid key or secret"),
        ({"deviceId": "out-of-scope", "key": key.key, "secret": secret}, "device_not_in_scope"),
        ({"deviceId": "ghost", "key": key.key, "secret": secret}, "unknown_device"),
    ):
        refused(lambda credentials=credentials: auth.authenticate_device(
            credentials=credentials), 401, needle)
    refused(lambda: auth.authenticate_device(credentials={"deviceId": "in-scope"}), 400, "key")
    refused(lambda: auth.authenticate_device(credentials={
        "deviceId": "in-scope", "key": key.key, "secret": secret, "tokenTTL": 10**9}), 400,
        "tokenTTL")

    api.daemon.ks("update_key", key.key, address_mode="only", addresses=["10.1.0.0/16"])
    refused(lambda: auth.authenticate_device(credentials={
        "deviceId": "in-scope", "key": key.key, "secret": secret}), 401, "ip_denied")
    # X-Forwarded-For is believed only from [api] trusted_proxies (none by default).
    creds = {"deviceId": "in-scope", "key": key.key, "secret": secret}
    forwarded = api.http("POST", "/auth/device", token="", json=creds,
                         headers={"X-Forwarded-For": "10.1.2.3"})
    assert forwarded.status_code == 401, forwarded.text


def test_device_tokens_stop_working_when_their_key_or_device_does(api: ApiEnv) -> None:
    for device in ("a", "b", "c"):
        api.daemon.ks("add_device", device)
    tokens = {}
    keys = {}
    for device in ("a", "b", "c"):
        key, secret = api.daemon.ks("create_key", device_ids=[device])
        keys[device] = key
        tokens[device] = api.client(token="").auth.authenticate_device(
            credentials={"deviceId": device, "key": key.key, "secret": secret})["token"]

    def send(device: str) -> None:
        api.client(token=tokens[device]).device.send_state(
            applicationId=api.app_id, deviceId=device, deviceState={"data": {"x": 1}})

    for device in ("a", "b", "c"):
        send(device)
    api.daemon.ks("set_status", [keys["a"].key], "inactive")
    refused(lambda: send("a"), 401, "inactive")
    api.daemon.ks("delete_keys", [keys["b"].key])
    refused(lambda: send("b"), 401, "invalid or expired device token")
    api.daemon.ks("remove_devices", ["c"])
    refused(lambda: send("c"), 401, "invalid or expired device token")
    api.daemon.ks("set_status", [keys["a"].key], "active")
    send("a")  # the same token works again with its key
    api.daemon.ks("update_key", keys["a"].key, expires_at="2000-01-01T00:00:00Z")
    refused(lambda: send("a"), 401, "expired")


def test_state_over_http_is_counted_and_rate_limited_like_mqtt(daemon_with: StartDaemon) -> None:
    daemon = daemon_with(max_publish_rate=2.0)
    daemon.ks("add_device", "d")
    key, secret = daemon.ks("create_key", device_ids=["d"])
    url = daemon.server.api.url
    token = requests.post(url + "/auth/device", timeout=5, json={
        "deviceId": "d", "key": key.key, "secret": secret}).json()["token"]
    app = daemon.ks("app").id
    statuses = [requests.post(f"{url}/applications/{app}/devices/d/state", timeout=5,
                              json={"data": {"n": i}},
                              headers={"Authorization": f"Bearer {token}"}).status_code
                for i in range(4)]
    assert statuses[:2] == [200, 200] and 429 in statuses[2:]  # bursts of 1 s's worth
    assert daemon.broker.traffic.msgs_in[1] == statuses.count(200)
