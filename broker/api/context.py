"""What a handler gets: the daemon's parts (``Api``) and one request's checked inputs
(``Call``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from broker.api.callers import Admin, Caller, Callers, DeviceCaller, Source
from broker.api.errors import forbidden
from broker.core.audit import AuditLog
from broker.core.settings import Settings
from broker.services.metrics import Observability
from keystore import KeyStore

SOURCE = web.RequestKey("source", Source)  # set by the server's middleware


@dataclass(frozen=True, slots=True)
class Api:
    """The daemon's parts the API works with (one process, one loop, one copy of state)."""

    settings: Settings
    keystore: KeyStore
    audit: AuditLog
    callers: Callers
    # Route one message as an MQTT PUBLISH of the application would be: (mount, topic,
    # payload, qos). Synchronous, like the broker's own routing.
    publish: Callable[[str, str, bytes, int], None]
    # The MQTT protocol this device id is connected with now ("3.1.1", "5.0"), or None.
    protocol: Callable[[str], str | None]
    # How many MQTT connections a key (its public key) holds now: what deactivating or
    # deleting it would end.
    live_connections: Callable[[str], int]
    # Readiness checks by name (GET /readyz): every listener bound, the keystore answering.
    ready: Callable[[], Awaitable[dict[str, bool]]] | None = None
    # Metrics and the loop probe (broker.services.metrics).
    observability: Observability | None = None

    def online(self, device_id: str) -> bool:
        """Is this device connected over MQTT now?"""
        return self.protocol(device_id) is not None


@dataclass(slots=True)
class Call:
    api: Api
    request: web.Request
    operation: str  # Losant's name of the action, e.g. "applicationKeys.post"
    caller: Caller | None  # None only on public routes
    source: Source
    path: dict[str, str]
    query: dict[str, str]
    body: Any
    targets: dict[str, str] = field(default_factory=dict)  # ids for the audit line

    @property
    def app_id(self) -> str:
        return self.path["applicationId"]

    @property
    def admin(self) -> Admin:
        assert isinstance(self.caller, Admin)
        return self.caller

    def device_caller(self) -> DeviceCaller | None:
        return self.caller if isinstance(self.caller, DeviceCaller) else None

    def require_all_apps(self, what: str) -> None:
        if self.admin.token.app_id is not None:
            raise forbidden(f"token {self.admin.name!r} is for one application: it cannot "
                            f"{what}")
