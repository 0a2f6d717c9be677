"""RabbitMQ's HTTP auth backend contract against real authsvc replicas: requests shaped as
RabbitMQ 3.10's MQTT plugin sends them (captured from a real node), answered by one
replica or the other (docs/cluster.md#rabbitmq). Every security rule has a negative test;
tests/rabbitmq drives the same through a real RabbitMQ cluster."""

from __future__ import annotations

import json

from keystore import KeyStore
from keystore.models import AccessKey, AddressMode, TopicMode
from tests.authsvc.conftest import Replicas, fields
from tests.support.authsvc import Replica, ask, authsvc_config
from tests.support.waiting import wait_until

ALLOW, DENY = (200, "allow"), (200, "deny")


def user(replica: Replica, key: str, secret: str, client_id: str) -> tuple[int, str]:
    return ask(replica.url, "/auth/user", fields(username=key, password=secret, vhost="/",
                                                 client_id=client_id))


def vhost(replica: Replica, key: str, client_id: str, ip: str = "127.0.0.1",
          host: str = "/") -> tuple[int, str]:
    return ask(replica.url, "/auth/vhost", fields(username=key, vhost=host, ip=ip, tags="",
                                                  client_id=client_id))


def topic(replica: Replica, key: str, client_id: str, permission: str,
          routing_key: str) -> tuple[int, str]:
    return ask(replica.url, "/auth/topic", fields(
        username=key, vhost="/", resource="topic", name="amq.topic", permission=permission,
        tags="", routing_key=routing_key, variable_map__client_id=client_id,
        variable_map__username=key, variable_map__vhost="/"))


def resource(replica: Replica, key: str, client_id: str, kind: str, name: str,
             permission: str) -> tuple[int, str]:
    return ask(replica.url, "/auth/resource", fields(
        username=key, vhost="/", resource=kind, name=name, permission=permission, tags="",
        client_id=client_id))


def connect(pair: Replicas, key: str, secret: str, client_id: str, ip: str = "127.0.0.1",
            host: str = "/") -> tuple[int, str]:
    """A CONNECT as RabbitMQ asks it: credentials from one replica, admission from the
    other (a load balancer in front of the replicas may do just that)."""
    first = user(pair.a, key, secret, client_id)
    return first if first != ALLOW else vhost(pair.b, key, client_id, ip, host)


def make_key(pair: Replicas, devices: list[str], **options: object) -> tuple[AccessKey, str]:
    async def go(ks: KeyStore) -> tuple[AccessKey, str]:
        for device in devices:
            await ks.add_device(device, tags=[("site", devices[0])])
        return await ks.create_key(device_tags=[("site", devices[0])], **options)  # type: ignore[arg-type]

    return pair.store(go)


# --- CONNECT ---------------------------------------------------------------------------


def test_credentials_are_checked_at_user_and_the_rest_at_vhost(replicas: Replicas) -> None:
    key, secret = make_key(replicas, ["cr-1", "cr-2"])
    outsider = replicas.store(lambda ks: ks.add_device("cr-out"))
    assert user(replicas.a, key.key, secret, "cr-1") == ALLOW
    assert user(replicas.a, key.key, secret + "x", "cr-1") == DENY  # CONNACK 4
    assert user(replicas.b, "0" * 32, secret, "cr-1") == DENY
    assert ask(replicas.a.url, "/auth/user", fields(username=key.key, vhost="/",
                                                    client_id="cr-1")) == DENY
    # The secret is right, the device is not the key's: refused at vhost (CONNACK 5).
    assert user(replicas.a, key.key, secret, outsider.id) == ALLOW
    assert vhost(replicas.b, key.key, outsider.id) == DENY
    assert vhost(replicas.b, key.key, "cr-ghost") == DENY
    assert connect(replicas, key.key, secret, "cr-2") == ALLOW
    events = [json.loads(line) for path in replicas.audit if path.exists()
              for line in path.read_text().splitlines()]
    refused = {(e["client_id"], e["reason"], e["key"]) for e in events
               if e["event"] == "connect_refused"}
    assert {("cr-1", "bad_credentials", "0" * 32), ("cr-1", "bad_credentials", key.key),
            (outsider.id, "device_not_in_scope", key.key),
            ("cr-ghost", "unknown_device", key.key)} <= refused
    assert secret not in replicas.texts()


