"""Sessions on a real daemon: subscriptions leave nothing behind, persistent sessions get
what was queued for them (checked against the grant they resume with), the Will."""

from __future__ import annotations

from tests.support.harness import Client, RunningBroker
from tests.support.waiting import wait_until


def _device_client(broker: RunningBroker, device: str, **options: object) -> Client:
    key, secret = broker.ks("create_key", device_ids=[device], **options)
    return Client(broker.port(), device, key.key, secret)


def test_unsubscribe_and_disconnect_leave_no_stale_trie_entries(broker: RunningBroker) -> None:
    broker.ks("add_device", "dev-a")
    tree = broker.broker.router.subtree
    with _device_client(broker, "dev-a") as client:
        assert client.connect() == 0
        assert client.subscribe("losant/dev-a/command") == 0
        assert client.subscribe("losant/dev-a/#") == 0
        assert len(tree) == 2
        client.client.unsubscribe("losant/dev-a/command")
        wait_until(lambda: len(tree) == 1)
        assert list(broker.broker.subscriptions) == ["losant/dev-a/#"]
    wait_until(lambda: "dev-a" not in broker.broker.sessions)  # its connection has ended
    assert len(tree) == 0


def queue_while_offline(broker: RunningBroker, credentials: tuple[str, str], topic: str,
                        payload: bytes) -> None:
    """dev-a holds a persistent session subscribed to ``topic`` and goes offline; dev-b
    (with the same credentials) publishes ``payload`` to it at QoS 1."""
    with Client(broker.port(), "dev-a", *credentials, clean_session=False) as device:
        assert device.connect() == 0
        assert device.subscribe(topic, 1) == 1
    wait_until(lambda: broker.offline("dev-a"))
    with Client(broker.port(), "dev-b", *credentials) as sender:
        assert sender.connect() == 0
        sender.publish(topic, payload, qos=1)  # routed before its PUBACK: queued now
    assert len(broker.broker.sessions["dev-a"].outbox) == 1


def test_persistent_session_gets_offline_qos1_messages_on_resume(broker: RunningBroker) -> None:
    broker.ks("add_device", "dev-a")
    broker.ks("add_device", "dev-b")
    key, secret = broker.ks("create_key", device_ids=["dev-a", "dev-b"])
    queue_while_offline(broker, (key.key, secret), "losant/dev-a/command", b"while-offline")
    with Client(broker.port(), "dev-a", key.key, secret, clean_session=False) as device:
        assert device.connect() == 0
        msg = device.get()
        assert msg is not None and msg.payload == b"while-offline"


def test_offline_messages_are_rechecked_against_the_new_grant(broker: RunningBroker) -> None:
    """A persistent session resumed with a narrower key gets no queued message it may no
    longer read (the queue is checked at resume, not only at enqueue)."""
    for device in ("dev-a", "dev-b"):
        broker.ks("add_device", device)
    wide, wide_secret = broker.ks("create_key", device_ids=["dev-a", "dev-b"])
    narrow, narrow_secret = broker.ks("create_key", device_ids=["dev-a"])
    queue_while_offline(broker, (wide.key, wide_secret), "losant/dev-b/state", b"for-wide-only")
    with Client(broker.port(), "dev-a", narrow.key, narrow_secret, clean_session=False) as device:
        assert device.connect() == 0
        assert device.get(0.7) is None


def test_will_is_published_on_abnormal_disconnect(broker: RunningBroker) -> None:
    broker.ks("add_device", "dev-a")
    broker.ks("add_device", "dev-w")
    wkey, wsecret = broker.ks("create_key", device_ids=["dev-a", "dev-w"])
    with Client(broker.port(), "dev-w", wkey.key, wsecret) as watcher:
        assert watcher.connect() == 0
        assert watcher.subscribe("losant/dev-a/state") == 0
        dying = _device_client(broker, "dev-a").will("losant/dev-a/state", b"offline")
        assert dying.connect() == 0
        dying.client.loop_stop()
        dying.client.socket().close()  # abnormal: no DISCONNECT packet
        msg = watcher.get()
        assert msg is not None and msg.payload == b"offline"
