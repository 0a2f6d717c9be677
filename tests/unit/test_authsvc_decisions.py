"""The service's own pure rules (broker.authsvc.decisions, docs/cluster.md): RabbitMQ's
topic form, a key's lists as RabbitMQ routes them, resources, a connection's validity."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from broker.authsvc.decisions import (
    amqp_key,
    amqp_policy,
    app_of_vhost,
    check_client_id,
    check_connection,
    check_resource,
    mqtt_form,
    policy_digest,
)
from broker.policy import check_publish, check_subscribe_within
from keystore.backend import ConnectionRow
from keystore.models import AddressMode, ConnectionSnapshot, KeyStatus, TopicMode
from tests.unit.test_policy import NOW, make_key


@pytest.mark.parametrize(("routing_key", "mqtt"), [
    ("losant.d1.state", "losant/d1/state"),
    ("losant.*.state", "losant/+/state"),
    ("a.#", "a/#"),
    ("#", "#"),
    (".a", "/a"),  # a leading "/" is an empty first level in both forms
    ("a..b", "a//b"),
    ("a*b.c", "a*b/c"),  # '*' inside a word is a literal in both forms
])
def test_routing_keys_read_as_mqtt(routing_key: str, mqtt: str) -> None:
    assert mqtt_form(routing_key) == mqtt


def test_dotted_list_filters_are_refused_or_split_never_widened() -> None:
    only = make_key(topic_mode=TopicMode.ONLY, pub_topics=("a.b/c", "x/y"),
                    sub_topics=("s.t/#",))
    assert (amqp_key(only).pub_topics, amqp_key(only).sub_topics) == (("x/y",), ())
    excepted = make_key(topic_mode=TopicMode.EXCEPT, pub_topics=("a.b/c",),
                        sub_topics=("s.t/#",))
    assert amqp_key(excepted).pub_topics == ("a/b/c",)
    policy = amqp_policy(excepted, frozenset({"d1"}), "losant")
    assert not check_publish(policy, mqtt_form("a.b.c")).allowed
    assert not check_subscribe_within(policy, mqtt_form("s.#")).allowed
    assert check_subscribe_within(policy, mqtt_form("s.u.#")).allowed
    unrestricted = make_key(topic_mode=TopicMode.ALL)
    assert amqp_key(unrestricted) is unrestricted


def test_a_device_id_with_a_dot_is_refused_for_rabbitmq() -> None:
    assert not check_client_id("dev.1").allowed and check_client_id("dev-1").allowed


def test_vhosts_name_applications() -> None:
    assert app_of_vhost("/") == "default" and app_of_vhost("plant-2") == "plant-2"


@pytest.mark.parametrize(("resource", "name", "permission", "allowed"), [
    ("queue", "mqtt-subscription-d1qos0", "configure", True),
    ("queue", "mqtt-subscription-d1qos1", "write", True),
    ("queue", "mqtt-subscription-d1qos2", "read", False),
    ("queue", "mqtt-subscription-d2qos1", "read", False),
    ("queue", "mqtt-subscription-d1qos1x", "read", False),
    ("exchange", "amq.topic", "write", True),
    ("exchange", "amq.topic", "configure", False),
    ("exchange", "amq.direct", "read", False),
    ("topic", "amq.topic", "write", False),
])
def test_resources(resource: str, name: str, permission: str, allowed: bool) -> None:
    assert check_resource(resource, name, permission, "d1", "amq.topic").allowed is allowed


def row(**key_changes: object) -> ConnectionRow:
    key = make_key(app_id="app1", **key_changes)
    snapshot = ConnectionSnapshot("d1", key.key, None, policy_digest(key), "10.0.0.1", NOW)
    return ConnectionRow(snapshot, key, "app1")


def test_a_connection_is_valid_while_its_key_device_and_address_are() -> None:
    good = row()
    assert check_connection(good, good.key.key, NOW).allowed
    assert check_connection(None, good.key.key, NOW).reason == "no_session"
    assert check_connection(good, "other", NOW).reason == "no_session"
    assert check_connection(row(status=KeyStatus.INACTIVE), good.key.key, NOW).reason == \
        "inactive"
    assert check_connection(row(expires_at=NOW), good.key.key, NOW).reason == "expired"
    assert check_connection(row(expires_at=NOW + timedelta(seconds=1)), good.key.key,
                            NOW).allowed
    assert check_connection(replace(good, device_app=None), good.key.key, NOW).reason == \
        "device_deleted"
    moved = row(address_mode=AddressMode.ONLY, addresses=("10.0.0.2/32",))
    assert check_connection(moved, good.key.key, NOW).reason == "ip_denied"


def test_the_policy_digest_follows_the_topic_settings_only() -> None:
    key = make_key()
    assert policy_digest(key) == policy_digest(replace(key, name="renamed",
                                                       updated_at=datetime.now(UTC)))
    assert policy_digest(key) != policy_digest(replace(key, sub_topics=("other/#",)))
    assert policy_digest(key) != policy_digest(replace(key, topic_mode=TopicMode.ALL))
