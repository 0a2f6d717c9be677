"""keybroker authsvc as the access-key service of a real 2-node RabbitMQ cluster
(docs/cluster.md): the access-key matrix across nodes, device topics and custom lists,
filters refused by containment, live revocation on both nodes, and subscriptions that do
not outlive a scope change. Real paho clients on both nodes' MQTT ports."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from keystore.models import TopicMode
from tests.rabbitmq.conftest import ClusterEnv, refused
from tests.support.dbdump import dump_text
from tests.support.waiting import wait_until


def test_the_access_key_matrix_on_both_nodes(env: ClusterEnv) -> None:
    key, secret = env.key(["mx-1", "mx-2", "mx.dot"])
    env.store(lambda ks: ks.add_device("mx-out"))
    ip_key, ip_secret = env.key(["mx-ip"], address_mode="only", addresses=["127.0.0.7/32"])
    connected = []
    for node in (0, 1):
        assert env.client(node, "mx-1", key, secret + "x").connect() == 4
        assert env.client(node, "mx-1", "0" * 32, secret).connect() == 4
        assert env.client(node, "mx-out", key, secret).connect() == 5  # not in the scope
        assert env.client(node, "mx-ghost", key, secret).connect() == 5  # no such device
        assert env.client(node, "mx.dot", key, secret).connect() == 5  # ambiguous in AMQP
        assert env.client(node, "mx-ip", ip_key, ip_secret).connect() == 5  # from 127.0.0.1
        allowed = env.client(node, "mx-ip", ip_key, ip_secret)
        assert allowed.connect(bind_address="127.0.0.7") == 0
        allowed.close()
        connected.append(env.client(node, "mx-1", key, secret))
        assert connected[-1].connect() == 0
    # Client-id take-over is cluster-wide: mx-1 on node 2 ended mx-1 on node 1.
    assert connected[0].disconnected.wait(5) and not connected[1].disconnected.is_set()


def test_a_wrong_secret_never_touches_the_connection_it_names(env: ClusterEnv) -> None:
    key, secret = env.key(["vc-1"])
    victim = env.client(0, "vc-1", key, secret)
    assert victim.connect() == 0
    assert env.client(1, "vc-1", key, "wrong").connect() == 4
    assert not victim.disconnected.wait(1.0)


def test_device_topics_of_the_scope_across_nodes(env: ClusterEnv) -> None:
    key, secret = env.key(["dt-gw", "dt-1", "dt-2"])
    gateway = env.client(1, "dt-gw", key, secret)
    assert gateway.connect() == 0
    assert gateway.subscribe("losant/dt-1/state", 1) == 1
    assert gateway.subscribe("losant/dt-2/#", 1) == 1
    device = env.client(0, "dt-1", key, secret)
    assert device.connect() == 0
    device.publish("losant/dt-1/state", b'{"temp": 21}', qos=1)
    device.publish("losant/dt-2/command", b"reboot", qos=1)  # acts for dt-2, in its scope
    got = {gateway.get().topic, gateway.get().topic}  # type: ignore[union-attr]
    assert got == {"losant/dt-1/state", "losant/dt-2/command"}
    # Another scope may neither publish into this one nor read from it.
    other_key, other_secret = env.key(["dt-x"])
    intruder = env.client(0, "dt-x", other_key, other_secret)
    assert intruder.connect() == 0
    intruder.client.publish("losant/dt-1/state", b"spoofed", qos=0)
    assert intruder.disconnected.wait(5)
    reader = env.client(1, "dt-x", other_key, other_secret)
    assert reader.connect() == 0
    assert refused(reader, "losant/dt-1/state")
    assert gateway.get(0.5) is None


def test_wildcards_reaching_beyond_the_readable_topics_are_refused(env: ClusterEnv) -> None:
    key, secret = env.key(["wc-1", "wc-2"], topic_mode=TopicMode.ALL)
    for index, topic_filter in enumerate(["#", "+/state", "losant/+/state", "$SYS/#",
                                          "losant/#"]):
        client = env.client(index % 2, "wc-1", key, secret)
        assert client.connect() == 0
        assert refused(client, topic_filter), topic_filter
    within = env.client(0, "wc-1", key, secret)
    assert within.connect() == 0
    assert within.subscribe("losant/wc-2/#") == 0
    assert within.subscribe("news/+/today") == 0  # custom topics: mode all
    events = [e for e in env.events() if e["event"] == "subscribe_denied"
              and e["client_id"] == "wc-1"]
    assert {e["topic"] for e in events} >= {"#", "+/state", "losant/+/state", "$SYS/#"}


def test_custom_topic_lists(env: ClusterEnv) -> None:
    key, secret = env.key(["cu-1", "cu-2"], topic_mode=TopicMode.ONLY,
                          pub_topics=["alerts/+"], sub_topics=["alerts/#"])
    watcher = env.client(1, "cu-1", key, secret)
    assert watcher.connect() == 0
    assert watcher.subscribe("alerts/#", 1) == 1
    sender = env.client(0, "cu-2", key, secret)
    assert sender.connect() == 0
    sender.publish("alerts/fire", b"!", qos=1)
    message = watcher.get()
    assert message is not None and message.topic == "alerts/fire"
    sender.client.publish("alerts/fire/now", b"!", qos=0)  # not in the publish list
    assert sender.disconnected.wait(5)
    nosy = env.client(0, "cu-2", key, secret)
    assert nosy.connect() == 0
    assert refused(nosy, "other/#")
    excepting, except_secret = env.key(["ce-1"], topic_mode=TopicMode.EXCEPT,
                                       pub_topics=["secret/#"], sub_topics=["secret/#"])
    reader = env.client(1, "ce-1", excepting, except_secret)
    assert reader.connect() == 0
    assert reader.subscribe("news/#") == 0
    assert refused(reader, "secret/plans")


def test_a_deactivated_key_is_disconnected_on_both_nodes_and_cannot_reconnect(
        env: ClusterEnv) -> None:
    key, secret = env.key(["rv-1", "rv-2"])
    sessions = [env.client(0, "rv-1", key, secret), env.client(1, "rv-2", key, secret)]
    for session in sessions:
        assert session.connect() == 0
        assert session.subscribe("losant/rv-1/state", 1) == 1
    env.store(lambda ks: ks.set_status([key], "inactive"))
    wait_until(lambda: all(session.disconnected.is_set() for session in sessions), 5.0,
               "both sessions disconnected")
    for node, device in ((0, "rv-1"), (1, "rv-2")):
        assert env.client(node, device, key, secret).connect() == 5
    kicks = {(e["key"], e["reason"]) for e in env.events() if e["event"] == "kick"}
    assert (key, "key_inactive") in kicks


def test_a_key_expiring_while_connected_is_disconnected(env: ClusterEnv) -> None:
    expires = datetime.now(UTC) + timedelta(seconds=2)
    key, secret = env.key(["xp-1"], expires_at=expires)
    session = env.client(1, "xp-1", key, secret)
    assert session.connect() == 0
    assert session.disconnected.wait(2 + 5.0)
    assert datetime.now(UTC) >= expires
    assert env.client(0, "xp-1", key, secret).connect() == 5


def test_a_deleted_key_is_disconnected(env: ClusterEnv) -> None:
    key, secret = env.key(["dk-1"])
    session = env.client(1, "dk-1", key, secret)
    assert session.connect() == 0
    env.store(lambda ks: ks.delete_keys([key]))
    assert session.disconnected.wait(5.0)
    assert env.client(0, "dk-1", key, secret).connect() == 4  # no such key any more


def test_a_removed_device_is_disconnected(env: ClusterEnv) -> None:
    key, secret = env.key(["rm-gw", "rm-1"])
    session = env.client(0, "rm-1", key, secret)
    assert session.connect() == 0
    bystander = env.client(1, "rm-gw", key, secret)
    assert bystander.connect() == 0
    # RabbitMQ lists a connection by client id from statistics, a few seconds after it
    # opened: wait until it does, so the 5 s below measure the service, not that delay.
    wait_until(lambda: "rm-1" in env.rabbit.client_ids(), 15, poll=0.1)
    env.store(lambda ks: ks.remove_devices(["rm-1"]))
    assert session.disconnected.wait(5.0)
    assert not bystander.disconnected.is_set()  # same key, another device: stays
    assert env.client(1, "rm-1", key, secret).connect() == 5


def test_persistent_subscriptions_do_not_outlive_a_scope_change(env: ClusterEnv) -> None:
    """RabbitMQ resumes a persistent session's queue and bindings without asking again:
    the service drops them when the session comes back under another scope."""
    key, secret = env.key(["ps-gw", "ps-1"])
    gateway = env.client(0, "ps-gw", key, secret, clean_session=False)
    assert gateway.connect() == 0
    assert gateway.subscribe("losant/ps-1/state", 1) == 1
    gateway.close()
    env.store(lambda ks: ks.untag_device("ps-1", ["site"]))  # ps-1 leaves the key's scope
    device_key, device_secret = env.store(lambda ks: ks.create_key(device_ids=["ps-1"]))
    device_key = device_key.key
    back = env.client(1, "ps-gw", key, secret, clean_session=False)
    assert back.connect() == 0
    device = env.client(0, "ps-1", device_key, device_secret)
    assert device.connect() == 0
    device.publish("losant/ps-1/state", b"not for the gateway any more", qos=1)
    assert back.get(1.5) is None


def test_rabbitmq_asks_with_post_and_no_secret_is_written_anywhere(env: ClusterEnv) -> None:
    answer = env.rabbit.ctl("eval", "application:get_env(rabbitmq_auth_backend_http, "
                            "http_method).")
    assert answer.strip() == "{ok,post}"
    written = "".join(replica.log_text() for replica in env.replicas)
    written += "".join(path.read_text() for path in env.audit if path.exists())
    for node in env.rabbit.nodes:
        written += env.rabbit.log_tail(node, size=10**7)
    written += dump_text(env.db).decode(errors="replace")  # the keystore (snapshots too)
    assert env.secrets and not [s for s in env.secrets if s in written]
    assert env.rabbit.admin_password not in written
    assert re.search(r'"event":"connect_ok"', written)
