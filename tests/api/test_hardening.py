"""What the API refuses, with the right status and nothing written: malformed bodies,
oversized bodies, path tricks, brute force; and what every response carries."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path

import pytest
import requests

from tests.api.conftest import ApiEnv
from tests.support import mqtt_raw as raw
from tests.support.harness import Client, RunningBroker, StartDaemon
from tests.support.tls import server_certificate
from tests.support.waiting import wait_until


def _nothing_written(api: ApiEnv) -> None:
    assert api.daemon.ks("count_keys", every_app=True) == 0
    assert api.daemon.ks("count_devices", every_app=True) == 0
    assert [a.name for a in api.daemon.ks("list_apps")] == ["default"]


def _error(response: requests.Response, status: int, *needles: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"type", "message"}, body
    for needle in needles:
        assert needle in body["message"], body


@pytest.mark.parametrize(("body", "needle"), [
    (b"{not json", "malformed JSON"),
    (b"", "missing JSON body"),
    (b"[1, 2]", "invalid body"),
    (b'{"name": NaN}', "NaN"),
    (b'{"name": 7}', "'name'"),
    (b'{"name": "x", "deviceIds": [1]}', "deviceIds.0"),
    (b'{"name": "x", "extra": true}', "unknown field 'extra'"),
    (b'{"filterType": "whitelist", "pubTopics": ["$SYS/#"]}', "$SYS/#"),
    (b"[" * 5000 + b"]" * 5000, "malformed JSON"),
    (b'{"name": "x", "description": 1e999999}', "number 1e999999 is out of range"),
])
def test_bad_key_bodies_are_400_and_write_nothing(api: ApiEnv, body: bytes,
                                                  needle: str) -> None:
    response = api.http("POST", f"/applications/{api.app_id}/keys", data=body,
                        headers={"Content-Type": "application/json"})
    _error(response, 400, needle)
    _nothing_written(api)


def test_a_query_parameter_with_a_number_json_cannot_carry_is_400(api: ApiEnv) -> None:
    response = api.http("GET", f"/applications/{api.app_id}/keys",
                        params={"query": '{"createdAt": {"$gt": -1e999999}}'})
    _error(response, 400, "malformed query", "-1e999999 is out of range")


def test_bodies_over_1_mib_are_413(api: ApiEnv) -> None:
    big = json.dumps({"name": "x", "description": "d" * (1024 * 1024)})
    response = api.http("POST", f"/applications/{api.app_id}/devices", data=big)
    _error(response, 413, "1 MiB")
    _nothing_written(api)


@pytest.mark.parametrize("path", [
    "/applications/{app}/devices/..",
    "/applications/{app}/devices/%2e%2e",
    "/applications/{app}/devices/a%2Fb",
    "/applications/{app}%2Fdevices/x",
    "/applications/{app}/devices/a%5Cb",
    "/applications/{app}/devices/a%00b",
])
def test_path_tricks_are_refused(api: ApiEnv, path: str) -> None:
    api.daemon.ks("add_device", "a")
    with socket.create_connection(("127.0.0.1", api.daemon.server.api.port)) as raw:
        # A raw request: HTTP clients normalise these paths before sending them.
        raw.sendall(f"DELETE {path.format(app=api.app_id)} HTTP/1.1\r\nHost: x\r\n"
                    f"Authorization: Bearer {api.token}\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := raw.recv(65536):
            reply += chunk
    assert int(reply.split(b" ", 2)[1]) == 400, reply[:200]
    assert "invalid path segment" in json.loads(reply.split(b"\r\n\r\n", 1)[1])["message"]
    assert api.daemon.ks("count_devices") == 1  # nothing deleted


def test_unknown_routes_and_methods_answer_in_losants_shape(api: ApiEnv) -> None:
    _error(api.http("GET", "/nowhere"), 404, "GET /nowhere")
    _error(api.http("PUT", f"/applications/{api.app_id}"), 405, "PUT")
    _error(api.http("GET", "/applications", params={"color": "red"}), 400, "'color'")
    ok = api.http("GET", "/applications", params={"_actions": "True", "_links": "true",
                                                  "_embedded": "false"})
    assert ok.status_code == 200


def test_key_paths_take_only_the_keys_id_as_losants_do(api: ApiEnv) -> None:
    key, _ = api.daemon.ks("create_key", name="lyon-gw")
    for ref in ("lyon-gw", key.key, key.key[:8]):
        _error(api.http("PATCH", f"/applications/{api.app_id}/keys/{ref}",
                        data=json.dumps({"status": "inactive"})), 404, ref)
    assert api.daemon.ks("get_key", key.key).status.value == "active"
    by_id = api.http("GET", f"/applications/{api.app_id}/keys/{key.id}")
    assert by_id.json()["name"] == "lyon-gw"


def test_every_response_carries_the_security_headers(api: ApiEnv) -> None:
    for response in (api.http("GET", "/applications"), api.http("GET", "/nowhere"),
                     api.http("GET", "/applications", token="")):
        headers = response.headers
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Frame-Options"] == "DENY"
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert headers["Cache-Control"] == "no-store"
        assert headers["Server"] == "keybroker"
        assert "Access-Control-Allow-Origin" not in headers  # CORS off by default
    preflight = api.http("OPTIONS", "/applications",
                         headers={"Origin": "https://evil.example",
                                  "Access-Control-Request-Method": "GET"})
    assert preflight.status_code == 405
    assert "Access-Control-Allow-Origin" not in preflight.headers


@pytest.fixture
def cors_daemon(daemon_with: StartDaemon) -> RunningBroker:
    return daemon_with(api_cors_origins=("https://console.example",))


def test_cors_answers_only_configured_origins(cors_daemon: RunningBroker) -> None:
    url = cors_daemon.server.api.url

    def preflight(origin: str) -> requests.Response:
        return requests.options(url + "/applications", timeout=5, headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Authorization, Content-Type"})

    allowed = preflight("https://console.example")
    assert allowed.status_code == 204
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://console.example"
    assert "Authorization" in allowed.headers["Access-Control-Allow-Headers"]
    denied = preflight("https://evil.example")
    assert denied.status_code == 403
    assert "Access-Control-Allow-Origin" not in denied.headers
    plain = requests.get(url + "/applications", timeout=5,
                         headers={"Origin": "https://evil.example"})
    assert plain.status_code == 401 and "Access-Control-Allow-Origin" not in plain.headers


def test_failed_tokens_and_logins_are_banned_per_source_with_429(api: ApiEnv) -> None:
    api.daemon.ks("add_device", "d")
    key, secret = api.daemon.ks("create_key", device_ids=["d"])
    limit = api.daemon.settings.guard.max_failures
    for attempt in range(limit):
        bad = (api.http("GET", "/applications", token=f"kba.{'0' * 24}.guess{attempt}")
               if attempt % 2 else
               api.http("POST", "/auth/device", token="",
                        json={"deviceId": "d", "key": key.key, "secret": f"guess{attempt}"}))
        assert bad.status_code == 401
    banned = api.http("POST", "/auth/device", token="",
                      json={"deviceId": "d", "key": key.key, "secret": secret})
    _error(banned, 429, "too many")
    assert int(banned.headers["Retry-After"]) >= 1
    _error(api.http("GET", "/applications"), 429)  # even a good token, from this source
    events = [e["event"] for e in api.daemon.audit_events()]
    assert "ban" in events


@pytest.mark.parametrize("trusted", [(), ("127.0.0.0/8",)])
def test_x_forwarded_headers_only_from_the_apis_trusted_proxies(
        daemon_with: StartDaemon, trusted: tuple[str, ...]) -> None:
    # [network] trusted_proxies (loopback by default) is for MQTT; the API has its own.
    daemon = daemon_with(api_trusted_proxies=trusted, trusted_proxies=("127.0.0.0/8",))
    daemon.ks("add_device", "d")
    key, secret = daemon.ks("create_key", device_ids=["d"], address_mode="only",
                            addresses=["10.1.0.0/16"])
    response = requests.post(daemon.server.api.url + "/auth/device", timeout=5,
                             json={"deviceId": "d", "key": key.key, "secret": secret},
                             headers={"X-Forwarded-For": "10.1.2.3"})
    if trusted:
        assert response.status_code == 200, response.text
    else:
        _error(response, 401, "ip_denied")
    signin = requests.get(daemon.server.api.url + "/console/signin", timeout=5,
                          headers={"X-Forwarded-Proto": "https"})
    assert ("Secure" in signin.headers["Set-Cookie"]) == bool(trusted)


def test_the_audit_log_names_actions_never_secrets_or_tokens(api: ApiEnv) -> None:
    c = api.client()
    device = c.devices.post(applicationId=api.app_id, device={"name": "d"})
    key = c.application_keys.post(applicationId=api.app_id,
                                  applicationKey={"deviceIds": [device["deviceId"]]})
    device_token = c.auth.authenticate_device(credentials={
        "deviceId": device["deviceId"], "key": key["key"], "secret": key["secret"]})["token"]
    c.application_key.delete(applicationId=api.app_id, applicationKeyId=key["id"])
    text = (api.daemon.settings.audit_path or Path("/nonexistent")).read_text()
    for secret in (key["secret"], api.token, device_token, api.token.split(".")[2]):
        assert secret not in text
    actions = [(e["event"], e.get("action")) for e in api.daemon.audit_events()]
    assert ("api", "devices.post") in actions
    assert ("api", "applicationKeys.post") in actions
    assert ("api", "applicationKey.delete") in actions
    assert ("device_auth_ok", None) in actions
    deleted = next(e for e in api.daemon.audit_events() if e.get("action") ==
                   "applicationKey.delete")
    assert deleted["token"] == "admin" and deleted["key"] == key["key"]
    assert deleted["client_ip"] == "127.0.0.1"


def test_https_with_certfile_and_keyfile(tmp_path: Path, daemon_with: StartDaemon) -> None:
    ca, cert, key = server_certificate(tmp_path)
    daemon = daemon_with(api_certfile=cert, api_keyfile=key)
    url = daemon.server.api.url
    assert url.startswith("https://127.0.0.1:")
    answer = requests.get(url + "/openapi.json", timeout=5, verify=str(ca))
    assert answer.status_code == 200
    assert answer.headers["Strict-Transport-Security"].startswith("max-age=")
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(url.replace("https", "http") + "/openapi.json", timeout=5)


def test_the_api_bounds_its_connections(daemon_with: StartDaemon) -> None:
    """No client can hold every descriptor through the API: per-source and total caps,
    and connections without a request are closed (MQTT keeps working meanwhile)."""
    daemon = daemon_with(api_max_connections_per_source=3, api_request_timeout=0.5)
    port = daemon.server.api.port
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    extra = socket.create_connection(("127.0.0.1", port))
    # Over the per-source cap: the one idle longest makes room.
    wait_until(lambda: raw.is_closed(held[0]))
    assert not raw.is_closed(extra)
    for sock in [*held[1:], extra]:  # sent nothing: closed after request_timeout
        wait_until(lambda sock=sock: raw.is_closed(sock))
    for sock in [*held, extra]:
        sock.close()
    daemon.ks("add_device", "d")
    key, secret = daemon.ks("create_key", device_ids=["d"])
    with Client(daemon.port(), "d", key.key, secret) as device:
        assert device.connect() == 0
    ok = requests.get(daemon.server.api.url + "/healthz", timeout=5)
    assert ok.status_code == 200  # the caps freed up again
    guard = daemon.server.api.guard
    assert guard.evicted == 1 and guard.refused == 0 and guard.timed_out >= 3


def _idle_keep_alive(port: int) -> http.client.HTTPConnection:
    """A connection that has had one request answered and is kept open, idle."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    connection.request("GET", "/healthz")
    answer = connection.getresponse()
    answer.read()
    assert answer.status == 200 and not answer.will_close
    return connection


