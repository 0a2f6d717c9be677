"""Each device's MQTT protocol version shows where its connection does: the API's
``connectionInfo`` and the metrics' count of CONNACKs by protocol and code."""

from __future__ import annotations

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.api.conftest import ApiEnv
from tests.support.harness import Client
from tests.support.metrics import scrape
from tests.support.waiting import wait_until


def connect5(port: int, client_id: str, key: str, secret: str) -> tuple[mqtt.Client, list[int]]:
    """A paho MQTT 5 client, connected; the CONNACK reason codes it got."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    client.username_pw_set(key, secret)
    codes: list[int] = []
    client.on_connect = lambda _c, _u, _f, reason, _p: codes.append(reason.value)
    client.connect_async("127.0.0.1", port)
    client.loop_start()
    wait_until(lambda: codes, what="a CONNACK")
    return client, codes


def test_connection_info_names_each_devices_protocol(api: ApiEnv) -> None:
    daemon = api.daemon
    daemon.ks("upsert_devices", [("old", None, []), ("new", None, []), ("off", None, [])])
    key, secret = daemon.ks("create_key")
    path = f"/applications/{api.app_id}/devices"
    with Client(daemon.port(), "old", key.key, secret) as old:
        assert old.connect() == 0
        new, codes = connect5(daemon.port(), "new", key.key, secret)
        try:
            assert codes == [0]
            info = {d["deviceId"]: d["connectionInfo"]
                    for d in api.http("GET", path).json()["items"]}
        finally:
            new.disconnect()
            new.loop_stop()
    assert info["old"]["connected"] == 1 and info["old"]["protocol"] == "MQTT 3.1.1"
    assert info["new"]["connected"] == 1 and info["new"]["protocol"] == "MQTT 5.0"
    assert info["off"]["connected"] == 0 and "protocol" not in info["off"]


def test_connacks_are_counted_by_protocol_and_code(api: ApiEnv) -> None:
    daemon = api.daemon
    daemon.ks("add_device", "dev")
    key, secret = daemon.ks("create_key", device_ids=["dev"])
    before = scrape(daemon.api_url())
    for secret_given in (secret, "wrong"):
        client, codes = connect5(daemon.port(), "dev", key.key, secret_given)
        client.disconnect()
        client.loop_stop()
        assert codes == [0 if secret_given == secret else 0x86]
    with Client(daemon.port(), "dev", key.key, "wrong") as old:
        assert old.connect() == 4
    after = scrape(daemon.api_url())

    def moved(protocol: str, code: int) -> float:
        name = ("keybroker_connacks_total", (("code", str(code)), ("protocol", protocol)))
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert moved("5.0", 0) == 1 and moved("5.0", 0x86) == 1 and moved("3.1.1", 4) == 1
    assert moved("3.1.1", 0) == 0
