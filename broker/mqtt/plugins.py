"""The auth plugin and the policy adapter: thin layers between sessions and the pure
policy module (broker.policy).

* ``AccessKeyAuthPlugin`` (an amqtt auth plugin) checks CONNECT (docs/access.md#connect):
  gathers the facts from the keystore, asks ``policy.check_connect`` and leaves the
  outcome on the session, so that KeyBroker answers with the right CONNACK code (amqtt
  itself always sends 5). The server passes the opened keystore, the audit log and the
  guard through the plugin ``Config``.
* ``decide`` answers PUBLISH / SUBSCRIBE / delivery questions from the session's grant,
  synchronously: awaiting a plugin per subscriber per message is what made stock amqtt
  slow (and amqtt's topic plugin hook is not called by keybroker's own packet path).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from amqtt.plugins.base import BaseAuthPlugin

from broker import policy
from broker.core.counters import Buckets
from broker.mqtt.session import ConnectionInfo, Grant, KeySession, Refusal
from broker.policy import PolicyCache, SessionPolicy
from broker.policy.guard import BruteForceGuard
from broker.topics.mounts import mount_of
from keystore import DEFAULT_DEVICE_PREFIX
from keystore.errors import UnavailableError

logger = logging.getLogger(__name__)

class AccessKeyAuthPlugin(BaseAuthPlugin):
    """CONNECT: username = access key, password = secret, client id = device id."""

    @dataclass
    class Config:
        keystore: Any = None  # keystore.KeyStore, opened by broker.daemon.server
        device_prefix: str = DEFAULT_DEVICE_PREFIX
        audit: Any = None  # broker.core.audit.AuditLog
        guard: Any = None  # broker.policy.guard.BruteForceGuard (None = off)

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._policies = PolicyCache(self.config.device_prefix)
        self.lookup_latency = Buckets()  # keystore lookup per CONNECT (metrics)

    async def authenticate(self, *, session: KeySession) -> bool:
        conn = session.conn
        guard: BruteForceGuard | None = self.config.guard
        now = time.monotonic()
        if guard is not None and guard.banned_until(conn.client_ip, now):
            # Step 1 of docs/access.md#connect: refuse before looking at the secret at all.
            outcome: Grant | Refusal = Refusal("banned", policy.CONNACK_CODE["banned"], None)
        else:
            try:
                outcome = await self._decide(session, conn)
            except UnavailableError:
                # The keystore cannot answer (logged once by it): "server unavailable",
                # never a session let in unchecked, and no mark against the client.
                outcome = Refusal("keystore_unavailable",
                                  policy.CONNACK_CODE["keystore_unavailable"], None)
            except Exception:
                # A keystore failure must refuse this client, not crash the daemon.
                logger.exception("authentication failed with an internal error")
                outcome = Refusal("internal_error", 5, None)
        if isinstance(outcome, Grant):
            session.grant = outcome
            session.mount = mount_of(outcome.key.app_id)
            self._audit("connect_ok", session, outcome.key.key, None)
            return True
        session.refusal = outcome
        if outcome.reason == "banned":
            # Counted, and audited once when the ban ends: a banned source retrying in a
            # loop must not write a line per attempt.
            if guard is not None:
                guard.refused(conn.client_ip)
            return False
        audit = self.config.audit
        if audit is not None:
            audit.from_source("connect_refused", reason=outcome.reason,
                              **session.audit_fields(outcome.key))
        if guard is not None and outcome.reason != "keystore_unavailable":
            until = guard.record_failure(conn.client_ip, now)
            if until is not None:
                self._audit("ban", session, None, f"banned for {until - now:.0f}s")
        return False

    async def _decide(self, session: KeySession, conn: ConnectionInfo) -> Grant | Refusal:
        ks = self.config.keystore
        username, password = session.username, session.password
        # A refusal names the key that was tried (public, and what the operator needs to
        # answer "why can't my device connect?"); never the secret.
        if not username or password is None:
            return Refusal("no_credentials", policy.CONNACK_CODE["no_credentials"],
                           username or None)
        # One keystore round trip in the usual case; an unknown key costs the same as a
        # wrong secret (docs/access.md#connect). The scope is the one matching at this moment.
        device_id = session.client_id
        started = time.perf_counter()
        found = await ks.connect_lookup(username, password, device_id)
        self.lookup_latency.observe(time.perf_counter() - started)
        key = found.key
        if key is None:  # an unknown key or a wrong secret (one cost, one answer)
            return Refusal("bad_credentials", policy.CONNACK_CODE["bad_secret"], username)
        session_policy: SessionPolicy | None = None
        if found.device_in_scope:
            session_policy = self._policies.get(key, found.scope)
        facts = policy.ConnectFacts(
            key=key,
            now=datetime.now(UTC),
            device_registered=found.device_registered,
            device_in_scope=found.device_in_scope,
            client_ip=conn.client_ip,
            will_topic=session.will.topic if session.will is not None else None,
        )
        decision = policy.check_connect(facts, session_policy)
        if not decision.allowed or session_policy is None:
            reason = decision.reason if not decision.allowed else "no_policy"
            return Refusal(reason, policy.CONNACK_CODE.get(reason, 5), key.key)
        return Grant(key, session_policy)

    def _audit(
        self, event: str, session: KeySession, key: str | None, reason: str | None
    ) -> None:
        audit = self.config.audit
        if audit is None:
            return
        audit.event(event, reason=reason, **session.audit_fields(key))
