"""Bad input costs only the offending connection (docs/limits.md): each case gets the protocol's
answer or a close, is audited where it is a violation, and a well-behaved client on the
same daemon keeps working. PROXY protocol from trusted proxies only."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest

from broker.core.clientip import PROXY_V2_SIGNATURE
from broker.core.settings import Listener
from tests.support import mqtt_raw as raw
from tests.support.harness import Client, RunningBroker, StartDaemon
from tests.support.waiting import wait_until

LIMITS = {
    "connect_timeout": 1.0,
    "packet_timeout": 1.0,
    "max_packet_size": 4096,
    "max_connections": 40,
    "max_subscriptions": 5,
    "max_queued_messages": 50,
    "max_session_bytes": 64 * 1024,
    "slow_consumer_timeout": 1.0,
    "max_topic_length": 200,
    "max_topic_levels": 8,
    "max_retained_messages": 3,
    "device_retained_reserve": 0,  # every retained message counts against the global cap
    "max_unauthenticated_per_source": 0,  # the flood below is about the global limit
}


# The packet watchdog's sweep (broker.mqtt.framing.PacketWatchdog): a timeout is noticed
# up to this much after it has passed.
SWEEP = 1.0


@pytest.fixture
def daemon(daemon_with: StartDaemon) -> RunningBroker:
    running = daemon_with(**LIMITS)
    running.ks("add_device", "good")
    running.ks("add_device", "bad")
    return running


def credentials(daemon: RunningBroker, device: str, **options: object) -> tuple[str, str]:
    key, secret = daemon.ks("create_key", device_ids=[device], **options)
    return key.key, secret


@pytest.fixture
def good(daemon: RunningBroker) -> Iterator[Client]:
    """A well-behaved client that must keep working through every attack."""
    key, secret = credentials(daemon, "good")
    with Client(daemon.port(), "good", key, secret) as client:
        assert client.connect() == 0
        assert client.subscribe("losant/good/command") == 0
        yield client


def still_works(client: Client) -> None:
    client.publish("losant/good/command", b"ping")
    msg = client.get()
    assert msg is not None and msg.payload == b"ping"
    assert not client.disconnected.is_set()


def authed_socket(daemon: RunningBroker) -> socket.socket:
    key, secret = credentials(daemon, "bad")
    sock = raw.open_socket(daemon.port())
    sock.sendall(raw.connect("bad", key, secret))
    assert sock.recv(4) == bytes([0x20, 2, 0, 0])
    return sock


# --- before CONNECT ---------------------------------------------------------------------

@pytest.mark.parametrize(
    "first_bytes",
    [
        pytest.param(raw.publish("a/b"), id="publish-before-connect"),
        pytest.param(raw.subscribe("a/b"), id="subscribe-before-connect"),
        pytest.param(b"\xf0\x00", id="reserved-packet-type"),
        pytest.param(b"\x10\xff\xff\xff\xff\x7f", id="remaining-length-5-bytes"),
        pytest.param(raw.packet(0x10, b"\x00\x04MQTT\x04\x02\x00\x1e\x00\x02\xff\xfe"),
                     id="client-id-invalid-utf8"),
        pytest.param(raw.packet(0x10, b"\x00\x04MQTX\x04\x02\x00\x1e\x00\x01a"),
                     id="wrong-protocol-name"),
        pytest.param(raw.connect("bad", "k")[:-3], id="truncated-connect"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http-on-mqtt-port"),
    ],
)
def test_malformed_first_packet_closes_only_that_connection(
    daemon: RunningBroker, good: Client, first_bytes: bytes
) -> None:
    with raw.open_socket(daemon.port()) as sock:
        sock.sendall(first_bytes)
        assert raw.closed_by_peer(sock, within=5)
    still_works(good)
    assert "bad" not in daemon.broker.sessions


def test_silent_socket_is_closed_after_connect_timeout(daemon: RunningBroker, good: Client) -> None:
    with raw.open_socket(daemon.port()) as sock:
        # Generous: twice the timeout plus the sweep that notices it (not a speed).
        assert raw.closed_by_peer(sock, within=2 * (LIMITS["connect_timeout"] + SWEEP))
    still_works(good)


def test_slowloris_connect_is_closed(daemon: RunningBroker, good: Client) -> None:
    key, secret = credentials(daemon, "bad")
    data = raw.connect("bad", key, secret)
    with raw.open_socket(daemon.port()) as sock:
        sock.sendall(data[:5])  # first bytes, then a byte every 0.4 s: never completes in time
        closed = False
        for byte in data[5:15]:
            time.sleep(0.4)  # time under test: the attack is the pace, past packet_timeout
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
        assert closed or raw.closed_by_peer(sock, within=3)
    still_works(good)


def test_half_open_after_connect_is_dropped_by_keepalive(daemon: RunningBroker) -> None:
    key, secret = credentials(daemon, "bad")
    with raw.open_socket(daemon.port()) as sock:
        sock.sendall(raw.connect("bad", key, secret, keepalive=1))
        assert sock.recv(4) == bytes([0x20, 2, 0, 0])
        assert raw.closed_by_peer(sock, within=6)


# --- after CONNECT ----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("packet", "audit_reason"),
    [
        pytest.param(raw.publish("losant/bad/" + "x" * 5000), "packet_too_large", id="oversize"),
        pytest.param(raw.publish("losant/bad/a+b"), "invalid_topic", id="wildcard-in-publish"),
        pytest.param(raw.publish("losant/bad/#"), "invalid_topic", id="hash-in-publish"),
        pytest.param(raw.publish(b"losant/bad/\x00x"), "NUL", id="nul-in-topic"),
        pytest.param(raw.subscribe(b"losant/bad/\xc3"), "bad string", id="invalid-utf8-filter"),
        pytest.param(raw.publish("losant/bad/" + "/".join("l" * 10)), "levels",
                     id="too-many-levels"),
        pytest.param(raw.publish("losant/bad/" + "y" * 300), "bytes", id="topic-too-long"),
        pytest.param(raw.publish(b"losant/bad/\xff"), "bad string", id="invalid-utf8-topic"),
        pytest.param(raw.publish(b"losant/bad/\xed\xa0\x80"), "bad string", id="surrogate"),
        pytest.param(raw.connect("bad", "k", "s"), None, id="second-connect"),
        pytest.param(raw.subscribe("losant/bad/command", qos=3), "requested QoS",
                     id="subscribe-qos-3"),
        pytest.param(b"\xf0\x00", None, id="reserved-type"),
        pytest.param(b"\x30\x80\x80\x80\x80\x01", "malformed_length", id="5-byte-length"),
    ],
)
def test_bad_packet_after_connect_closes_only_that_connection(
    daemon: RunningBroker, good: Client, packet: bytes, audit_reason: str | None
) -> None:
    with authed_socket(daemon) as sock:
        sock.sendall(packet)
        assert raw.closed_by_peer(sock, within=5)
    still_works(good)
    if audit_reason is not None:
        wait_until(lambda: daemon.audited("bad_packet", audit_reason) or daemon.audited(
            "publish_denied", audit_reason))


def test_stalled_packet_after_connect_is_closed(daemon: RunningBroker, good: Client) -> None:
    with authed_socket(daemon) as sock:
        sock.sendall(raw.publish("losant/bad/state", b"x" * 100)[:20])  # never finished
        assert raw.closed_by_peer(sock, within=5)
    daemon.wait_audited("bad_packet", "slow_packet")
    still_works(good)


def test_subscription_limit(daemon: RunningBroker, good: Client) -> None:
    key, secret = credentials(daemon, "bad", topic_mode="all")
    with Client(daemon.port(), "bad", key, secret) as client:
        assert client.connect() == 0
        granted = [client.subscribe(f"custom/{i}") for i in range(LIMITS["max_subscriptions"])]
        assert granted == [0] * LIMITS["max_subscriptions"]
        assert client.subscribe("custom/one-too-many") == 0x80
        assert client.subscribe("custom/0", 1) == 1  # re-subscribing an existing filter is fine
    daemon.wait_audited("subscribe_denied", "max_subscriptions")
    still_works(good)


def test_connection_limit(daemon: RunningBroker, good: Client) -> None:
    flood = []
    try:
        for _ in range(LIMITS["max_connections"] + 10):
            flood.append(raw.open_socket(daemon.port()))
        # The daemon has taken in the flood: those past the limit are already refused.
        daemon.wait_audited("connect_invalid", "max_connections")
        extra = raw.open_socket(daemon.port())
        with extra:
            assert raw.closed_by_peer(extra, within=3)
    finally:
        for sock in flood:
            sock.close()
    # The flood's sockets are gone (the good client's is the one left): new clients get in.
    wait_until(lambda: len(daemon.broker.admission.connections) == 1)
    key, secret = credentials(daemon, "bad")
    with Client(daemon.port(), "bad", key, secret) as client:
        assert client.connect() == 0
    still_works(good)


def test_slow_consumer_is_disconnected_and_publisher_unaffected(
    daemon: RunningBroker, good: Client
) -> None:
    daemon.ks("add_device", "pub")
    consumer_key, consumer_secret = credentials(daemon, "bad", topic_mode="all")
    publisher_key, publisher_secret = credentials(daemon, "pub", topic_mode="all")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", daemon.port()))
    with sock:
        sock.sendall(raw.connect("bad", consumer_key, consumer_secret, keepalive=0))
        assert sock.recv(4) == bytes([0x20, 2, 0, 0])
        sock.sendall(raw.subscribe("custom/firehose"))
        assert sock.recv(5) == bytes([0x90, 3, 0, 1, 0])  # granted
        # The consumer now stops reading while a publisher floods a topic it reads.
        with Client(daemon.port(), "pub", publisher_key, publisher_secret) as publisher:
            assert publisher.connect() == 0
            for _ in range(2000):
                publisher.publish("custom/firehose", b"z" * 3000)
                if daemon.broker.registry.kicks.get("slow_consumer"):
                    break
            daemon.wait_audited("kick", "slow_consumer",
                                timeout=5 * (LIMITS["slow_consumer_timeout"] + SWEEP))
            assert not publisher.disconnected.is_set()
    still_works(good)


# --- PROXY protocol ---------------------------------------------------------------------

def proxy_daemon(daemon_with: StartDaemon, trusted: tuple[str, ...]) -> RunningBroker:
    listener = Listener(name="tcp", type="tcp", host="127.0.0.1", port=0, proxy_protocol=True)
    daemon = daemon_with(listeners=(listener,), trusted_proxies=trusted, **LIMITS)
    daemon.ks("add_device", "dev-a")
    return daemon


def v2_header(src: str, dst: str = "127.0.0.1") -> bytes:
    addresses = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", 40000, 1883)
    return PROXY_V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


@pytest.mark.parametrize(
    "header",
    [b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 1883\r\n", v2_header("203.0.113.9")],
    ids=["v1", "v2"],
)
def test_proxy_header_from_trusted_proxy_sets_the_client_ip(daemon_with: StartDaemon,
                                                            header: bytes) -> None:
    daemon = proxy_daemon(daemon_with, ("127.0.0.0/8",))
    allowed, secret = daemon.ks("create_key", device_ids=["dev-a"], address_mode="only",
                                addresses=["203.0.113.0/24"])
    with raw.open_socket(daemon.port()) as sock:
        sock.sendall(header + raw.connect("dev-a", allowed.key, secret))
        assert sock.recv(4) == bytes([0x20, 2, 0, 0])
    denied, secret2 = daemon.ks("create_key", device_ids=["dev-a"], address_mode="except",
                                addresses=["203.0.113.9"])
    with raw.open_socket(daemon.port()) as sock:
        sock.sendall(header + raw.connect("dev-a", denied.key, secret2))
        assert sock.recv(4) == bytes([0x20, 2, 0, 5])
    ok = daemon.audited("connect_ok")
    assert ok[0]["client_ip"] == "203.0.113.9" and ok[0]["peer_ip"] == "127.0.0.1"


def test_proxy_header_from_untrusted_peer_is_refused(daemon_with: StartDaemon) -> None:
    daemon = proxy_daemon(daemon_with, ("10.0.0.0/8",))
    key, secret = daemon.ks("create_key", device_ids=["dev-a"], address_mode="only",
                            addresses=["203.0.113.0/24"])
    header = b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 1883\r\n"
    with raw.open_socket(daemon.port()) as sock:
        sock.sendall(header + raw.connect("dev-a", key.key, secret))
        assert raw.closed_by_peer(sock, within=3)
    daemon.wait_audited("connect_invalid", "proxy_header_from_untrusted_peer")
    # Without a header an untrusted peer is an ordinary client with its own address.
    plain, plain_secret = daemon.ks("create_key", device_ids=["dev-a"])
    with Client(daemon.port(), "dev-a", plain.key, plain_secret) as client:
        assert client.connect() == 0


def test_trusted_proxy_must_send_a_header_and_garbage_is_refused(
        daemon_with: StartDaemon) -> None:
    daemon = proxy_daemon(daemon_with, ("127.0.0.0/8",))
    key, secret = daemon.ks("create_key", device_ids=["dev-a"])
    with raw.open_socket(daemon.port()) as sock:
        sock.sendall(raw.connect("dev-a", key.key, secret))
        assert raw.closed_by_peer(sock, within=3)
    with raw.open_socket(daemon.port()) as sock:
        sock.sendall(b"PROXY TCP4 999.1.1.1 127.0.0.1 1 2\r\n")
        assert raw.closed_by_peer(sock, within=3)
    daemon.wait_audited("connect_invalid", "proxy_header_missing")
    daemon.wait_audited("connect_invalid", "bad_proxy_header")


def test_denied_publish_flood_is_audited_within_a_budget(daemon: RunningBroker) -> None:
    with authed_socket(daemon) as sock:
        sock.sendall(raw.publish("losant/good/state") * 500)  # another device's topic
        daemon.wait_audited("publish_denied")
        time.sleep(1.2)  # time under test: past the throttle's 1 s window
        sock.sendall(raw.publish("losant/good/state"))  # rolls the window over
        daemon.wait_audited("audit_suppressed", "denials not logged")
    events = daemon.audit_events()
    denied = [e for e in events if e["event"] == "publish_denied"]
    assert 1 <= len(denied) <= 25  # not 500 lines
    assert any(e["event"] == "audit_suppressed" and "denials not logged" in e["reason"]
               for e in events)


def test_retained_messages_are_capped(daemon: RunningBroker, good: Client) -> None:
    for i in range(5):
        good.publish(f"losant/good/r{i}", b"keep", qos=1, retain=True)
    good.publish("losant/good/r0", b"update", qos=1, retain=True)  # existing topic: fine
    # Each PUBACK came after its message was retained (or refused): nothing is pending.
    assert len(daemon.broker.router.retained) == LIMITS["max_retained_messages"]
    ((_, kept),) = daemon.broker.router.retained.store.matching("+/losant/good/r0")
    assert kept.payload == b"update"
    assert daemon.audited("retain_refused", "max_retained_messages")


@pytest.mark.parametrize("first_packet", [raw.publish("losant/bad/state"), b"\xc0\x00"],
                         ids=["publish", "pingreq"])
def test_a_packet_before_connect_closes_at_once(broker: RunningBroker,
                                                first_packet: bytes) -> None:
    """Not after the CONNECT timeout (10 s by default): the first packet must be CONNECT
    (MQTT-3.1.0-1), so anything else ends the connection when it arrives."""
    with raw.open_socket(broker.port()) as sock:
        sock.sendall(first_packet)
        # Within half the CONNECT timeout, so it cannot have been that timeout.
        assert raw.closed_by_peer(sock, within=broker.settings.connect_timeout / 2)
    broker.wait_audited("bad_packet", "before CONNECT")


def test_denied_qos1_publish_is_not_acknowledged_when_it_disconnects(
        daemon_with: StartDaemon) -> None:
    daemon = daemon_with(denied_publish="disconnect")
    daemon.ks("add_device", "dev-a")
    key, secret = daemon.ks("create_key", device_ids=["dev-a"])
    sock, _ = raw.session(daemon.port(), "dev-a", key.key, secret)
    with sock:
        sock.sendall(raw.publish_qos("losant/other/state", b"denied", 1, 9))
        try:
            answer = raw.read_packet(sock, 3.0)
        except ConnectionError:
            answer = None  # closed without a PUBACK
        assert answer is None or answer.kind != 4, "a denied PUBLISH was acknowledged"
        assert raw.closed_by_peer(sock, within=3)


def test_listening_on_double_colon_accepts_ipv4_and_ipv6(daemon_with: StartDaemon) -> None:
    daemon = daemon_with(listeners=(Listener(name="tcp", type="tcp", host="::", port=0),))
    daemon.ks("add_device", "dev-a")
    key, secret = daemon.ks("create_key", device_ids=["dev-a"])
    port = daemon.port()
    for host, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect((host, port))
            sock.sendall(raw.connect("dev-a", key.key, secret))
            assert sock.recv(4) == bytes([0x20, 2, 0, 0]), host


# --- the end of a client's stream ---------------------------------------------------------

def test_a_client_that_half_closes_after_a_burst_has_every_message_delivered(
        daemon: RunningBroker) -> None:
    """200 QoS 1 PUBLISHes and the end of the client's stream in one write: the broker
    holds most of them back (the subscriber's queue is bounded at 50), and still handles
    every one, acknowledges each and only then closes."""
    daemon.ks("add_device", "sink")
    daemon.ks("add_device", "burst")
    sink_key, sink_secret = daemon.ks("create_key", device_ids=["sink", "burst"])
    key, secret = daemon.ks("create_key", device_ids=["burst"])
    with Client(daemon.port(), "sink", sink_key.key, sink_secret) as sink:
        assert sink.connect() == 0
        assert sink.subscribe("losant/burst/state", 1) == 1
        sock, _ = raw.session(daemon.port(), "burst", key.key, secret)
        with sock:
            burst = b"".join(raw.publish_qos("losant/burst/state", b"%03d" % i, 1, i + 1)
                             for i in range(200))
            sock.sendall(burst)
            sock.shutdown(socket.SHUT_WR)
            acked = []
            while True:
                try:
                    packet = raw.read_packet(sock, timeout=10)
                except ConnectionError:
                    break  # closed by the broker, after the last PUBACK
                assert packet is not None and packet.kind == 4, packet
                acked.append(packet.packet_id)
        assert acked == list(range(1, 201))
        payloads = []
        while (message := sink.get(timeout=5)) is not None:
            payloads.append(message.payload)
            if len(payloads) == 200:
                break
    assert payloads == [b"%03d" % i for i in range(200)]