def test_admission_needs_a_secret_checked_for_that_client_id_and_key(
        replicas: Replicas) -> None:
    """/auth/vhost carries no secret: an allowed peer asking it alone, or after checking
    another client id's or another key's secret, admits nothing and records nothing."""
    key, secret = make_key(replicas, ["vb-1", "vb-2"])
    other, other_secret = make_key(replicas, ["vb-3"])  # same application, another key
    assert vhost(replicas.a, key.key, "vb-1") == DENY  # no /auth/user at all
    assert user(replicas.a, key.key, secret, "vb-2") == ALLOW
    assert vhost(replicas.b, key.key, "vb-1") == DENY  # the secret was checked for vb-2
    assert user(replicas.a, other.key, other_secret, "vb-1") == ALLOW
    assert vhost(replicas.b, key.key, "vb-1") == DENY  # ... and for vb-1 under another key
    assert replicas.store(lambda ks: ks.connection("vb-1")) is None  # no snapshot written
    assert user(replicas.a, key.key, secret, "vb-1") == ALLOW
    assert vhost(replicas.b, key.key, "vb-1") == ALLOW  # the real sequence, any replica
    events = [json.loads(line) for path in replicas.audit if path.exists()
              for line in path.read_text().splitlines()]
    refused = [e["reason"] for e in events
               if e["event"] == "connect_refused" and e["client_id"] == "vb-1"]
    assert refused == ["secret_not_checked"] * 3


def test_a_secret_check_admits_only_within_the_admission_window(replicas: Replicas) -> None:
    work = replicas.work
    brief = Replica(work, "brief", authsvc_config(replicas.db, work / "brief.jsonl",
                                                  admission_window=0.5)).start()
    try:
        key, secret = make_key(replicas, ["aw-1"])
        assert user(brief, key.key, secret, "aw-1") == ALLOW
        assert vhost(brief, key.key, "aw-1") == ALLOW
        wait_until(lambda: vhost(brief, key.key, "aw-1") == DENY, timeout=10,
                   what="admission refused once the check is older than the window")
        assert user(brief, key.key, secret, "aw-1") == ALLOW  # the next CONNECT
        assert vhost(brief, key.key, "aw-1") == ALLOW
    finally:
        brief.stop()


def test_inactive_and_expired_keys_are_refused_at_vhost(replicas: Replicas) -> None:
    key, secret = make_key(replicas, ["in-1"])
    replicas.store(lambda ks: ks.set_status([key.key], "inactive"))
    assert user(replicas.a, key.key, secret, "in-1") == ALLOW
    assert vhost(replicas.a, key.key, "in-1") == DENY
    old, old_secret = make_key(replicas, ["ex-1"], expires_at="2020-01-01T00:00:00Z")
    assert connect(replicas, old.key, old_secret, "ex-1") == DENY


def test_the_keys_address_rule_is_checked_with_the_client_address(replicas: Replicas) -> None:
    key, secret = make_key(replicas, ["ip-1"], address_mode="only", addresses=["198.51.100.7/32"])
    assert key.address_mode is AddressMode.ONLY
    assert connect(replicas, key.key, secret, "ip-1", ip="198.51.100.7") == ALLOW
    assert connect(replicas, key.key, secret, "ip-1", ip="198.51.100.8") == DENY


def test_a_virtual_host_is_an_application(replicas: Replicas) -> None:
    async def go(ks: KeyStore) -> tuple[AccessKey, str]:
        await ks.create_app("plant")
        await ks.add_device("vh-1", app="plant")
        return await ks.create_key(app="plant")

    key, secret = replicas.store(go)
    assert connect(replicas, key.key, secret, "vh-1", host="/") == DENY  # "/" is "default"
    assert connect(replicas, key.key, secret, "vh-1", host="plant") == ALLOW
    default_key, default_secret = make_key(replicas, ["vh-2"])
    assert connect(replicas, default_key.key, default_secret, "vh-2", host="plant") == DENY


def test_client_ids_with_a_dot_and_requests_without_one_are_refused(replicas: Replicas) -> None:
    key, secret = make_key(replicas, ["dot.1", "dot-2"])
    assert connect(replicas, key.key, secret, "dot.1") == DENY  # reads as device "dot"
    assert connect(replicas, key.key, secret, "dot-2") == ALLOW
    # AMQP 0-9-1 (or the management UI) asks without a client id: never admitted.
    assert ask(replicas.a.url, "/auth/vhost", fields(username=key.key, vhost="/",
                                                     ip="127.0.0.1", tags="")) == DENY
    assert ask(replicas.a.url, "/auth/resource", fields(
        username=key.key, vhost="/", resource="queue", name="q", permission="configure",
        tags="")) == DENY


# --- later requests ---------------------------------------------------------------------


