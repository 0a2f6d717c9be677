"""Every route of the HTTP API driven by Losant's own REST client (PyPI losant-rest),
unchanged, against a real daemon: what works, and the 400/401/403/404 answers."""

from __future__ import annotations

from tests.api.conftest import ApiEnv, refused

ZERO_ID = "0" * 24


# --- applications -----------------------------------------------------------------------


def test_applications_list_create_get_patch_delete(api: ApiEnv) -> None:
    c = api.client()
    listed = c.applications.get()
    assert [a["name"] for a in listed["items"]] == ["default"]
    assert listed["totalCount"] == 1 and listed["perPage"] == 100 and listed["page"] == 0

    created = c.applications.post(application={"name": "plant-2", "description": "north",
                                               "maxKeys": 2})
    assert created["name"] == "plant-2" and created["maxKeys"] == 2
    assert len(created["id"]) == 24 and created["applicationId"] == created["id"]
    assert api.daemon.ks("app", "plant-2").id == created["id"]  # in the keystore

    got = c.application.get(applicationId=created["id"])
    assert got["description"] == "north"
    patched = c.application.patch(applicationId=created["id"],
                                  application={"name": "plant-two", "maxKeys": 0})
    assert patched["name"] == "plant-two" and patched["maxKeys"] == 0
    page = c.applications.get(sortField="name", sortDirection="desc", perPage=1, page=0,
                              filterField="name", filter="plant-*")
    assert [a["name"] for a in page["items"]] == ["plant-two"] and page["totalCount"] == 1

    assert c.application.delete(applicationId=created["id"]) == {"success": True}
    refused(lambda: c.application.get(applicationId=created["id"]), 404, created["id"])


def test_every_application_has_an_integer_key_limit(api: ApiEnv) -> None:
    """One representation, typed as Losant types its numbers: the limit in force, 0 for
    none; `default` (which follows the daemon's [keystore] max_keys) included."""
    c = api.client()
    made = c.applications.post(application={"name": "plant-3"})
    limits = {a["name"]: a["maxKeys"] for a in c.applications.get()["items"]}
    assert limits == {"default": 0, "plant-3": 0}
    assert c.application.get(applicationId=made["id"])["maxKeys"] == 0
    refused(lambda: c.applications.post(application={"name": "x", "maxKeys": None}), 400,
            "maxKeys")
    refused(lambda: c.application.patch(applicationId=made["id"],
                                        application={"maxKeys": None}), 400, "maxKeys")


def test_every_application_has_an_integer_device_limit(api: ApiEnv) -> None:
    """maxDevices has the shape of maxKeys: the limit in force, 0 for none; POST device
    past it is refused (400 LimitExceeded) naming the application and the limit."""
    c = api.client()
    made = c.applications.post(application={"name": "plant-4", "maxDevices": 1})
    assert made["maxDevices"] == 1
    limits = {a["name"]: a["maxDevices"] for a in c.applications.get()["items"]}
    assert limits == {"default": 0, "plant-4": 1}
    c.devices.post(applicationId=made["id"], device={"name": "first"})
    body = refused(lambda: c.devices.post(applicationId=made["id"], device={"name": "second"}),
                   400, "device limit of 1 reached in application 'plant-4'")
    assert body["type"] == "LimitExceeded"
    assert len(c.devices.get(applicationId=made["id"])["items"]) == 1
    for wrong in (None, -1, "2", 1.5):
        refused(lambda w=wrong: c.applications.post(application={"name": "x", "maxDevices": w}),
                400, "maxDevices")
        refused(lambda w=wrong: c.application.patch(applicationId=made["id"],
                                                    application={"maxDevices": w}), 400,
                "maxDevices")
    patched = c.application.patch(applicationId=made["id"], application={"maxDevices": 2})
    assert patched["maxDevices"] == 2
    assert c.application.get(applicationId=made["id"])["maxDevices"] == 2
    c.devices.post(applicationId=made["id"], device={"name": "second"})


def test_application_errors(api: ApiEnv) -> None:
    c = api.client()
    refused(lambda: c.applications.post(application={"description": "no name"}), 400,
            "name", "required")
    refused(lambda: c.applications.post(application={"name": "x", "orgId": "1"}), 400,
            "unknown field 'orgId'")
    refused(lambda: c.applications.post(application={"name": "default"}), 409, "default")
    refused(lambda: c.application.get(applicationId=ZERO_ID), 404, ZERO_ID)
    refused(lambda: c.application.get(applicationId="not-an-id"), 404, "not-an-id")
    refused(lambda: c.applications.get(sortField="color"), 400, "sortField", "color")
    refused(lambda: c.applications.get(perPage=1001), 400, "perPage")
    refused(lambda: c.applications.get(page="one"), 400, "page", "'one'")


# --- access keys --------------------------------------------------------------------------


