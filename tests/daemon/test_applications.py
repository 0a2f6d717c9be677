"""Applications are tenants that never meet (docs/access.md#applications): each isolation
rule against a real daemon, with two applications side by side — "default" (devices a1,
a2) and "other" (device b1)."""

from __future__ import annotations

import pytest

from tests.support.harness import Client, RunningBroker, revocation_bound
from tests.support.waiting import wait_until


@pytest.fixture
def tenants(broker: RunningBroker) -> RunningBroker:
    broker.ks("create_app", "other")
    for device in ("a1", "a2"):
        broker.ks("add_device", device, tags=["site=x"])
    broker.ks("add_device", "b1", tags=["site=x"], app="other")
    return broker


def client(daemon: RunningBroker, device: str, app: str | None = None,
           **key_options: object) -> Client:
    """A connected client with a new key of the device's application."""
    key, secret = daemon.ks("create_key", app=app, **key_options)
    connected = Client(daemon.port(), device, key.key, secret)
    assert connected.connect() == 0
    return connected


def test_an_all_devices_key_covers_only_its_applications_devices(tenants: RunningBroker) -> None:
    key, secret = tenants.ks("create_key")  # every device ... of "default"
    with Client(tenants.port(), "b1", key.key, secret) as intruder:
        assert intruder.connect() == 5
    with Client(tenants.port(), "a1", key.key, secret) as own:
        assert own.connect() == 0


def test_a_tag_query_resolves_inside_its_application(tenants: RunningBroker) -> None:
    key, secret = tenants.ks("create_key", device_tags=["site=x"])
    assert tenants.ks("resolve_scope", key) == {"a1", "a2"}  # b1 has the tag too
    with Client(tenants.port(), "b1", key.key, secret) as intruder:
        assert intruder.connect() == 5


def test_a_key_cannot_name_another_applications_device(tenants: RunningBroker) -> None:
    with pytest.raises(Exception, match="unknown device id 'b1'"):
        tenants.ks("create_key", device_ids=["b1"])


def test_custom_topics_hash_and_device_topics_stay_in_their_application(
    tenants: RunningBroker,
) -> None:
    with client(tenants, "b1", app="other", topic_mode="all") as spy, \
            client(tenants, "a2", topic_mode="all") as peer, \
            client(tenants, "a1", topic_mode="all") as sender:
        assert spy.subscribe("#") == 0
        assert spy.subscribe("losant/+/state") == 0
        assert peer.subscribe("alerts/#") == 0
        sender.publish("alerts/fire", b"a-only", qos=1)
        sender.publish("losant/a1/state", b"a-device", qos=1)
        assert [m.payload for m in iter(lambda: peer.get(1.0), None)] == [b"a-only"]
        assert spy.get(0.5) is None
        # The same topics published in "other" reach "other" only.
        spy.publish("alerts/fire", b"b-only", qos=1)
        assert spy.get(1.0) is not None and peer.get(0.5) is None


def test_retained_messages_are_per_application(tenants: RunningBroker) -> None:
    with client(tenants, "a1", topic_mode="all") as owner:
        owner.publish("cfg/x", b"a-config", qos=1, retain=True)
    with client(tenants, "b1", app="other", topic_mode="all") as other:
        assert other.subscribe("cfg/#") == 0
        assert other.get(0.7) is None
        other.publish("cfg/x", b"b-config", qos=1, retain=True)
    with client(tenants, "a2", topic_mode="all") as reader:
        assert reader.subscribe("cfg/#") == 0
        message = reader.get()
        assert message is not None and message.payload == b"a-config"  # not overwritten


def test_a_will_reaches_only_its_application(tenants: RunningBroker) -> None:
    with client(tenants, "b1", app="other", topic_mode="all") as spy, \
            client(tenants, "a2", topic_mode="all") as peer:
        assert spy.subscribe("#") == 0 and peer.subscribe("status/#") == 0
        key, secret = tenants.ks("create_key", topic_mode="all")
        dying = Client(tenants.port(), "a1", key.key, secret).will("status/a1", b"gone")
        assert dying.connect() == 0
        dying.client.loop_stop()
        dying.client.socket().close()  # no DISCONNECT: the Will is published
        message = peer.get()
        assert message is not None and message.payload == b"gone"
        assert spy.get(0.5) is None


def test_deleting_an_application_disconnects_it_and_drops_its_state(
    tenants: RunningBroker,
) -> None:
    key, secret = tenants.ks("create_key", app="other", topic_mode="all")
    with Client(tenants.port(), "b1", key.key, secret, clean_session=False) as victim:
        assert victim.connect() == 0
        assert victim.subscribe("cmd/#", 1) == 1
        victim.publish("cfg/b", b"b-retained", qos=1, retain=True)
        tenants.ks("delete_apps", ["other"])
        assert victim.disconnected.wait(revocation_bound(tenants.settings))
    # The persistent session went too, once its connection ended.
    wait_until(lambda: "b1" not in tenants.broker.sessions)
    assert not list(tenants.broker.router.retained.store.matching("+/cfg/#"))
    events = tenants.audit_events()
    assert any(e["event"] == "kick" and e["client_id"] == "b1" for e in events)


def test_the_key_limit_is_per_application(tenants: RunningBroker) -> None:
    tenants.ks("create_app", "small", max_keys=1)
    tenants.ks("create_key", app="small")
    with pytest.raises(Exception, match="key limit of 1 reached"):
        tenants.ks("create_key", app="small")
    tenants.ks("create_key")  # other applications are not affected


def test_device_ids_are_unique_across_applications(tenants: RunningBroker) -> None:
    with pytest.raises(Exception, match="'b1' already exists in another application"):
        tenants.ks("add_device", "b1")


def test_audit_events_name_the_application(tenants: RunningBroker) -> None:
    other = tenants.ks("app", "other")
    with client(tenants, "b1", app="other"):
        pass
    assert any(e["app"] == other.id for e in tenants.wait_audited("connect_ok"))
