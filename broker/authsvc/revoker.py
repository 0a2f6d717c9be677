"""Live revocation for engines (docs/cluster.md#revocation): the keystore's change feed
turned into kicks through the engines' APIs.

An engine asks about a connection at CONNECT, at each SUBSCRIBE and at the first PUBLISH
of a topic, and remembers the answers: a revoked key would keep its connections, their
subscriptions and the topics they already published to. So, every ``interval`` seconds
(like the daemon's ChangeWatcher, only when the change marker moved):

* a key deactivated, deleted or expired (or past its expiry: keys are found by expiry
  each tick) has every connection of its user name closed; and again on the next ticks
  for ``REKICK`` seconds, for a CONNECT that read the key just before the change;
* a key whose topic settings changed has its connections closed too (subscriptions the
  engine granted under the old lists cannot be taken back one by one; clients reconnect
  and subscribe again under the new ones); a key whose address restriction changed, the
  connections of the clients whose address it no longer allows;
* a removed device's client id (and ``keybroker devices kick``) has its connection
  closed and its stored subscriptions dropped. RabbitMQ lists a connection by client id
  only a few seconds after it opened, so a client not found is looked for again on each
  tick for ``SEARCH`` seconds.

Every replica does this (kicks are idempotent: a closed connection is not found twice),
so revocation does not depend on any one replica being up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from broker.authsvc.decisions import policy_digest
from broker.authsvc.engines import EngineApi, EngineError, Kicked
from broker.core.audit import AuditLog
from broker.policy import check_key_address
from broker.services.live import FeedReader
from keystore import DEFAULT_CHANGE_POLL_INTERVAL, KeyStore
from keystore.models import KeyStatus

logger = logging.getLogger(__name__)

REKICK = 3.0  # seconds a revoked key's connections are closed again
SEARCH = 10.0  # seconds a client id's connection is looked for
CATCH_UP = 60.0  # seconds of expiries looked at when the service starts
KEY_CHANGES = frozenset({"key_status", "key_expiry", "key_deleted", "key_updated"})


class Revoker(FeedReader):
    name = "keybroker-authsvc-revoker"

    def __init__(self, keystore: KeyStore, engines: Mapping[str, EngineApi], audit: AuditLog,
                 interval: float = DEFAULT_CHANGE_POLL_INTERVAL) -> None:
        super().__init__(keystore, interval)
        self.engines = dict(engines)
        self.audit = audit
        self._expired_until = datetime.now(UTC)
        self._keys: dict[str, tuple[str, float]] = {}  # key -> (reason, kick until)
        self._clients: dict[str, tuple[str, float]] = {}  # client id -> (reason, search until)
        self._resets: set[str] = set()  # removed devices whose stored subscriptions go
        self._unchecked: set[str] = set()  # keys changed in the feed, not checked yet
        self.kicks: dict[str, int] = {}  # engine -> connections closed (metrics)
        self.kick_failures: dict[str, int] = {}  # engine -> failed revocation rounds

    async def start(self) -> None:
        self._expired_until = datetime.now(UTC) - timedelta(seconds=CATCH_UP)
        await super().start()

    async def tick(self) -> None:
        now = asyncio.get_running_loop().time()
        await self._read_feed(now)
        wall = datetime.now(UTC)
        for key in await self.keystore.keys_expiring(self._expired_until, wall):
            self._revoke_key(key, "key_expired", now)
        self._expired_until = wall
        await self._kick(now)

    async def _read_feed(self, now: float) -> None:
        keys = self._unchecked  # kept until checked: a failed check is tried again
        async for change in self.new_changes():
            if change.kind in KEY_CHANGES:
                keys.add(change.subject)
            elif change.kind == "device_deleted":
                self._clients[change.subject] = ("device_deleted", now + SEARCH)
                self._resets.add(change.subject)
            elif change.kind == "kick":
                self._clients[change.subject] = ("operator_kick", now + SEARCH)
            # app_deleted: its keys' and devices' own deletions are in the feed too.
        if keys:
            await self._check_keys(set(keys), now)
            keys.clear()

    async def _check_keys(self, keys: set[str], now: float) -> None:
        """The keys as they are now decide (like the daemon's ChangeWatcher)."""
        found = await self.keystore.keys_by_id(keys)
        wall = datetime.now(UTC)
        for name in keys:
            key = found.get(name)
            if key is None:
                self._revoke_key(name, "key_deleted", now)
            elif key.status != KeyStatus.ACTIVE:
                self._revoke_key(name, "key_inactive", now)
            elif key.is_expired(wall):
                self._revoke_key(name, "key_expired", now)
            else:
                digest = policy_digest(key)
                for snapshot in await self.keystore.connections_of_key(name):
                    if snapshot.policy != digest:
                        self._revoke_key(name, "key_updated", now)
                        break
                    if not check_key_address(key, snapshot.client_ip).allowed:
                        self._clients[snapshot.client_id] = ("ip_denied", now + SEARCH)

    def _revoke_key(self, key: str, reason: str, now: float) -> None:
        self._keys[key] = (reason, now + REKICK)

    async def _kick(self, now: float) -> None:
        for name in [k for k, (_, until) in self._keys.items() if until < now]:
            del self._keys[name]
        for name in [c for c, (_, until) in self._clients.items() if until < now]:
            reason, _ = self._clients.pop(name)
            logger.info("client %s (%s): no connection found to close", name, reason)
        for engine in self.engines.values():
            try:
                await self._kick_with(engine)
            except EngineError as exc:
                self.kick_failures[engine.name] = self.kick_failures.get(engine.name, 0) + 1
                logger.warning("revocation through %s failed (tried again next tick): %s",
                               engine.name, exc)

    async def _kick_with(self, engine: EngineApi) -> None:
        for key, (reason, _) in list(self._keys.items()):
            self._audit(engine, reason, await engine.kick_key(key, reason))
        by_reason: dict[str, set[str]] = {}
        for client_id, (reason, _) in self._clients.items():
            by_reason.setdefault(reason, set()).add(client_id)
        for reason, client_ids in by_reason.items():
            kicked = await engine.kick_clients(client_ids, reason)
            self._audit(engine, reason, kicked)
            for item in kicked:
                self._clients.pop(item.client_id or "", None)
        # A removed device's stored subscriptions go once its connection is closed (or
        # was not found), so that a device later added with its id inherits none.
        for client_id in [c for c in self._resets if c not in self._clients]:
            await engine.reset_session(client_id, None)
            self._resets.discard(client_id)

    def _audit(self, engine: EngineApi, reason: str, kicked: list[Kicked]) -> None:
        self.kicks[engine.name] = self.kicks.get(engine.name, 0) + len(kicked)
        for item in kicked:
            logger.info("closed %s connection %s (%s)", engine.name, item.connection, reason)
            self.audit.event("kick", key=item.key, client_id=item.client_id,
                             client_ip=item.client_ip, listener=engine.name, reason=reason,
                             connection=item.connection)
