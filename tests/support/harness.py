"""A real keybroker daemon for tests: BrokerServer on 127.0.0.1 port 0, a real SQLite file,
run on its own event loop in a thread so that real (blocking) paho-mqtt clients can talk
to it from the test. ``Client`` wraps paho with the few waits the tests need."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker.core.settings import Listener, Settings, load_settings
from broker.daemon.server import BrokerServer
from keystore import KeyStore
from tests.support.waiting import wait_until

T = TypeVar("T")
TIMEOUT = 5.0

# paho's v2 callbacks report MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes; an MQTT 5
# refusal of a rule (0x87) or of credentials (0x86) is said the same way.
_V5_TO_V311 = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}


class RunningBroker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server = BrokerServer(settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> RunningBroker:
        self._thread.start()
        self.call(self.server.start)
        return self

    def call(self, fn: Callable[[], Awaitable[T]], timeout: float = 20) -> T:
        """Run an async callable on the broker's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(_await(fn), self.loop).result(timeout)

    def ks(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call a KeyStore method on the daemon's own keystore."""
        keystore = self.server.keystore
        assert keystore is not None
        return self.call(lambda: getattr(keystore, method)(*args, **kwargs))

    @property
    def broker(self) -> Any:
        return self.server.broker

    def port(self, listener: str = "tcp") -> int:
        return self.server.port(listener)

    def api_url(self) -> str:
        """Where the daemon's HTTP listener (API, console, metrics) is served."""
        api = self.server.api
        assert api is not None
        return api.url

    def stop(self) -> None:
        """Stop the daemon (once: a test may stop it itself before teardown does)."""
        if self.loop.is_closed():
            return
        try:
            self.call(self.server.stop, timeout=30)
            self.call(_cancel_leftover_tasks)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def audit_events(self) -> list[dict[str, Any]]:
        path = self.settings.audit_path
        if path is None or not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def audited(self, event: str, reason: str = "") -> list[dict[str, Any]]:
        """The audit lines of ``event`` whose reason contains ``reason``."""
        return [e for e in self.audit_events()
                if e["event"] == event and reason in (e.get("reason") or "")]

    def wait_audited(self, event: str, reason: str = "",
                     timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        """``audited``, once there is at least one such line (the audit is written on the
        daemon's loop, after the packet or the tick that caused it)."""
        return wait_until(lambda: self.audited(event, reason), timeout,
                          f"audit {event!r} with reason containing {reason!r}")

    def offline(self, client_id: str) -> bool:
        """The broker keeps a session for ``client_id`` and its connection has ended."""
        session = self.broker.sessions.get(client_id)
        return session is not None and not session.online


async def _cancel_leftover_tasks() -> None:
    """amqtt leaves some per-connection waiters behind at shutdown; end them on the loop."""
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _await(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()


# The ``daemon_with`` fixture of tests/conftest.py: (settings=None, **overrides) -> daemon.
StartDaemon = Callable[..., RunningBroker]


@contextlib.contextmanager
def running_daemon(settings: Settings) -> Iterator[RunningBroker]:
    """A started daemon on ``settings``, stopped on the way out (for fixtures wider than
    one test; a test uses the ``daemon_with`` fixture of tests/conftest.py)."""
    running = RunningBroker(settings).start()
    try:
        yield running
    finally:
        running.stop()


def revocation_bound(settings: Settings) -> float:
    """How long a change (a key revoked, a device or application removed) may take to end
    a live session: docs/live-changes.md promises 2 s, eight polls of the change feed."""
    return 8 * settings.change_poll_interval


def broker_settings(tmp_path: Path, **overrides: Any) -> Settings:
    base = load_settings()
    listeners = (
        Listener(name="tcp", type="tcp", host="127.0.0.1", port=0),
        Listener(name="ws", type="ws", host="127.0.0.1", port=0),
    )
    settings = replace(
        base,
        db_path=tmp_path / "keybroker.db",
        listeners=listeners,
        audit_path=tmp_path / "audit.jsonl",
        api_host="127.0.0.1",
        api_port=0,
    )
    return replace(settings, **overrides)


def seed(path: Path, coro_fn: Callable[[KeyStore], Awaitable[T]]) -> T:
    """Prepare a keystore file before a daemon opens it (another process in real life)."""

    async def run() -> T:
        async with KeyStore.open(path) as ks:
            return await coro_fn(ks)

    return asyncio.run(run())


class Client:
    """A real paho-mqtt client with blocking helpers: MQTT 3.1.1, or MQTT 5 when
    ``protocol`` (else the class's ``protocol``) is 5. Its answers are said the same way
    in both (CONNACK and SUBACK codes in their 3.1.1 form), so one test runs under either
    (``each_protocol`` in tests/daemon/conftest.py); tests/support/mqtt5.py keeps what MQTT 5
    says beyond that."""

    protocol = 4  # of the clients that do not name theirs (each_protocol switches it)

    def __init__(
        self,
        port: int,
        client_id: str,
        key: str | None = None,
        secret: str | None = None,
        *,
        clean_session: bool = True,
        transport: str = "tcp",
        headers: dict[str, str] | None = None,
        protocol: int | None = None,
    ) -> None:
        self.port = port
        self.version = protocol or self.protocol
        v5 = self.version == 5
        # MQTT 5 has no clean session flag: Clean Start at CONNECT, and a persistent
        # session is one with a Session Expiry Interval (the broker's maximum, like 3.1.1).
        self.clean_session = clean_session
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else clean_session,
            transport=transport,  # type: ignore[arg-type]
            # Never reconnects inside a test; and its thread ends with the connection
            # (a refused CONNECT is not followed by a second of paho's reconnect wait).
            reconnect_on_failure=False,
        )
        if transport == "websockets":
            self.client.ws_set_options(path="/", headers=headers)
        if key is not None:
            self.client.username_pw_set(key, secret)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._connack: queue.Queue[int] = queue.Queue()
        self._subacks: queue.Queue[list[int]] = queue.Queue()
        self.disconnected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = lambda *_a: self.disconnected.set()

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        self._connack.put(_V5_TO_V311.get(reason.value, reason.value))

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
        self._subacks.put([0x80 if code.is_failure else code.value for code in codes])

    def will(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> Client:
        self.client.will_set(topic, payload, qos, retain)
        return self

    def connect(self, keepalive: int = 30, bind_address: str = "",
                properties: Properties | None = None) -> int:
        """Connect and return the CONNACK code (0 accepted, 4 bad credentials, 5 refused);
        ``bind_address``: the local address to connect from (e.g. another 127.x);
        ``properties``: MQTT 5 CONNECT properties."""
        if self.version == 5 and not self.clean_session:
            properties = properties or Properties(PacketTypes.CONNECT)
            if not hasattr(properties, "SessionExpiryInterval"):
                properties.SessionExpiryInterval = 0xFFFFFFFF  # the broker's maximum
        # connect_async + loop_start: paho's connect() makes a wake-up socketpair that
        # loop_start() then replaces without closing (a ResourceWarning at GC time).
        self.client.connect_async("127.0.0.1", self.port, keepalive=keepalive,
                                  bind_address=bind_address,
                                  clean_start=self.clean_session if self.version == 5
                                  else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                                  properties=properties)
        self.client.loop_start()
        try:
            return self._connack.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError("no CONNACK received") from None

    def subscribe(self, topic_filter: str, qos: int = 0) -> int:
        self.client.subscribe(topic_filter, qos)
        return self._subacks.get(timeout=TIMEOUT)[0]

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            info.wait_for_publish(TIMEOUT)

    def get(self, timeout: float = TIMEOUT) -> mqtt.MQTTMessage | None:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def topics_received(self, wait: float = 0.5) -> list[str]:
        out = []
        while (msg := self.get(wait)) is not None:
            out.append(msg.topic)
        return out

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
