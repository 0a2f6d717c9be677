"""EMQX 5's HTTP authentication and authorization contract against a real authsvc
replica (docs/cluster.md#emqx). EMQX itself is not installable here: requests are built
from its documented shapes (a JSON body of placeholders: ``${username}``,
``${password}``, ``${clientid}``, ``${peerhost}``, ``${topic}``, ``${action}``), and its
REST API (``GET /api/v5/clients?username=``, ``DELETE /api/v5/clients/{clientid}``) is a
small recording stand-in that checks the API key, so kicks are observed as EMQX would
receive them."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import BasicAuth, web

from keystore import KeyStore
from keystore.models import AccessKey, TopicMode
from tests.support.authsvc import Replica, ask, authsvc_config, create_keystore, on_keystore
from tests.support.metrics import Samples, parse_samples
from tests.support.waiting import wait_until

API_KEY, API_SECRET = "kb-kicker", "emqx-api-secret-for-tests"
ALLOW = (200, {"result": "allow"})
DENY = (200, {"result": "deny"})


class EmqxApiStandIn:
    """Clients by id with their user name; DELETEs recorded (the EMQX 5 REST shapes)."""

    def __init__(self) -> None:
        self.clients: dict[str, str] = {}  # client id -> username
        self.deleted: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.runner: web.AppRunner | None = None
        self.url = ""

    def start(self) -> EmqxApiStandIn:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/api/v5/clients", self._list)
        app.router.add_delete("/api/v5/clients/{clientid}", self._delete)
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

        async def up() -> None:
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

        asyncio.run_coroutine_threadsafe(up(), self.loop).result(10)
        return self

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    @web.middleware
    async def _auth(self, request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
        sent = BasicAuth.decode(request.headers.get("Authorization", ""))
        if (sent.login, sent.password) != (API_KEY, API_SECRET):
            return web.json_response({"code": "BAD_API_KEY_OR_SECRET"}, status=401)
        return await handler(request)

    async def _list(self, request: web.Request) -> web.Response:
        wanted = request.query.get("username")
        data = [{"clientid": c, "username": u, "ip_address": "127.0.0.1"}
                for c, u in self.clients.items() if u == wanted]
        return web.json_response({"data": data, "meta": {"page": 1, "limit": 1000,
                                                         "count": len(data)}})

    async def _delete(self, request: web.Request) -> web.Response:
        client_id = request.match_info["clientid"]
        if self.clients.pop(client_id, None) is None:
            return web.json_response({"code": "CLIENTID_NOT_FOUND"}, status=404)
        self.deleted.append(client_id)
        return web.Response(status=204)


@pytest.fixture(scope="module")
def emqx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Replica, EmqxApiStandIn,
                                                                      Path]]:
    work = tmp_path_factory.mktemp("emqx")
    db = work / "keystore.db"
    create_keystore(db)
    stand_in = EmqxApiStandIn().start()
    secret_file = work / "emqx-secret"
    secret_file.write_text(API_SECRET + "\n")
    replica = Replica(work, "emqx", authsvc_config(
        db, work / "audit.jsonl", emqx_api=[stand_in.url], emqx_key=API_KEY,
        emqx_secret_file=secret_file, max_failures=1000))
    try:
        yield replica.start(), stand_in, db
    finally:
        replica.stop()
        stand_in.stop()



def store(db: Path, action: object) -> object:
    return on_keystore(db, action)  # type: ignore[arg-type]


def authn(replica: Replica, key: str, secret: str, client_id: str,
          ip: str = "127.0.0.1") -> tuple[int, dict[str, object]]:
    status, body = ask(replica.url, "/emqx/authn", {
        "username": key, "password": secret, "clientid": client_id, "peerhost": ip},
        json_body=True)
    return status, json.loads(body)


def authz(replica: Replica, key: str, client_id: str, action: str,
          topic: str) -> tuple[int, dict[str, object]]:
    status, body = ask(replica.url, "/emqx/authz", {
        "username": key, "clientid": client_id, "peerhost": "127.0.0.1", "topic": topic,
        "action": action}, json_body=True)
    return status, json.loads(body)


def keyed(db: Path, devices: list[str], **options: object) -> tuple[AccessKey, str]:
    async def go(ks: KeyStore) -> tuple[AccessKey, str]:
        for device in devices:
            await ks.add_device(device)
        return await ks.create_key(device_ids=devices, **options)  # type: ignore[arg-type]

    return store(db, go)  # type: ignore[return-value]


def test_authentication_answers_in_emqx_shape(emqx: tuple[Replica, EmqxApiStandIn, Path]) -> None:
    replica, _, db = emqx
    key, secret = keyed(db, ["ea-1", "ea.dot"], address_mode="only",
                        addresses=["198.51.100.0/24"])
    ok = (200, {"result": "allow", "is_superuser": False})
    refused = (200, {"result": "deny", "is_superuser": False})
    assert authn(replica, key.key, secret, "ea-1", "198.51.100.1") == ok
    assert authn(replica, key.key, secret + "x", "ea-1", "198.51.100.1") == refused
    assert authn(replica, key.key, secret, "ea-1", "203.0.113.1") == refused  # address rule
    assert authn(replica, key.key, secret, "ea-ghost", "198.51.100.1") == refused
    # EMQX topics are MQTT topics: a device id with a dot is fine here.
    assert authn(replica, key.key, secret, "ea.dot", "198.51.100.1") == ok
    status, body = ask(replica.url, "/emqx/authn", {"username": key.key}, json_body=True)
    assert (status, json.loads(body)) == refused
    status, body = ask(replica.url, "/emqx/authn", {}, json_body=False)  # garbage: denied
    assert (status, json.loads(body)) == refused


def test_one_emqx_cluster_serves_one_application(
        emqx: tuple[Replica, EmqxApiStandIn, Path]) -> None:
    replica, _, db = emqx

    async def go(ks: KeyStore) -> tuple[AccessKey, str]:
        await ks.create_app("elsewhere")
        await ks.add_device("eo-1", app="elsewhere")
        return await ks.create_key(app="elsewhere")

    key, secret = store(db, go)  # type: ignore[misc]
    assert authn(replica, key.key, secret, "eo-1")[1]["result"] == "deny"


def test_authorization_by_containment(emqx: tuple[Replica, EmqxApiStandIn, Path]) -> None:
    replica, _, db = emqx
    key, secret = keyed(db, ["ez-1", "ez-2"], topic_mode=TopicMode.ONLY,
                        pub_topics=["v1.0/+"], sub_topics=["v1.0/#"])
    store(db, lambda ks: ks.add_device("ez-x"))
    assert authn(replica, key.key, secret, "ez-1")[1]["result"] == "allow"
    for action, topic, expected in [
        ("publish", "losant/ez-1/state", ALLOW),
        ("publish", "losant/ez-x/state", DENY),
        ("subscribe", "losant/ez-2/#", ALLOW),
        ("subscribe", "losant/+/state", DENY),
        ("subscribe", "+/state", DENY),
        ("subscribe", "#", DENY),
        ("subscribe", "$SYS/#", DENY),
        ("subscribe", "$share/g/losant/ez-1/state", DENY),
        ("publish", "v1.0/temp", ALLOW),  # no AMQP form here: a dot is a dot
        ("subscribe", "v1.0/+/x", ALLOW),
        ("subscribe", "v1/0/#", DENY),
        ("publish", "other", DENY),
        ("all", "losant/ez-1/state", DENY),  # unknown action
    ]:
        assert authz(replica, key.key, "ez-1", action, topic) == expected, (action, topic)
    assert authz(replica, key.key, "ez-2", "publish", "losant/ez-1/state") == DENY  # not it


def test_revocation_kicks_through_the_emqx_api(emqx: tuple[Replica, EmqxApiStandIn, Path]) -> None:
    replica, stand_in, db = emqx
    key, secret = keyed(db, ["ek-1", "ek-2", "ek-3"])
    other, other_secret = keyed(db, ["ek-9"])
    for client_id in ("ek-1", "ek-2"):
        assert authn(replica, key.key, secret, client_id)[1]["result"] == "allow"
        stand_in.clients[client_id] = key.key
    assert authn(replica, other.key, other_secret, "ek-9")[1]["result"] == "allow"
    stand_in.clients["ek-9"] = other.key
    store(db, lambda ks: ks.set_status([key.key], "inactive"))
    wait_until(lambda: {"ek-1", "ek-2"} <= set(stand_in.deleted))
    assert "ek-9" not in stand_in.deleted and "ek-9" in stand_in.clients
    assert authz(replica, key.key, "ek-1", "publish", "losant/ek-1/state") == DENY
    assert authn(replica, key.key, secret, "ek-3")[1]["result"] == "deny"
    # A removed device: its client is kicked (and its session discarded) by client id.
    store(db, lambda ks: ks.remove_devices(["ek-9"]))
    wait_until(lambda: "ek-9" in stand_in.deleted)
    audit = [json.loads(line) for line in (db.parent / "audit.jsonl").read_text().splitlines()]
    kicks = {(e["client_id"], e["reason"]) for e in audit if e["event"] == "kick"}
    assert {("ek-1", "key_inactive"), ("ek-2", "key_inactive"),
            ("ek-9", "device_deleted")} <= kicks
    assert secret not in replica.log_text() and API_SECRET not in replica.log_text()


def test_a_changed_grant_discards_the_stored_session(
        emqx: tuple[Replica, EmqxApiStandIn, Path]) -> None:
    """EMQX keeps a persistent session's subscriptions and does not ask about them again
    on reconnect: a CONNECT under another scope (here: a tag change, which no change-feed
    row reports) discards them first."""
    replica, stand_in, db = emqx

    async def go(ks: KeyStore) -> tuple[AccessKey, str]:
        await ks.add_device("es-1", tags=[("site", "es")])
        await ks.add_device("es-2", tags=[("site", "es")])
        return await ks.create_key(device_tags=[("site", "es")])

    key, secret = store(db, go)  # type: ignore[misc]
    assert authn(replica, key.key, secret, "es-1")[1]["result"] == "allow"
    stand_in.clients["es-1"] = key.key
    assert authn(replica, key.key, secret, "es-1")[1]["result"] == "allow"  # same grant
    assert "es-1" not in stand_in.deleted
    store(db, lambda ks: ks.untag_device("es-2", ["site"]))
    assert authn(replica, key.key, secret, "es-1")[1]["result"] == "allow"
    assert stand_in.deleted.count("es-1") == 1


def test_every_revoking_change_kicks(emqx: tuple[Replica, EmqxApiStandIn, Path]) -> None:
    """Expiry (found by time, no change row), a narrower address rule (only the clients
    it no longer allows), new topic lists, an application deleted, `devices kick`."""
    replica, stand_in, db = emqx
    expiring, expiring_secret = keyed(db, ["rk-exp"], expires_at=datetime.now(UTC)
                                      + timedelta(seconds=2))
    addressed, addressed_secret = keyed(db, ["rk-ip1", "rk-ip2"])
    listed, listed_secret = keyed(db, ["rk-top"], topic_mode=TopicMode.ALL)
    kicked, kicked_secret = keyed(db, ["rk-op"])

    async def tenant(ks: KeyStore) -> tuple[AccessKey, str]:
        await ks.create_app("doomed")
        await ks.add_device("rk-app", app="doomed")
        return await ks.create_key(app="doomed")

    doomed, doomed_secret = store(db, tenant)  # type: ignore[misc]
    sessions = [(expiring, expiring_secret, "rk-exp", "127.0.0.1"),
                (addressed, addressed_secret, "rk-ip1", "198.51.100.1"),
                (addressed, addressed_secret, "rk-ip2", "198.51.100.2"),
                (listed, listed_secret, "rk-top", "127.0.0.1"),
                (kicked, kicked_secret, "rk-op", "127.0.0.1")]
    for key, secret, client_id, ip in sessions:
        assert authn(replica, key.key, secret, client_id, ip)[1]["result"] == "allow"
        stand_in.clients[client_id] = key.key
    stand_in.clients["rk-app"] = doomed.key  # (another EMQX serves that application)
    wait_until(lambda: "rk-exp" in stand_in.deleted, timeout=6)
    store(db, lambda ks: ks.update_key(addressed.key, address_mode="only",
                                       addresses=["198.51.100.1/32"]))
    wait_until(lambda: "rk-ip2" in stand_in.deleted)
    assert "rk-ip1" not in stand_in.deleted
    store(db, lambda ks: ks.update_key(listed.key, pub_topics=["only/this"],
                                       topic_mode="only"))
    wait_until(lambda: "rk-top" in stand_in.deleted)
    store(db, lambda ks: ks.delete_apps(["doomed"]))
    wait_until(lambda: "rk-app" in stand_in.deleted)
    store(db, lambda ks: ks.request_kick("rk-op"))
    wait_until(lambda: "rk-op" in stand_in.deleted)
    reasons = {e["client_id"]: e["reason"] for e in map(json.loads, (
        db.parent / "audit.jsonl").read_text().splitlines()) if e["event"] == "kick"}
    assert {reasons[c] for c in ("rk-exp", "rk-ip2", "rk-top", "rk-app", "rk-op")} == {
        "key_expired", "ip_denied", "key_updated", "key_deleted", "operator_kick"}


def test_metrics_count_the_kicks_and_decisions(emqx: tuple[Replica, EmqxApiStandIn, Path]
                                               ) -> None:
    """Every connection this one replica closed through the EMQX API (one audit line
    each) is counted, with any the other tests of this module caused."""
    replica, stand_in, db = emqx
    key, secret = keyed(db, ["mk-1"])
    assert authn(replica, key.key, secret, "mk-1")[1]["result"] == "allow"
    assert authn(replica, key.key, "wrong", "mk-1")[1]["result"] == "deny"
    stand_in.clients["mk-1"] = key.key
    store(db, lambda ks: ks.set_status([key.key], "inactive"))
    wait_until(lambda: "mk-1" in stand_in.deleted)

    def counted() -> Samples | None:
        """The metrics, once the revoker has counted what it closed (after the DELETE's
        answer): one audit line per connection closed."""
        with urllib.request.urlopen(replica.url + "/metrics", timeout=10) as response:  # noqa: S310
            found = parse_samples(response.read().decode())
        closed = found.get(("keybroker_authsvc_kicks_total",
                            (("engine", "emqx"), ("result", "closed"))), 0)
        audit = [json.loads(line) for line in (db.parent / "audit.jsonl").read_text().splitlines()]
        return found if closed == sum(1 for e in audit if e["event"] == "kick") > 0 else None

    found = wait_until(counted, what="one kick line per connection closed")
    for result in ("allow", "deny"):
        labels = (("engine", "emqx"), ("result", result), ("route", "authn"))
        assert found[("keybroker_authsvc_decisions_total", labels)] > 0
    assert found[("keybroker_authsvc_decisions_total",
                  (("engine", "rabbitmq"), ("result", "allow"), ("route", "user")))] == 0