def test_idle_keep_alive_connections_never_lock_their_address_out(
    broker: RunningBroker,
) -> None:
    """64 idle keep-alive connections (the default per-source cap) from one address: a new
    request from that address is answered; the connection idle longest is the one closed."""
    port = broker.server.api.port
    idle = [_idle_keep_alive(port) for _ in range(64)]
    try:
        answer = requests.get(broker.server.api.url + "/healthz", timeout=5)
        assert answer.status_code == 200
        assert idle[0].sock is not None
        wait_until(lambda: raw.is_closed(idle[0].sock))
        assert not any(raw.is_closed(c.sock) for c in idle[1:])
        assert broker.server.api.guard.evicted == 1
    finally:
        for connection in idle:
            connection.close()


def test_a_new_connection_is_refused_when_every_other_one_is_busy(
        daemon_with: StartDaemon) -> None:
    daemon = daemon_with(api_max_connections_per_source=3)
    port = daemon.server.api.port
    guard = daemon.server.api.guard
    busy = []
    for _ in range(3):  # each has a request in progress: its body is still coming
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"POST /auth/device HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        busy.append(sock)
    wait_until(lambda: sum(state.busy for state in guard.open.values()) == 3)
    refused = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert raw.closed_by_peer(refused, within=3)
    refused.close()
    assert guard.refused == 1 and guard.evicted == 0
    assert not any(raw.is_closed(sock) for sock in busy)
    for sock in busy:
        sock.close()


@pytest.mark.parametrize(("field", "limit", "message"), [
    ("maxKeys", "max_keys", "key limit"), ("maxDevices", "max_devices", "device limit")])
def test_a_token_of_one_application_cannot_widen_its_limits(
    api: ApiEnv, field: str, limit: str, message: str,
) -> None:
    other = api.daemon.ks("create_app", "other", **{limit: 1})
    bound = api.token_for("bound", app="other")
    patched = api.http("PATCH", f"/applications/{other.id}", token=bound,
                       json={field: 0})
    _error(patched, 403, message)
    assert getattr(api.daemon.ks("app", "other"), limit) == 1
    renamed = api.http("PATCH", f"/applications/{other.id}", token=bound,
                       json={"description": "fine"})
    assert renamed.status_code == 200
    widened = api.http("PATCH", f"/applications/{other.id}", json={field: 0})
    assert widened.status_code == 200 and widened.json()[field] == 0  # a token for all may
