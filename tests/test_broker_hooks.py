"""Every amqtt private hook KeyBroker relies on: present with the signature we override or
call (so an amqtt upgrade fails here first), and behaving as we need on a real daemon."""

from __future__ import annotations

import inspect
import time
from importlib.metadata import version

import pytest
from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import ProtocolHandler

from broker.amqtt_broker import KeyBroker, KeyProtocolHandler
from tests.broker_harness import Client, RunningBroker

# name -> parameters (after self) that KeyBroker's override or call expects
BROKER_HOOKS = {
    "_start_listeners": [],
    "ws_connected": ["websocket", "listener_name"],
    "stream_connected": ["reader", "writer", "listener_name"],
    "_client_connected": ["listener_name", "reader", "writer"],
    "_handle_client_session": ["reader", "writer", "client_session", "handler", "server",
                               "listener_name"],
    "_authenticate": ["session", "_"],
    "_session_monitor": [],
    "_client_message_loop": ["client_session", "handler"],
    "_handle_disconnect": ["client_session", "handler", "disconnect_waiter"],
    "_handle_subscription": ["client_session", "handler", "subscribe_waiter"],
    "_handle_unsubscription": ["client_session", "handler", "unsubscribe_waiter"],
    "_handle_message_delivery": ["client_session", "handler", "wait_deliver"],
    "_broadcast_message": ["session", "topic", "data", "force_qos"],
    "_broadcast_loop": [],
    "_run_broadcast": ["running_tasks"],
    "_retain_broadcast_message": ["broadcast", "qos", "target_session"],
    "add_subscription": ["subscription", "session"],
    "_del_subscription": ["a_filter", "session"],
    "_del_all_subscriptions": ["session"],
    "retain_message": ["source_session", "topic_name", "data", "qos"],
    "_publish_retained_messages_for_subscription": ["subscription", "session"],
    "_publish_session_retained_messages": ["session"],
    "_get_handler": ["session"],
    "_stop_handler": ["handler"],
}


def test_amqtt_is_the_pinned_version() -> None:
    assert version("amqtt") == "0.12.1"


@pytest.mark.parametrize(("name", "params"), sorted(BROKER_HOOKS.items()))
def test_amqtt_hook_has_the_expected_signature(name: str, params: list[str]) -> None:
    original = getattr(Broker, name)
    assert list(inspect.signature(original).parameters)[1:] == params
    # KeyBroker's own definition keeps amqtt's positional shape (callers inside amqtt).
    ours = inspect.signature(getattr(KeyBroker, name)).parameters
    assert list(ours)[1 : len(params) + 1] == params


def test_handler_hooks_exist() -> None:
    assert inspect.signature(BrokerProtocolHandler.init_from_connect).parameters.keys() >= {
        "reader", "writer", "plugins_manager"}
    assert "handle_read_timeout" in ProtocolHandler.__dict__
    assert "handle_connection_closed" in BrokerProtocolHandler.__dict__
    assert KeyProtocolHandler.handle_read_timeout is not BrokerProtocolHandler.handle_read_timeout
    source = inspect.getsource(ProtocolHandler._reader_loop)
    # Our keep-alive enforcement relies on the reader loop timing out on session.keep_alive
    # and calling handle_read_timeout.
    assert "timeout=keepalive_timeout" in source and "self.handle_read_timeout()" in source


def test_stream_writer_adapter_keeps_the_asyncio_writer() -> None:
    from amqtt.adapters import StreamWriterAdapter

    assert "self._writer = writer" in inspect.getsource(StreamWriterAdapter.__init__)


def test_the_auth_plugin_is_called_directly_when_it_is_the_only_one(broker: RunningBroker) -> None:
    from broker.plugins import AccessKeyAuthPlugin

    assert isinstance(broker.broker._auth, AccessKeyAuthPlugin)
    assert broker.broker._auth in broker.broker.plugins_manager.plugins


def test_broker_state_attributes_exist(broker: RunningBroker) -> None:
    kb = broker.broker
    assert isinstance(kb._sessions, dict) and isinstance(kb._servers, dict)
    assert set(kb._servers) == {"tcp", "ws"}
    assert kb.bound_addresses()["tcp"][0][1] == broker.port("tcp") > 0


def _device_client(broker: RunningBroker, device: str, **options: object) -> Client:
    key, secret = broker.ks("create_key", device_ids=[device], **options)
    return Client(broker.port(), device, key.key, secret)


def test_unsubscribe_and_disconnect_leave_no_stale_trie_entries(broker: RunningBroker) -> None:
    broker.ks("add_device", "dev-a")
    tree = broker.broker._subtree
    with _device_client(broker, "dev-a") as client:
        assert client.connect() == 0
        assert client.subscribe("losant/dev-a/command") == 0
        assert client.subscribe("losant/dev-a/#") == 0
        assert len(tree) == 2
        client.client.unsubscribe("losant/dev-a/command")
        time.sleep(0.3)
        assert len(tree) == 1
        assert list(broker.broker.subscriptions) == ["losant/dev-a/#"]
    time.sleep(0.5)
    assert len(tree) == 0
    assert "dev-a" not in broker.broker.sessions


def test_persistent_session_gets_offline_qos1_messages_on_resume(broker: RunningBroker) -> None:
    broker.ks("add_device", "dev-a")
    broker.ks("add_device", "dev-b")
    key, secret = broker.ks("create_key", device_ids=["dev-a", "dev-b"])
    with Client(broker.port(), "dev-a", key.key, secret, clean_session=False) as device:
        assert device.connect() == 0
        assert device.subscribe("losant/dev-a/command", 1) == 1
    time.sleep(0.3)
    with Client(broker.port(), "dev-b", key.key, secret) as sender:
        assert sender.connect() == 0
        sender.publish("losant/dev-a/command", b"while-offline", qos=1)
    time.sleep(0.3)
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
    with Client(broker.port(), "dev-a", wide.key, wide_secret, clean_session=False) as device:
        assert device.connect() == 0
        assert device.subscribe("losant/dev-b/state", 1) == 1
    time.sleep(0.3)
    with Client(broker.port(), "dev-b", wide.key, wide_secret) as sender:
        assert sender.connect() == 0
        sender.publish("losant/dev-b/state", b"for-wide-only", qos=1)
    time.sleep(0.3)
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