def test_topics_of_a_restricted_key_by_containment(replicas: Replicas) -> None:
    key, secret = make_key(replicas, ["tp-1", "tp-2"])
    replicas.store(lambda ks: ks.add_device("tp-x"))
    assert connect(replicas, key.key, secret, "tp-1") == ALLOW
    for permission, routing_key, expected in [
        ("write", "losant.tp-1.state", ALLOW),
        ("write", "losant.tp-2.command", ALLOW),  # acts for a device of its scope
        ("write", "losant.tp-x.state", DENY),
        ("read", "losant.tp-2.state", ALLOW),
        ("read", "losant.tp-1.#", ALLOW),
        ("read", "losant.tp-1.*.x", ALLOW),
        ("read", "losant.*.state", DENY),  # would reach every device
        ("read", "*.state", DENY),
        ("read", "#", DENY),
        ("read", "$SYS.#", DENY),
        ("write", "$SYS.x", DENY),
        ("write", "losant.*.state", DENY),  # a wildcard is no topic
        ("read", "custom.x", DENY),  # topic mode none
    ]:
        for replica in (replicas.a, replicas.b):
            assert topic(replica, key.key, "tp-1", permission, routing_key) == expected, \
                (permission, routing_key)


def test_custom_lists_with_dots_are_read_the_way_rabbitmq_routes(replicas: Replicas) -> None:
    only, only_secret = make_key(replicas, ["cl-1"], topic_mode=TopicMode.ONLY,
                                 pub_topics=["alerts/+", "a.b/c"], sub_topics=["alerts/#"])
    assert connect(replicas, only.key, only_secret, "cl-1") == ALLOW
    assert topic(replicas.a, only.key, "cl-1", "write", "alerts.x") == ALLOW
    assert topic(replicas.a, only.key, "cl-1", "write", "a.b.c") == DENY  # ambiguous: refused
    assert topic(replicas.a, only.key, "cl-1", "read", "alerts.#") == ALLOW
    assert topic(replicas.a, only.key, "cl-1", "read", "alerts.x.y") == ALLOW
    assert topic(replicas.a, only.key, "cl-1", "read", "other.#") == DENY
    banned, banned_secret = make_key(replicas, ["cl-2"], topic_mode=TopicMode.EXCEPT,
                                     pub_topics=["x.y/#"], sub_topics=["x.y/#"])
    assert connect(replicas, banned.key, banned_secret, "cl-2") == ALLOW
    assert topic(replicas.b, banned.key, "cl-2", "write", "x.y.z") == DENY  # x/y/z: excepted
    assert topic(replicas.b, banned.key, "cl-2", "write", "x.q") == ALLOW
    assert topic(replicas.b, banned.key, "cl-2", "read", "x.#") == DENY  # reaches x/y


def test_the_scope_of_a_connection_is_the_one_resolved_at_connect(replicas: Replicas) -> None:
    key, secret = make_key(replicas, ["sc-1", "sc-2"])
    assert connect(replicas, key.key, secret, "sc-1") == ALLOW
    replicas.store(lambda ks: ks.untag_device("sc-2", ["site"]))  # leaves the key's scope
    # Either replica answers from the snapshot: sc-2 is still in this connection's scope.
    assert topic(replicas.b, key.key, "sc-1", "read", "losant.sc-2.state") == ALLOW
    assert topic(replicas.a, key.key, "sc-1", "read", "losant.sc-2.state") == ALLOW
    assert connect(replicas, key.key, secret, "sc-1") == ALLOW  # the next CONNECT
    assert topic(replicas.b, key.key, "sc-1", "read", "losant.sc-2.state") == DENY


def test_a_later_request_needs_the_admitted_connection_and_a_live_key(
        replicas: Replicas) -> None:
    key, secret = make_key(replicas, ["lt-1", "lt-2"])
    other, _ = make_key(replicas, ["lt-3"])
    assert topic(replicas.a, key.key, "lt-1", "write", "losant.lt-1.state") == DENY  # never
    assert connect(replicas, key.key, secret, "lt-1") == ALLOW
    assert topic(replicas.a, other.key, "lt-1", "write", "losant.lt-1.state") == DENY
    assert topic(replicas.a, key.key, "lt-2", "write", "losant.lt-1.state") == DENY
    replicas.store(lambda ks: ks.set_status([key.key], "inactive"))
    assert topic(replicas.b, key.key, "lt-1", "write", "losant.lt-1.state") == DENY
    replicas.store(lambda ks: ks.set_status([key.key], "active"))
    assert topic(replicas.b, key.key, "lt-1", "write", "losant.lt-1.state") == ALLOW
    replicas.store(lambda ks: ks.update_key(key.key, address_mode="only", addresses=["10.9.9.9"]))
    assert topic(replicas.b, key.key, "lt-1", "write", "losant.lt-1.state") == DENY
    replicas.store(lambda ks: ks.remove_devices(["lt-1"]))
    replicas.store(lambda ks: ks.update_key(key.key, address_mode="all", addresses=[]))
    assert topic(replicas.b, key.key, "lt-1", "write", "losant.lt-1.state") == DENY