def test_key_routes_round_trip_with_losant_field_names(api: ApiEnv) -> None:
    c = api.client()
    api.daemon.ks("add_device", "pump-1", tags=["floor=1"])
    created = c.application_keys.post(applicationId=api.app_id, applicationKey={
        "name": "pumps", "description": "floor 1", "deviceTags": [{"key": "floor", "value": "1"}],
        "filterType": "whitelist", "pubTopics": ["alarms/#"], "subTopics": ["cfg/+"],
        "addressFilterType": "blacklist", "addresses": ["10.9.0.0/16"],
    })
    assert created["secret"] and len(created["id"]) == 24 and created["status"] == "active"
    assert created["deviceTags"] == [{"key": "floor", "value": "1"}]
    assert created["filterType"] == "whitelist" and created["addressFilterType"] == "blacklist"
    stored = api.daemon.ks("get_key", created["key"])
    assert stored.id == created["id"] and stored.pub_topics == ("alarms/#",)

    got = c.application_key.get(applicationId=api.app_id, applicationKeyId=created["id"])
    assert "secret" not in got and got["key"] == created["key"]

    patched = c.application_key.patch(
        applicationId=api.app_id, applicationKeyId=created["id"],
        applicationKey={"status": "inactive", "name": None, "filterType": "all",
                        "pubTopics": [], "subTopics": [], "addressFilterType": "all",
                        "addresses": []})
    assert patched["status"] == "inactive" and patched["name"] is None
    assert patched["filterType"] == "all" and patched["addresses"] == []

    assert c.application_key.delete(applicationId=api.app_id,
                                    applicationKeyId=created["id"]) == {"success": True}
    refused(lambda: c.application_key.get(applicationId=api.app_id,
                                          applicationKeyId=created["id"]), 404, created["id"])
    assert api.daemon.ks("count_keys") == 0


def test_key_list_pages_sorts_filters_and_queries(api: ApiEnv) -> None:
    c = api.client()
    for index in range(5):
        c.application_keys.post(applicationId=api.app_id,
                                applicationKey={"name": f"key-{index}"})
    c.application_key.patch(applicationId=api.app_id, applicationKeyId=c.application_keys.get(
        applicationId=api.app_id, filterField="name", filter="key-3")["items"][0]["id"],
        applicationKey={"status": "inactive"})

    newest_first = c.application_keys.get(applicationId=api.app_id, perPage=2, page=0)
    assert [k["name"] for k in newest_first["items"]] == ["key-4", "key-3"]
    assert newest_first["totalCount"] == 5 and newest_first["count"] == 2
    last = c.application_keys.get(applicationId=api.app_id, perPage=2, page=2)
    assert [k["name"] for k in last["items"]] == ["key-0"]
    by_name = c.application_keys.get(applicationId=api.app_id, sortField="name",
                                     sortDirection="asc")
    assert [k["name"] for k in by_name["items"]] == [f"key-{i}" for i in range(5)]
    def named(pattern: str) -> list[str]:
        found = c.application_keys.get(applicationId=api.app_id, filterField="name",
                                       filter=pattern, sortField="name", sortDirection="asc")
        return [k["name"] for k in found["items"]]

    assert named("key-1") == ["key-1"]
    assert named("*-?") == [f"key-{i}" for i in range(5)]
    assert named("key-[12]") == []  # only * and ? are wildcards
    queried = c.application_keys.get(applicationId=api.app_id, query={"status": "inactive"})
    assert [k["name"] for k in queried["items"]] == ["key-3"]
    assert queried["applicationId"] == api.app_id


def test_key_errors(api: ApiEnv) -> None:
    c = api.client()
    post = c.application_keys.post
    refused(lambda: post(applicationId=api.app_id, applicationKey={"deviceIds": "dev"}), 400,
            "deviceIds")
    refused(lambda: post(applicationId=api.app_id, applicationKey={"deviceIds": ["ghost"]}),
            400, "ghost")
    refused(lambda: post(applicationId=api.app_id, applicationKey={"filterType": "most"}), 400,
            "filterType")
    refused(lambda: post(applicationId=api.app_id, applicationKey={
        "filterType": "whitelist", "pubTopics": ["a/#/b"]}), 400, "a/#/b")
    refused(lambda: post(applicationId=api.app_id, applicationKey={
        "addressFilterType": "whitelist", "addresses": ["10.0.0.0/33"]}), 400, "10.0.0.0/33")
    refused(lambda: post(applicationId=ZERO_ID, applicationKey={}), 404, ZERO_ID)
    created = post(applicationId=api.app_id, applicationKey={"name": "k"})
    refused(lambda: post(applicationId=api.app_id, applicationKey={"name": "k"}), 409, "'k'")
    refused(lambda: c.application_key.patch(
        applicationId=api.app_id, applicationKeyId=created["id"],
        applicationKey={"deviceIds": ["x"]}), 400, "deviceIds cannot be changed")
    refused(lambda: c.application_key.patch(
        applicationId=api.app_id, applicationKeyId=created["id"],
        applicationKey={"status": "paused"}), 400, "status")
    refused(lambda: c.application_key.get(applicationId=api.app_id,
                                          applicationKeyId=ZERO_ID), 404, ZERO_ID)
    refused(lambda: c.application_keys.get(applicationId=api.app_id, query={"colour": 1}), 400,
            "colour")
    # Losant ignores a filter without a filterField, and so do we.
    assert c.application_keys.get(applicationId=api.app_id, filter="zzz*")["count"] == 1
    refused(lambda: c.application_keys.get(applicationId=api.app_id, page=10**20), 400,
            "page")
    deep = api.http("GET", f"/applications/{api.app_id}/keys",
                    params={"query": "[" * 2000 + "]" * 2000})
    assert deep.status_code == 400 and "query" in deep.json()["message"]
    keys_status = c.application_keys.get(applicationId=api.app_id, filterField="status",
                                         filter="active")
    assert keys_status["count"] == 1


