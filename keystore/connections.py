"""Connection snapshots for external MQTT engines (keybroker authsvc, docs/cluster.md).

An engine such as a RabbitMQ cluster asks its questions about one connection in several
HTTP requests, which may reach different service replicas: credentials, then admission,
then each SUBSCRIBE and first PUBLISH. The replica that admits a connection records what
it was granted (key, the scope resolved at that moment, the key's topic settings by
digest, the client address); any replica answering a later request reads it back, with
the key as it is now, in one primary-key read. A scope is stored once per distinct
device list, addressed by its digest, and cached here by digest (immutable content).

An engine may also check a CONNECT's secret in a request of its own (RabbitMQ's
/auth/user) before the admission request, which carries no secret: the first records a
*credential check* (client id, key, time) that the second requires.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime

from keystore.backend import Backend, ConnectionRow
from keystore.connect import ConnectLookup, ConnectResolver, Lru
from keystore.errors import NotFoundError, ValidationError
from keystore.models import ConnectionSnapshot, CredentialCheck
from keystore.validation import validate_device_id

SCOPE_CACHE = 4096  # scopes (by digest) kept in memory


def scope_digest(devices: frozenset[str]) -> str:
    """The content address of a device list (the same list, the same digest)."""
    text = json.dumps(sorted(devices), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class ConnectionOps:
    backend: Backend
    _resolver: ConnectResolver
    _scopes: Lru[str, frozenset[str]]  # digest -> scope (KeyStore makes both)
    _digests: Lru[int, tuple[frozenset[str], str]]  # id(scope) -> (scope, digest)
    _stored: Lru[str, bool]  # digests of scopes this process has seen stored

    async def verified_lookup(self, key: str, device_id: str) -> ConnectLookup:
        """CONNECT facts (see ``connect_lookup``) of a key whose secret was checked by an
        earlier request of the same CONNECT; the key is read fresh."""
        return await self._resolver.verified_lookup(key, device_id)

    def digest_of(self, scope: frozenset[str]) -> str:
        """``scope_digest``, computed once per scope object (the resolver shares them)."""
        known = self._digests.get(id(scope))
        if known is not None and known[0] is scope:
            return known[1]
        digest = scope_digest(scope)
        self._digests.put(id(scope), (scope, digest))
        self._scopes.put(digest, scope)
        return digest

    async def record_connection(
        self, client_id: str, key: str, scope: frozenset[str] | None, policy: str,
        client_ip: str, now: datetime,
    ) -> tuple[ConnectionSnapshot, ConnectionSnapshot | None]:
        """Store what the connection of ``client_id`` was granted; returns the snapshot in
        force and the one it replaced (None for the first). A device reconnecting under
        the same grant from the same address writes nothing: its snapshot stands."""
        validate_device_id(client_id)
        if not policy:
            raise ValidationError("invalid policy digest '': must not be empty")
        digest = None if scope is None else self.digest_of(scope)
        snapshot = ConnectionSnapshot(client_id=client_id, key=key, scope=digest,
                                      policy=policy, client_ip=client_ip, created_at=now)
        current = await self.backend.connection_snapshot(client_id)
        if current is not None and current.same_grant(snapshot) and \
                current.client_ip == client_ip:
            return current, current
        # A scope's list is sent only when this process has not seen it stored.
        known = digest is not None and self._stored.get(digest) is not None
        try:
            previous = await self.backend.put_connection(
                snapshot, None if scope is None or known else tuple(scope))
        except NotFoundError:
            if not known:  # its list was sent: the device is what is missing
                raise
            # The scope was deleted since (no connection referred to it for a day).
            previous = await self.backend.put_connection(snapshot, tuple(scope or ()))
        if digest is not None:
            self._stored.put(digest, True)
        return snapshot, previous

    async def connection(self, client_id: str) -> ConnectionRow | None:
        """The snapshot of ``client_id`` with its key as it is now (None: no connection
        was admitted for it, or its key or device is gone)."""
        return await self.backend.connection_row(client_id)

    async def connection_scope(self, snapshot: ConnectionSnapshot) -> frozenset[str] | None:
        """The snapshot's scope (None: every device of the key's application). A scope
        whose list is missing raises: the caller refuses the request."""
        if snapshot.scope is None:
            return None
        scope = self._scopes.get(snapshot.scope)
        if scope is None:
            found = await self.backend.scope_devices(snapshot.scope)
            if found is None:
                raise ValidationError(f"no stored scope {snapshot.scope!r}")
            scope = found
            self._scopes.put(snapshot.scope, scope)
        return scope

    async def connections_of_key(self, key: str) -> list[ConnectionSnapshot]:
        return await self.backend.connections_of_key(key)

    async def keys_expiring(self, after: datetime, until: datetime) -> list[str]:
        """Keys whose expiry lies in (after, until]."""
        return await self.backend.keys_expiring(after, until)

    async def record_credential_check(self, client_id: str, key: str, now: datetime) -> None:
        """Remember that ``key``'s secret was checked for a CONNECT of ``client_id`` (an
        engine's first request; its admission request may follow, on any replica). A
        client id that is no device is not recorded: it cannot be admitted anyway."""
        await self.backend.put_credential_check(client_id, key, now)

    async def credential_check(self, client_id: str) -> CredentialCheck | None:
        """The last check recorded for ``client_id`` (None: none, or its device or key is
        gone)."""
        return await self.backend.credential_check(client_id)

    async def prune_connections(self, before: datetime, batch: int = 10_000) -> int:
        """Delete stored scopes that no connection refers to, stored before ``before``
        (at most ``batch``); returns how many."""
        if batch < 1:
            raise ValidationError(f"invalid prune batch {batch!r}: must be 1 or more")
        return await self.backend.prune_connections(before, batch)