def test_resources_are_the_connections_own_queues_and_the_mqtt_exchange(
        replicas: Replicas) -> None:
    key, secret = make_key(replicas, ["rs-1"])
    assert connect(replicas, key.key, secret, "rs-1") == ALLOW
    for kind, name, permission, expected in [
        ("queue", "mqtt-subscription-rs-1qos0", "configure", ALLOW),
        ("queue", "mqtt-subscription-rs-1qos1", "read", ALLOW),
        ("queue", "mqtt-subscription-rs-1qos1", "write", ALLOW),
        ("queue", "mqtt-subscription-rs-2qos1", "read", DENY),  # another client's
        ("queue", "orders", "read", DENY),
        ("exchange", "amq.topic", "read", ALLOW),
        ("exchange", "amq.topic", "write", ALLOW),
        ("exchange", "amq.topic", "configure", DENY),
        ("exchange", "amq.fanout", "write", DENY),
    ]:
        assert resource(replicas.b, key.key, "rs-1", kind, name, permission) == expected, \
            (kind, name, permission)
    assert topic(replicas.a, key.key, "rs-1", "write", "losant.rs-1.x") == ALLOW
    assert ask(replicas.a.url, "/auth/topic", fields(
        username=key.key, vhost="/", resource="topic", name="amq.fanout", permission="write",
        routing_key="losant.rs-1.x", variable_map__client_id="rs-1")) == DENY


# --- the service itself ----------------------------------------------------------------


def test_get_is_refused_so_no_password_travels_in_a_url(replicas: Replicas) -> None:
    key, secret = make_key(replicas, ["gt-1"])
    status, body = ask(replicas.a.url, "/auth/user", fields(
        username=key.key, password=secret, vhost="/", client_id="gt-1"), method="GET")
    assert (status, body) == (405, "deny")
    assert "http_method = post" in replicas.a.log_text()
    assert secret not in replicas.texts()


def test_only_allowed_peers_may_ask(replicas: Replicas) -> None:
    work = replicas.work
    closed = Replica(work, "closed", authsvc_config(replicas.db, work / "closed.jsonl",
                                                    allowed_peers=["10.0.0.0/8"])).start()
    try:
        key, secret = make_key(replicas, ["pe-1"])
        assert user(closed, key.key, secret, "pe-1") == (403, "deny")
        assert "not in [authsvc] allowed_peers" in closed.log_text()
    finally:
        closed.stop()


def test_the_guard_bans_a_source_after_refused_admissions(replicas: Replicas) -> None:
    work = replicas.work
    audit = work / "guarded.jsonl"
    guarded = Replica(work, "guarded", authsvc_config(replicas.db, audit,
                                                      max_failures=3)).start()
    try:
        key, secret = make_key(replicas, ["gd-1"], address_mode="only",
                               addresses=["192.0.2.0/24"])
        assert user(guarded, key.key, secret, "gd-1") == ALLOW
        assert vhost(guarded, key.key, "gd-1", ip="192.0.2.9") == ALLOW
        for _ in range(3):
            assert vhost(guarded, key.key, "gd-1", ip="203.0.113.9") == DENY  # ip_denied
        key2, secret2 = make_key(replicas, ["gd-2"])
        assert user(guarded, key2.key, secret2, "gd-2") == ALLOW
        # Banned: refused before anything is looked up, even for a key that would pass.
        assert vhost(guarded, key2.key, "gd-2", ip="203.0.113.9") == DENY
        assert vhost(guarded, key2.key, "gd-2", ip="203.0.113.10") == ALLOW
    finally:
        guarded.stop()
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    assert any(e["event"] == "ban" and e["client_ip"] == "203.0.113.9" for e in events)
    refused = [e for e in events if e["event"] == "connect_refused"]
    assert [e["reason"] for e in refused] == ["ip_denied"] * 3  # the banned one: not a line


def test_health(replicas: Replicas) -> None:
    assert ask(replicas.a.url, "/health", {}, method="GET") == (200, "ok")


def test_an_admitted_connection_records_the_keys_last_use(replicas: Replicas) -> None:
    key, secret = make_key(replicas, ["lu-1"])
    assert replicas.store(lambda ks: ks.get_key(key.key)).last_used is None
    assert connect(replicas, key.key, secret, "lu-1") == ALLOW
    wait_until(lambda: replicas.store(lambda ks: ks.get_key(key.key)).last_used is not None,
               what="lastUsed written", poll=0.1)