# --- devices ------------------------------------------------------------------------------


def test_device_routes(api: ApiEnv) -> None:
    c = api.client()
    created = c.devices.post(applicationId=api.app_id, device={
        "name": "boiler", "tags": [{"key": "floor", "value": "2"}]})
    device_id = created["deviceId"]
    assert len(device_id) == 24 and created["id"] == device_id
    assert created["connectionInfo"] == {"connected": 0, "time": None}
    assert api.daemon.ks("get_device", device_id).tags == (("floor", "2"),)

    patched = c.device.patch(applicationId=api.app_id, deviceId=device_id,
                             device={"name": "boiler-2", "tags": [{"key": "floor", "value": "3"},
                                                                   {"key": "kind", "value": "b"}]})
    assert patched["name"] == "boiler-2"
    assert patched["tags"] == [{"key": "floor", "value": "3"}, {"key": "kind", "value": "b"}]
    got = c.device.get(applicationId=api.app_id, deviceId=device_id, excludeConnectionInfo=True)
    assert got["name"] == "boiler-2" and "connectionInfo" not in got

    c.devices.post(applicationId=api.app_id, device={"name": "alpha"})
    listed = c.devices.get(applicationId=api.app_id)
    assert [d["name"] for d in listed["items"]] == ["alpha", "boiler-2"]
    filtered = c.devices.get(applicationId=api.app_id, filterField="name", filter="b*")
    assert [d["name"] for d in filtered["items"]] == ["boiler-2"]
    assert filtered["totalCount"] == 1

    assert c.device.delete(applicationId=api.app_id, deviceId=device_id) == {"success": True}
    refused(lambda: c.device.get(applicationId=api.app_id, deviceId=device_id), 404, device_id)


def test_device_errors(api: ApiEnv) -> None:
    c = api.client()
    refused(lambda: c.devices.post(applicationId=api.app_id, device={}), 400, "name")
    refused(lambda: c.devices.post(applicationId=api.app_id,
                                   device={"name": "x", "attributes": []}), 400, "attributes")
    refused(lambda: c.devices.post(applicationId=api.app_id,
                                   device={"name": "x", "tags": [{"key": "k"}]}), 400, "value")
    refused(lambda: c.device.get(applicationId=api.app_id, deviceId="nope"), 404, "nope")
    refused(lambda: c.device.send_command(applicationId=api.app_id, deviceId="nope",
                                          deviceCommand={"name": "go"}), 404, "nope")
    refused(lambda: c.devices.get(applicationId=api.app_id, excludeConnectionInfo="maybe"), 400,
            "excludeConnectionInfo")
    assert api.daemon.ks("count_devices") == 0


# --- tokens: 401 and 403 ----------------------------------------------------------------------


def test_missing_invalid_and_revoked_tokens_are_401(api: ApiEnv) -> None:
    refused(lambda: api.client(token="").applications.get(), 401, "missing token")
    refused(lambda: api.client(token="kba.nonsense").applications.get(), 401, "invalid")
    row, token = api.daemon.ks("create_token", "short-lived")
    assert api.client(token=token).applications.get()["count"] == 1
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    refused(lambda: api.client(token=forged).applications.get(), 401, "invalid")
    api.daemon.ks("revoke_tokens", [row.id])
    refused(lambda: api.client(token=token).applications.get(), 401, "revoked")


def test_scopes_and_application_binding_are_403(api: ApiEnv) -> None:
    other = api.daemon.ks("create_app", "other")
    reader = api.client(token=api.token_for("reader", scopes=["all.Application.read"]))
    assert reader.application_keys.get(applicationId=api.app_id)["count"] == 0
    refused(lambda: reader.application_keys.post(applicationId=api.app_id, applicationKey={}),
            403, "applicationKeys.post")
    keys_only = api.client(token=api.token_for("keys", scopes=["applicationKeys.*"]))
    assert keys_only.application_keys.post(applicationId=api.app_id, applicationKey={})["key"]
    refused(lambda: keys_only.devices.get(applicationId=api.app_id), 403, "devices.get")

    bound = api.client(token=api.token_for("bound", app="other"))
    assert [a["id"] for a in bound.applications.get()["items"]] == [other.id]
    assert bound.devices.get(applicationId=other.id)["count"] == 0
    refused(lambda: bound.devices.get(applicationId=api.app_id), 403, "another application")
    refused(lambda: bound.applications.post(application={"name": "x"}), 403, "one application")
    assert api.daemon.ks("count_keys", every_app=True) == 1  # only keys_only's key
