"""The service's listener itself: every answer leaves in one TCP write on a TCP_NODELAY
socket (a reply split in two waits for the peer's delayed ACK: 40 ms per request through
Nagle's algorithm), and a failing request is denied, never allowed."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from broker.authsvc.server import AuthServer
from broker.core.settings import Settings
from keystore import KeyStore
from tests.support.metrics import parse_samples


@pytest.fixture
async def server(tmp_path: Path) -> Any:
    db = tmp_path / "k.db"
    async with KeyStore.open(db):
        pass
    running = AuthServer(replace(Settings(), db_path=db, authsvc_port=0, audit_path=None))
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


async def test_each_answer_is_one_write_on_a_nodelay_socket(server: AuthServer,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    writes: list[bytes] = []
    options: list[int] = []
    real = asyncio.selector_events._SelectorSocketTransport.write  # type: ignore[attr-defined]

    def counting(transport: Any, data: bytes) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.getsockname()[1] == server.listener.port:
            writes.append(bytes(data))
            options.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        real(transport, data)

    monkeypatch.setattr(asyncio.selector_events._SelectorSocketTransport,  # type: ignore[attr-defined]
                        "write", counting)
    body = b"username=k&password=p&vhost=%2F&client_id=d"
    answer = await exchange(server.listener.port, b"POST /auth/user HTTP/1.1\r\nHost: x\r\n"
                            b"Content-Type: application/x-www-form-urlencoded\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\ndeny")
    assert len(writes) == 1 and writes[0] == answer
    assert options == [1]


async def test_a_request_that_fails_inside_is_denied(server: AuthServer,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert server.service is not None

    async def broken(*_args: object) -> object:
        raise RuntimeError("keystore unreachable")

    monkeypatch.setattr(server.service.keystore, "connect_lookup", broken)
    body = b"username=k&password=p&vhost=%2F&client_id=d"
    answer = await exchange(server.listener.port, b"POST /auth/user HTTP/1.1\r\nHost: x\r\n"
                            b"Content-Type: application/x-www-form-urlencoded\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert answer.startswith(b"HTTP/1.1 500") and answer.endswith(b"deny")
    json_body = b'{"username": "k", "password": "p", "clientid": "d", "peerhost": "1.2.3.4"}'
    answer = await exchange(server.listener.port, b"POST /emqx/authn HTTP/1.1\r\nHost: x\r\n"
                            b"Content-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(json_body) + json_body)
    # EMQX reads an error status as "ask the next source": a failure answers 200 + deny.
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"result": "deny", '
                                                                  b'"is_superuser": false}')


async def get(port: int, path: str) -> tuple[int, bytes]:
    answer = await exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close"
                            "\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_decisions_are_counted_by_engine_route_and_result(
        server: AuthServer, monkeypatch: pytest.MonkeyPatch) -> None:
    assert server.keystore is not None
    await server.keystore.add_device("d")
    key, secret = await server.keystore.create_key(device_ids=["d"])
    port = server.listener.port
    for password in (secret, "wrong", secret):
        body = f"username={key.key}&password={password}&vhost=%2F&client_id=d".encode()
        await exchange(port, b"POST /auth/user HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Type: application/x-www-form-urlencoded\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert server.service is not None

    async def broken(*_args: object) -> object:
        raise RuntimeError("keystore unreachable")

    monkeypatch.setattr(server.service.keystore, "connect_lookup", broken)
    json_body = b'{"username": "k", "password": "p", "clientid": "d", "peerhost": "1.2.3.4"}'
    await exchange(port, b"POST /emqx/authn HTTP/1.1\r\nHost: x\r\n"
                   b"Content-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(json_body) + json_body)
    status, exposition = await get(port, "/metrics")
    assert status == 200
    found = parse_samples(exposition.decode())

    def decided(engine: str, route: str, result: str) -> float:
        labels = (("engine", engine), ("result", result), ("route", route))
        return found[("keybroker_authsvc_decisions_total", labels)]

    assert decided("rabbitmq", "user", "allow") == 2
    assert decided("rabbitmq", "user", "deny") == 1
    assert decided("emqx", "authn", "error") == 1
    assert decided("rabbitmq", "topic", "allow") == 0
    assert found[("keybroker_authsvc_decision_seconds_count", ())] == 4
    assert ("keybroker_event_loop_lag_seconds_count", ()) in found
    assert ("keybroker_guard_bans_total", ()) in found
    assert key.key not in exposition.decode()  # no key, client id or topic as a label


async def test_health_and_readiness(server: AuthServer, monkeypatch: pytest.MonkeyPatch) -> None:
    port = server.listener.port
    status, body = await get(port, "/healthz")
    assert status == 200 and b'"status": "ok"' in body
    assert (await get(port, "/readyz"))[0] == 200
    assert server.keystore is not None

    async def away() -> object:
        raise ConnectionRefusedError("keystore away")

    monkeypatch.setattr(server.keystore, "change_marker", away)
    status, body = await get(port, "/readyz")
    assert status == 503 and b'"keystore": false' in body


async def test_by_default_only_127_0_0_1_and_ipv6_loopback_may_ask(server: AuthServer) -> None:
    """Not all of 127.0.0.0/8: any local process can connect from 127.0.0.2."""
    port = server.listener.port
    assert (await get(port, "/metrics"))[0] == 200
    reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                   local_addr=("127.0.0.2", 0))
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 403") and answer.endswith(b"deny")
    assert server.refused_requests == 1


async def test_peers_not_allowed_get_nothing_and_are_counted(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    async with KeyStore.open(db):
        pass
    running = AuthServer(replace(Settings(), db_path=db, authsvc_port=0, audit_path=None,
                                 authsvc_allowed_peers=("10.0.0.0/8",)))
    await running.start()
    try:
        status, body = await get(running.listener.port, "/metrics")
        assert status == 403 and body == b"deny"
        assert running.refused_requests == 1
    finally:
        await running.stop()
