"""Who is calling the API, and what they may do (docs/api.md#tokens).

Two kinds of bearer token: an admin token (``keybroker tokens create``: scopes in Losant's
grammar, one application or all) and a device token (``POST /auth/device``: the key and
device it was issued for). Every request reads its token's row, so a revoked admin token,
or a device token whose key was deactivated, deleted or expired or whose device was
removed, stops working at once. A device token is checked like a CONNECT on every request:
key status and expiry, device in the key's scope as of now, the key's IP rules.

Failed tokens count in the brute-force guard per source, like failed CONNECTs; a banned
source gets 429 before its token is looked at.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime

from broker import policy
from broker.api.errors import ApiError, too_many, unauthorized
from broker.core.audit import AuditLog
from broker.policy import PolicyCache, SessionPolicy
from broker.policy.guard import BruteForceGuard
from broker.policy.limits import take_token
from keystore import KeyStore, scopes
from keystore.connect import ConnectLookup
from keystore.models import AccessKey, ApiToken
from keystore.tokens import ADMIN, DEVICE

MAX_BUCKETS = 100_000


@dataclass(frozen=True, slots=True)
class Source:
    client_ip: str  # after X-Forwarded-For from trusted proxies
    peer_ip: str
    https: bool = False  # TLS here, or X-Forwarded-Proto: https from a trusted proxy


@dataclass(frozen=True, slots=True)
class Admin:
    token: ApiToken

    @property
    def name(self) -> str:
        return self.token.name


@dataclass(frozen=True, slots=True)
class DeviceCaller:
    key: AccessKey
    device_id: str
    policy: SessionPolicy

    @property
    def name(self) -> str:
        return f"device:{self.device_id}"


Caller = Admin | DeviceCaller

# What only a token for every application may do: create applications, read metrics (they
# cover every application).
EVERY_APP_ONLY = {("applications", "post"): "create applications",
                  ("metrics", "get"): "read metrics (they cover every application)"}


def admin_refusal(token: ApiToken, resource: str, action: str,
                  app_id: str | None) -> str | None:
    """Why an admin token may not do ``resource.action`` (on application ``app_id``), or
    None. The one rule for the API and the console (docs/api.md#tokens)."""
    if not scopes.grants(token.scopes, resource, action):
        return (f"token {token.name!r} lacks a scope for {resource}.{action} (one of "
                f"{scopes.ALL}, {resource}.*, {resource}.{action})")
    if token.app_id is None:
        return None
    what = EVERY_APP_ONLY.get((resource, action))
    if what is not None:
        return f"token {token.name!r} is for one application: it cannot {what}"
    if app_id is not None and app_id != token.app_id:
        return f"token {token.name!r} is for another application"
    return None


class Callers:
    def __init__(self, keystore: KeyStore, guard: BruteForceGuard | None, audit: AuditLog,
                 device_prefix: str) -> None:
        self.keystore = keystore
        self.guard = guard
        self.audit = audit
        self.device_prefix = device_prefix
        self._policies = PolicyCache(device_prefix)
        # Publish-rate buckets of device tokens, by (key, device), least recently used last.
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()

    def may_publish(self, caller: DeviceCaller, rate: float) -> bool:
        """[limits] max_publish_rate for a device over HTTP, as for its MQTT session."""
        if not rate:
            return True
        name = (caller.key.key, caller.device_id)
        allowed, self._buckets[name] = take_token(self._buckets.get(name), rate,
                                                  time.monotonic())
        self._buckets.move_to_end(name)
        if len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)
        return allowed

    def check_not_banned(self, source: Source) -> None:
        if self.guard is None:
            return
        now = time.monotonic()
        until = self.guard.banned_until(source.client_ip, now)
        if until is not None:
            self.guard.refused(source.client_ip)
            raise too_many("too many failed attempts from this address; try again later",
                           max(1, int(until - now + 0.999)))

    def failed(self, source: Source, event: str, reason: str, **fields: object) -> ApiError:
        """Count a failed token or device login against its source; the 401 to raise."""
        self.audit.from_source(event, client_ip=source.client_ip, peer_ip=source.peer_ip,
                               listener="api", reason=reason, **fields)
        if self.guard is not None:
            now = time.monotonic()
            until = self.guard.record_failure(source.client_ip, now)
            if until is not None:
                self.audit.event("ban", client_ip=source.client_ip, peer_ip=source.peer_ip,
                                 listener="api", reason=f"banned for {until - now:.0f}s")
        return unauthorized(reason)

    async def caller(self, authorization: str | None, source: Source) -> Caller:
        """The caller of a request from its Authorization header (401 if none is valid)."""
        self.check_not_banned(source)
        if not authorization:
            raise unauthorized("missing token: send 'Authorization: Bearer TOKEN'")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise self.failed(source, "api_refused", "invalid Authorization header: "
                              "expected 'Bearer TOKEN'")
        now = datetime.now(UTC)
        if token.startswith(DEVICE + "."):
            found = await self.keystore.device_token_lookup(token, now)
            if found is None:
                raise self.failed(source, "api_refused", "invalid or expired device token")
            return self.device(found.facts, found.device_id, source, now,
                               event="api_refused")
        admin = await self.keystore.check_token(token, now) \
            if token.startswith(ADMIN + ".") else None
        if admin is None:
            raise self.failed(source, "api_refused", "invalid, revoked or expired token")
        return Admin(admin)

    def device(self, found: ConnectLookup, device_id: str, source: Source, now: datetime,
               *, event: str) -> DeviceCaller:
        """A device's standing under its key as of now, checked like a CONNECT
        (docs/access.md#connect steps 3-7); a refusal is a counted 401 naming the reason."""
        key = found.key
        if key is None:
            raise self.failed(source, event, "invalid key or secret")
        facts = policy.ConnectFacts(key=key, now=now, device_registered=found.device_registered,
                                    device_in_scope=found.device_in_scope,
                                    client_ip=source.client_ip, will_topic=None)
        decision = policy.check_connect(facts, None)
        if not decision.allowed:
            raise self.failed(source, event, f"refused: {decision.reason}", key=key.key,
                              client_id=device_id, app=key.app_id)
        return DeviceCaller(key, device_id, self._policies.get(key, found.scope))
