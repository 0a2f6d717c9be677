"""The access-key service's answers (docs/cluster.md), the same for every engine.

* ``check_credentials``: the key and its secret (RabbitMQ's first CONNECT request; a
  refusal there is CONNACK 4). A success is recorded in the keystore as a credential
  check of the client id and key, which any replica can read.
* ``admit``: RabbitMQ's second CONNECT request, which carries no secret: only for a client
  id and key with a credential check within ``admission_window`` seconds (else any
  allowed peer could admit any key, and reset a victim client id's session), then the
  rest of the CONNECT checks of docs/access.md in the daemon's order, then the
  connection's snapshot (a refusal is CONNACK 5). ``authenticate``: EMQX's one request,
  credentials and the same admission.
* ``connection``: what a later request of a connection is answered from: its snapshot,
  its key as it is now, its compiled policy. ``may_publish``, ``may_subscribe`` and
  ``may_use`` decide with broker.policy (containment for SUBSCRIBE) and
  broker.authsvc.decisions.

The engine adapters (``rabbitmq``, ``emqx``) translate requests into these calls and
render the Decision. Refusals and connections are audited like the daemon's, and refused
admissions count in the brute-force guard against the client address.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web

from broker import policy
from broker.authsvc.decisions import (
    DENY_NOT_MQTT,
    DENY_WRONG_APPLICATION,
    DENY_WRONG_VHOST,
    amqp_policy,
    check_client_id,
    check_connection,
    check_credential_check,
    check_resource,
    policy_digest,
)
from broker.authsvc.engines import EngineApi, EngineError
from broker.core.audit import AuditLog
from broker.policy import Decision, PolicyCache, SessionPolicy
from broker.policy.addresses import normalize_ip
from broker.policy.decisions import ALLOW
from broker.policy.guard import BruteForceGuard
from broker.services.live import StatusRecorder
from keystore import KeyStore
from keystore.backend import ConnectionRow
from keystore.connect import ConnectLookup
from keystore.errors import NotFoundError

logger = logging.getLogger(__name__)

RABBITMQ = "rabbitmq"
EMQX = "emqx"
# What a contract handler decided (True = allow), for the service's counters.
DECIDED = web.RequestKey("keybroker_decision", bool)
APP_TTL = 10.0  # seconds an application's name -> id is remembered
DENY_NO_CREDENTIALS = Decision(False, "no_credentials")
DENY_BAD_CREDENTIALS = Decision(False, "bad_credentials")
DENY_BANNED = Decision(False, "banned")
DENY_RESET_FAILED = Decision(False, "session_reset_failed")


@dataclass(frozen=True, slots=True)
class Asker:
    """Who asks: the engine (the audit's ``listener``) and the node's address (its
    ``peer_ip``)."""

    engine: str
    node: str


@dataclass(frozen=True, slots=True)
class Connection:
    """A connection as a later request finds it: snapshot, key now, compiled policy."""

    row: ConnectionRow
    policy: SessionPolicy


class AuthService:
    def __init__(self, keystore: KeyStore, audit: AuditLog, guard: BruteForceGuard | None,
                 device_prefix: str, exchange: str,
                 engines: Mapping[str, EngineApi] | None = None,
                 status: StatusRecorder | None = None, *, admission_window: float) -> None:
        self.keystore = keystore
        self.audit = audit
        self.guard = guard
        self.status = status
        self.exchange = exchange
        self.engines = dict(engines or {})
        self.admission_window = admission_window  # seconds from check_credentials to admit
        self._policies = {EMQX: PolicyCache(device_prefix),
                          RABBITMQ: PolicyCache(device_prefix, build=amqp_policy)}
        self._apps: dict[str, tuple[str | None, float]] = {}

    # --- CONNECT --------------------------------------------------------------------------

    async def check_credentials(self, asker: Asker, username: str | None,
                                password: str | None, client_id: str) -> Decision:
        """The key and its secret; a success is recorded for ``admit``. RabbitMQ sends no
        client address with them, so these refusals are audited (with the key tried:
        public, never the secret) but cannot count against a source in the guard."""
        if not username or password is None:
            decision = DENY_NO_CREDENTIALS
        else:
            found = await self.keystore.connect_lookup(username, password, client_id)
            decision = ALLOW if found.key is not None else DENY_BAD_CREDENTIALS
            if found.key is not None and found.device_registered:
                await self.keystore.record_credential_check(client_id, found.key.key,
                                                            datetime.now(UTC))
        if not decision.allowed:
            self.audit.from_source("connect_refused", reason=decision.reason, key=username or None,
                                   client_id=client_id, client_ip=None, peer_ip=asker.node,
                                   listener=asker.engine)
        return decision

    async def authenticate(self, asker: Asker, username: str | None, password: str | None,
                           client_id: str, client_ip: str, app: str) -> Decision:
        """Credentials and admission in one request (EMQX: the client address comes with
        the credentials, so the guard sees every refusal)."""
        client_ip = normalize_ip(client_ip) or client_ip
        if self._banned(client_ip):
            return DENY_BANNED
        if not username or password is None:
            return self._refused(asker, DENY_NO_CREDENTIALS, username or None, client_id,
                                 client_ip)
        facts = await self.keystore.connect_lookup(username, password, client_id)
        if facts.key is None:
            return self._refused(asker, DENY_BAD_CREDENTIALS, username, client_id, client_ip)
        return await self._admit(asker, facts, client_id, client_ip, app, None,
                                 secret_checked=True)

    async def admit(self, asker: Asker, username: str, client_id: str, client_ip: str,
                    app: str, vhost: str | None = None) -> Decision:
        """The CONNECT checks after the credentials, for a key whose secret an earlier
        request of this CONNECT checked (``check_credentials``; RabbitMQ: ``app`` is the
        application of the virtual host ``vhost``)."""
        client_ip = normalize_ip(client_ip) or client_ip
        if self._banned(client_ip):
            return DENY_BANNED
        early = DENY_NOT_MQTT if not client_id else \
            check_client_id(client_id) if asker.engine == RABBITMQ else ALLOW
        if not early.allowed:
            return self._refused(asker, early, username, client_id, client_ip)
        facts = await self.keystore.verified_lookup(username, client_id)
        if facts.key is None:  # deleted between the two requests
            return self._refused(asker, DENY_BAD_CREDENTIALS, username, client_id, client_ip)
        return await self._admit(asker, facts, client_id, client_ip, app, vhost,
                                 secret_checked=False)

    async def _admit(self, asker: Asker, facts: ConnectLookup, client_id: str,
                     client_ip: str, app: str, vhost: str | None, *,
                     secret_checked: bool) -> Decision:
        """``secret_checked``: by this very request; else a recorded credential check of
        the client id and key must be recent (checked after the daemon's CONNECT checks,
        so that a client id that is no device is refused as such)."""
        key = facts.key
        assert key is not None
        if await self._app_id(app) != key.app_id:
            wrong = DENY_WRONG_VHOST if asker.engine == RABBITMQ else DENY_WRONG_APPLICATION
            return self._refused(asker, wrong, key.key, client_id, client_ip)
        now = datetime.now(UTC)
        decision = policy.check_connect(policy.ConnectFacts(
            key=key, now=now, device_registered=facts.device_registered,
            device_in_scope=facts.device_in_scope, client_ip=client_ip, will_topic=None,
        ), None)
        if decision.allowed and not secret_checked:
            decision = check_credential_check(await self.keystore.credential_check(client_id),
                                              key.key, now, self.admission_window)
        if not decision.allowed:
            return self._refused(asker, decision, key.key, client_id, client_ip)
        snapshot, previous = await self.keystore.record_connection(
            client_id, key.key, facts.scope, policy_digest(key), client_ip, now)
        if previous is not None and not previous.same_grant(snapshot):
            # Subscriptions the engine keeps for this client were granted under another
            # key, scope or topic settings: they go, before the engine resumes them.
            engine = self.engines.get(asker.engine)
            try:
                if engine is not None:
                    await engine.reset_session(client_id, vhost)
            except EngineError as exc:
                logger.warning("refusing %s: %s", client_id, exc)
                return self._refused(asker, DENY_RESET_FAILED, key.key, client_id, client_ip)
        self.audit.event("connect_ok", key=key.key, app=key.app_id, client_id=client_id,
                         client_ip=client_ip, peer_ip=asker.node, listener=asker.engine)
        if self.status is not None:
            self.status.key_used(key.key)
        return ALLOW

    def _banned(self, client_ip: str) -> bool:
        guard = self.guard
        if guard is None or not guard.banned_until(client_ip, time.monotonic()):
            return False
        guard.refused(client_ip)  # audited once, when the ban ends
        return True

    def _refused(self, asker: Asker, decision: Decision, key: str | None, client_id: str,
                 client_ip: str) -> Decision:
        self.audit.from_source("connect_refused", reason=decision.reason, key=key,
                               client_id=client_id, client_ip=client_ip, peer_ip=asker.node,
                               listener=asker.engine)
        if self.guard is not None:
            now = time.monotonic()
            until = self.guard.record_failure(client_ip, now)
            if until is not None:
                self.audit.event("ban", client_ip=client_ip, peer_ip=asker.node,
                                 listener=asker.engine, reason=f"banned for {until - now:.0f}s")
        return decision

    async def _app_id(self, ref: str) -> str | None:
        """The id of the application named (or identified) ``ref``; None if none."""
        now = time.monotonic()
        known = self._apps.get(ref)
        if known is not None and known[1] > now:
            return known[0]
        try:
            app_id: str | None = (await self.keystore.app(ref)).id
        except NotFoundError:
            app_id = None
        self._apps[ref] = (app_id, now + APP_TTL)
        return app_id

    # --- later requests -------------------------------------------------------------------

    async def connection(self, asker: Asker, username: str,
                         client_id: str) -> Connection | Decision:
        """The connection a later request belongs to, or why it is refused."""
        row = await self.keystore.connection(client_id)
        decision = check_connection(row, username, datetime.now(UTC))
        if row is None or not decision.allowed:
            return decision
        scope = await self.keystore.connection_scope(row.snapshot)
        return Connection(row, self._policies[asker.engine].get(row.key, scope))

    async def may_publish(self, asker: Asker, username: str, client_id: str,
                          topic: str) -> Decision:
        return await self._decide(asker, username, client_id, "publish_denied",
                                  lambda policy_: policy.check_publish(policy_, topic),
                                  topic=topic)

    async def may_subscribe(self, asker: Asker, username: str, client_id: str,
                            topic_filter: str) -> Decision:
        return await self._decide(
            asker, username, client_id, "subscribe_denied",
            lambda policy_: policy.check_subscribe_within(policy_, topic_filter),
            topic=topic_filter)

    async def may_use(self, asker: Asker, username: str, client_id: str, resource: str,
                      name: str, permission: str) -> Decision:
        """RabbitMQ resources (queues, exchanges) of an MQTT connection."""
        return await self._decide(
            asker, username, client_id, "resource_denied",
            lambda _: check_resource(resource, name, permission, client_id, self.exchange),
            resource=f"{resource} {name} {permission}")

    async def _decide(self, asker: Asker, username: str, client_id: str, event: str,
                      decide: Callable[[SessionPolicy], Decision], **audited: str) -> Decision:
        """A later request: the connection must still stand, then ``decide`` on its
        policy; a refusal is audited as ``event``."""
        found = await self.connection(asker, username, client_id)
        decision = found if isinstance(found, Decision) else decide(found.policy)
        if not decision.allowed:
            self._denied(asker, event, decision, username, client_id,
                         None if isinstance(found, Decision) else found, **audited)
        return decision

    def _denied(self, asker: Asker, event: str, decision: Decision, username: str,
                client_id: str, found: Connection | None, **audited: str) -> None:
        row = found.row if found is not None else None
        self.audit.from_source(
            event, key=row.key.key if row is not None else username,
            app=row.key.app_id if row is not None else None, client_id=client_id,
            client_ip=row.snapshot.client_ip if row is not None else None,
            peer_ip=asker.node, listener=asker.engine, reason=decision.reason, **audited)
