"""Every amqtt hook KeyBroker overrides or relies on: present with the signature and the
behaviour we need (so an amqtt upgrade fails here first)."""

from __future__ import annotations

import asyncio
import inspect
import struct
from importlib.metadata import version

import pytest
from amqtt.adapters import BufferReader
from amqtt.broker import Broker, Server
from amqtt.mqtt.connect import ConnectPacket

from broker.mqtt.broker import KeyBroker
from tests.support import mqtt_raw as raw
from tests.support.harness import RunningBroker

# amqtt Broker method -> its parameters (after self). KeyBroker overrides each of these;
# amqtt's own code calls them (start/shutdown, the plugin context), so a changed name or
# signature in an amqtt upgrade must fail here first.
BROKER_HOOKS = {
    "start": [],
    "shutdown": [],
    "_start_listeners": [],
    "_cleanup_session": ["client_id"],
    "_client_connected": ["listener_name", "reader", "writer"],
    "_authenticate": ["session", "_"],
    "_session_monitor": [],
    "_broadcast_message": ["session", "topic", "data", "force_qos"],
    "_run_broadcast": ["running_tasks"],
    "retain_message": ["source_session", "topic_name", "data", "qos"],
    "add_subscription": ["subscription", "session"],
}


def test_amqtt_is_the_pinned_version() -> None:
    assert version("amqtt") == "0.12.1"


@pytest.mark.parametrize(("name", "params"), sorted(BROKER_HOOKS.items()))
def test_overridden_amqtt_hook_keeps_its_signature(name: str, params: list[str]) -> None:
    assert name in KeyBroker.__dict__  # ours, not amqtt's
    original = getattr(Broker, name)
    assert list(inspect.signature(original).parameters)[1:] == params
    ours = inspect.signature(getattr(KeyBroker, name)).parameters
    assert list(ours)[1 : len(params) + 1] == params


def test_amqtt_calls_the_hooks_we_override() -> None:
    """Our overrides only matter if amqtt's life cycle still calls them."""
    start = inspect.getsource(Broker.start)
    assert "self._start_listeners()" in start and "self._session_monitor()" in start
    assert "self._broadcast_loop()" in start
    assert "self._run_broadcast(" in inspect.getsource(Broker._broadcast_loop)
    assert "self._cleanup_session(client_id)" in inspect.getsource(Broker.shutdown)
    # start() empties _sessions (the registry's dict): KeyBroker.start puts restored
    # persistent sessions back afterwards.
    assert "self._sessions.clear()" in inspect.getsource(Broker.start)


def test_amqtt_parses_connect_as_keybroker_reads_it() -> None:
    """KeyBroker parses CONNECT with amqtt's ConnectPacket over a BufferReader and reads
    these attributes."""
    body = (raw.field("MQTT") + bytes([4, 0x80 | 0x40 | 0x20 | 0x10 | 0x04])
            + struct.pack("!H", 42) + raw.field("dev-a") + raw.field("will/t")
            + raw.field(b"bye") + raw.field("key") + raw.field("secret"))
    packet = asyncio.run(ConnectPacket.from_stream(BufferReader(raw.packet(0x10, body))))
    assert packet.proto_name == "MQTT" and packet.proto_level == 4
    assert packet.variable_header is not None and packet.payload is not None
    assert packet.variable_header.will_flag and not packet.variable_header.reserved_flag
    assert (packet.client_id, packet.username, packet.password) == ("dev-a", "key", "secret")
    assert packet.username_flag and packet.password_flag and not packet.clean_session_flag
    assert (packet.will_topic, bytes(packet.will_message), packet.will_qos,
            packet.will_retain_flag) == ("will/t", b"bye", 2, True)
    assert packet.keep_alive == 42 and not packet.payload.client_id_is_random
    empty = raw.field("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 0) + raw.field("")
    anonymous = asyncio.run(ConnectPacket.from_stream(BufferReader(raw.packet(0x10, empty))))
    assert anonymous.payload is not None and anonymous.payload.client_id_is_random


def test_amqtt_server_wrapper_keeps_the_instance() -> None:
    assert list(inspect.signature(Server).parameters) == [
        "listener_name", "server_instance", "max_connections"]
    assert "self.instance = server_instance" in inspect.getsource(Server.__init__)


def test_amqtt_external_listener_path_is_refused(broker: RunningBroker) -> None:
    from amqtt.adapters import BufferWriter

    class Recorder(BufferWriter):
        closed = False

        async def close(self) -> None:
            self.closed = True

    writer = Recorder()
    broker.call(lambda: broker.broker.external_connected(
        BufferReader(raw.connect("dev-a", "k", "s")), writer, "tcp"))
    assert writer.closed and writer.get_buffer() == b""  # closed, no CONNACK
    assert not broker.broker.sessions


def test_the_auth_plugin_is_called_directly_when_it_is_the_only_one(broker: RunningBroker) -> None:
    from broker.mqtt.plugins import AccessKeyAuthPlugin

    assert isinstance(broker.broker._auth, AccessKeyAuthPlugin)
    assert broker.broker._auth in broker.broker.plugins_manager.plugins


def test_broker_state_attributes_exist(broker: RunningBroker) -> None:
    kb = broker.broker
    assert isinstance(kb._sessions, dict) and isinstance(kb._servers, dict)
    assert set(kb._servers) == {"tcp", "ws"}
    assert kb.bound_addresses()["tcp"][0][1] == broker.port("tcp") > 0
