"""`keybroker authsvc`: the access-key service of a RabbitMQ or EMQX cluster
(docs/cluster.md). Stateless: every replica on the same keystore answers alike.

Shape of broker.daemon.server: ``start()`` opens the keystore, the audit log, the engines' APIs,
starts the revoker, the change-feed pruner and the HTTP listener; ``stop()`` undoes it in
reverse; ``serve()`` runs until SIGINT/SIGTERM. Only the engine's nodes may ask
(``[authsvc] allowed_peers``; anyone else gets 403). A request that fails inside is
answered ``deny`` (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST

from broker.authsvc.emqx import AUTHN_PATH, AUTHZ_PATH, EmqxHandlers
from broker.authsvc.emqx import deny as emqx_deny
from broker.authsvc.engines import EmqxApi, EngineApi, RabbitApi, read_secret
from broker.authsvc.metrics import AuthsvcMetrics, Decisions
from broker.authsvc.rabbitmq import DENY_TEXT, RabbitHandlers
from broker.authsvc.revoker import Revoker
from broker.authsvc.service import DECIDED, EMQX, RABBITMQ, AuthService
from broker.core.audit import AuditLog
from broker.core.lifecycle import serve_until_signalled
from broker.core.periodic import Periodic
from broker.core.settings import Settings
from broker.http.connections import ConnectionGuard
from broker.http.listener import SECURITY_HEADERS, WebListener, readiness
from broker.policy.addresses import contains, network_set, normalize_ip
from broker.policy.guard import BruteForceGuard
from broker.services.live import StatusRecorder
from broker.services.metrics import keystore_answers
from broker.services.prune import ChangePruner
from keystore import KeyStore
from keystore.errors import UnavailableError

logger = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # the engines' requests are a few hundred bytes
IDLE_TIMEOUT = 60.0  # seconds a connection may sit between requests


class Housekeeping(Periodic):
    """Once a second: ended bans and suppressed audit lines are written (as the daemon's
    session monitor does)."""

    name = "keybroker-authsvc-housekeeping"

    def __init__(self, audit: AuditLog, guard: BruteForceGuard | None) -> None:
        super().__init__(1.0)
        self.audit = audit
        self.guard = guard

    async def tick(self) -> None:
        self.audit.ended_bans(self.guard)
        self.audit.flush_suppressed()


def engine_apis(settings: Settings) -> dict[str, EngineApi]:
    """The engines' management APIs configured ([rabbitmq] api, [emqx] api)."""
    apis: dict[str, EngineApi] = {}
    if settings.rabbitmq_api:
        apis[RABBITMQ] = RabbitApi(settings.rabbitmq_api, settings.rabbitmq_user, read_secret(
            settings.rabbitmq_password_file, "[rabbitmq] password_file"))
    if settings.emqx_api:
        apis[EMQX] = EmqxApi(settings.emqx_api, settings.emqx_api_key, read_secret(
            settings.emqx_api_secret_file, "[emqx] api_secret_file"))
    return apis


def peer_of(request: web.Request) -> str:
    peer: Any = request.transport.get_extra_info("peername") if request.transport else None
    return (normalize_ip(str(peer[0])) or str(peer[0])) if peer else ""


class AuthServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.allowed = network_set(settings.authsvc_allowed_peers, "allowed peer")
        # The engines keep pooled keep-alive connections: no per-source cap, a generous
        # idle timeout, and a total cap so that nobody can hold every descriptor.
        self.guard = ConnectionGuard(settings.authsvc_max_connections, 0, IDLE_TIMEOUT)
        self.listener = WebListener("authsvc listener", settings.authsvc_host,
                                    settings.authsvc_port, guard=self.guard)
        self.keystore: KeyStore | None = None
        self.service: AuthService | None = None
        self.revoker: Revoker | None = None
        self._refused_peers: set[str] = set()
        self.refused_requests = 0  # from peers not in allowed_peers
        self.decisions = Decisions()
        self.metrics = AuthsvcMetrics(self)
        self._stack = contextlib.AsyncExitStack()

    async def start(self) -> None:
        settings = self.settings
        stack = self._stack
        try:
            engines = engine_apis(settings)
            self.keystore = keystore = await stack.enter_async_context(
                settings.open_keystore(create=False))
            audit = AuditLog(settings.audit_path)
            stack.callback(audit.close)
            guard = BruteForceGuard(settings.guard) if settings.guard.enabled else None
            for engine in engines.values():
                await engine.start()
                stack.push_async_callback(engine.close)
            status = StatusRecorder(keystore)
            self.service = AuthService(keystore, audit, guard, settings.device_prefix,
                                       settings.rabbitmq_exchange, engines, status,
                                       admission_window=settings.authsvc_admission_window)
            self.revoker = Revoker(keystore, engines, audit, settings.change_poll_interval)
            pruner = ChangePruner(keystore, settings.change_retention,
                                  consumed=self._applied_change_id)
            services: tuple[Periodic, ...] = (status, self.revoker, Housekeeping(audit, guard),
                                               pruner, self.metrics.probe)
            for service in services:
                await service.start()
                stack.push_async_callback(service.stop)
            await self.listener.start(self.application())
            stack.push_async_callback(self.listener.stop)
        except BaseException:
            await stack.aclose()
            raise
        if not engines:
            logger.warning("no [rabbitmq] api nor [emqx] api: revoked keys keep their live "
                           "connections, and subscriptions outlive scope changes")
        logger.info("keybroker authsvc listening: %s (keystore %s; engine APIs: %s)",
                    self.listener.url, settings.keystore_shown, ", ".join(
                        f"{name} {' '.join(api.urls)}" for name, api in engines.items())
                    or "none")

    def _applied_change_id(self) -> int:
        """The last change-feed row the revoker applied: rows up to it may be pruned."""
        return self.revoker.applied_change_id if self.revoker is not None else 0

    async def stop(self) -> None:
        await self._stack.aclose()
        self.keystore = self.service = self.revoker = None

    async def serve(self, stop: asyncio.Event | None = None,
                    on_started: Callable[[AuthServer], None] | None = None) -> None:
        """Run until SIGINT/SIGTERM (or ``stop`` is set), then stop cleanly."""
        await serve_until_signalled(self, stop, on_started)

    # --- HTTP -------------------------------------------------------------------------------

    def application(self) -> web.Application:
        assert self.service is not None
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._middleware])
        RabbitHandlers(self.service).add_routes(app, peer_of)
        EmqxHandlers(self.service, self.settings.emqx_application).add_routes(app, peer_of)
        app.router.add_get("/health", self._health)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _healthz(self, request: web.Request) -> web.Response:
        """Alive: this ran on the service's event loop."""
        return web.json_response({"status": "ok", "loopLagSeconds": self.metrics.probe.last})

    async def _readyz(self, request: web.Request) -> web.Response:
        """Ready: the keystore answers (503 otherwise: the engine would be denied)."""
        return readiness({"keystore": self.keystore is not None
                          and await keystore_answers(self.keystore)})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        peer = peer_of(request)
        response: web.StreamResponse
        self.guard.started(request.transport)
        if not contains(self.allowed, peer):
            if peer not in self._refused_peers and len(self._refused_peers) < 1000:
                self._refused_peers.add(peer)
                logger.warning("refused a request from %s: not in [authsvc] allowed_peers", peer)
            self.refused_requests += 1
            response = web.Response(status=403, text=DENY_TEXT)
            response.force_close()  # nothing more from it on this connection
        else:
            started = time.perf_counter()
            try:
                response = await handler(request)
            except web.HTTPException as exc:  # no such route, wrong method
                response = web.Response(status=exc.status, text=DENY_TEXT)
            except UnavailableError as exc:  # the keystore logs the outage once
                logger.debug("%s denied: %s", request.path, exc)
                response = _failed(request.path, 503)
            except Exception:
                logger.exception("%s failed: denied", request.path)
                response = _failed(request.path, 500)
            decided = request.get(DECIDED)
            result = "error" if decided is None else "allow" if decided else "deny"
            self.decisions.observe(request.path, result, time.perf_counter() - started)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        response.headers["Server"] = "keybroker"
        self.guard.ended(request.transport)
        return response


def _failed(path: str, status: int) -> web.Response:
    """The denial of a request that could not be decided: EMQX's deny body, else the
    status (RabbitMQ denies on any answer but 200)."""
    if path in (AUTHN_PATH, AUTHZ_PATH):
        return emqx_deny(path)
    return web.Response(status=status, text=DENY_TEXT)
