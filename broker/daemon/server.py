"""The daemon: open the keystore, start KeyBroker with keybroker's plugins, stop cleanly.

Shape after uvicorn's Server: explicit ``start()`` / ``stop()``, ``bound_addresses()``
once started (port 0 resolved), and ``serve()`` that runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
from collections.abc import Callable
from functools import partial
from typing import Any

from broker.api.callers import Callers
from broker.api.context import Api
from broker.api.server import ApiServer
from broker.console.routes import add_console
from broker.console.web import Console
from broker.core import loop
from broker.core.audit import AuditLog
from broker.core.lifecycle import serve_until_signalled
from broker.core.settings import Settings
from broker.core.tls import check_tls_files
from broker.daemon.restore import load_state, restore
from broker.mqtt.broker import KeyBroker
from broker.policy.guard import BruteForceGuard
from broker.services.live import ChangeWatcher, StatusRecorder
from broker.services.metrics import Observability, keystore_answers
from broker.services.prune import ChangePruner
from broker.state.recorder import StateRecorder
from keystore import KeyStore

logger = logging.getLogger(__name__)

AUTH_PLUGIN = "broker.mqtt.plugins.AccessKeyAuthPlugin"


def amqtt_config(
    settings: Settings, keystore: Any, audit: AuditLog, guard: BruteForceGuard | None = None
) -> dict[str, Any]:
    """amqtt's config dict. Our listeners are started by KeyBroker, so amqtt's own
    "default" listener (which its BrokerConfig requires) is left unbound."""
    return {
        "listeners": {"default": {"bind": None}},
        "session_expiry_interval": settings.session_expiry or None,
        "plugins": {
            AUTH_PLUGIN: {
                "keystore": keystore,
                "device_prefix": settings.device_prefix,
                "audit": audit,
                "guard": guard,
            },
        },
    }


class BrokerServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.broker: KeyBroker | None = None
        self.keystore: KeyStore | None = None
        self.audit: AuditLog | None = None
        self.status: StatusRecorder | None = None
        self.watcher: ChangeWatcher | None = None
        self.pruner: ChangePruner | None = None
        self.api: ApiServer | None = None
        self.observability: Observability | None = None
        self.state: StateRecorder | None = None
        self._stack = contextlib.AsyncExitStack()

    async def start(self) -> None:
        settings = self.settings
        if not settings.listeners:
            raise ValueError("no listener configured")
        check_tls_files(settings)  # before anything is opened, created or bound
        raise_open_files_limit(settings.max_connections)
        try:
            self.keystore = await self._stack.enter_async_context(settings.open_keystore())
            self.audit = AuditLog(settings.audit_path)
            self._stack.callback(self.audit.close)
            guard = BruteForceGuard(settings.guard) if settings.guard.enabled else None
            snapshot = None
            if settings.persistence:  # read whole (or refused: StateError) before anything
                self.state, snapshot = await load_state(settings, self._watched_change_id)
                self._stack.push_async_callback(self.state.store.close)
            config = amqtt_config(settings, self.keystore, self.audit, guard)
            self.status = StatusRecorder(self.keystore)
            self.broker = KeyBroker(config, settings, self.audit, guard, self.state,
                                    observers=(self.status,))
            registry = self.broker.registry
            self.watcher = ChangeWatcher(registry, self.keystore, settings.change_poll_interval)
            # The stack unwinds in reverse: watcher stops, broker shuts down, then the
            # status recorder flushes what the shutdown recorded.
            await self.status.start()
            self._stack.push_async_callback(self.status.stop)
            if self.state is not None and snapshot is not None:
                # Before the listeners open; saved for the last time after the broker
                # shut down (the stack unwinds in reverse).
                since = await restore(snapshot, self.keystore, self.broker.router, registry,
                                      self.state, settings)
                await self.watcher.catch_up(since)
                await self.state.start()
                self._stack.push_async_callback(self.state.stop)
            await self.broker.start()
            self._stack.push_async_callback(self.broker.shutdown)
            await self.watcher.start()
            self._stack.push_async_callback(self.watcher.stop)
            self.pruner = ChangePruner(self.keystore, settings.change_retention,
                                       consumed=self._applied_change_id)
            await self.pruner.start()
            self._stack.push_async_callback(self.pruner.stop)
            if settings.api_enabled and settings.api_metrics:
                self.observability = Observability.of(self.broker, self.watcher)
                await self.observability.start()
                self._stack.push_async_callback(self.observability.stop)
            if settings.api_enabled:
                self.api = self._api_server(guard)
                await self.api.start()
                self._stack.push_async_callback(self.api.stop)
        except BaseException:
            await self._stack.aclose()
            raise
        addresses = " ".join(
            f"{name}={_scheme(self, name)}://{_hostport(host, port)}"
            for name, pairs in self.bound_addresses().items()
            for host, port in pairs
        )
        if self.api is not None:
            addresses += f" api={self.api.url}"
        state = f", state {self.state.store.location}" if self.state is not None else ""
        logger.info("keybroker listening: %s (keystore %s%s, event loop %s)", addresses,
                    settings.keystore_shown, state, loop.running())

    def _watched_change_id(self) -> int:
        return self.watcher.applied_change_id if self.watcher is not None else 0

    def _api_server(self, guard: BruteForceGuard | None) -> ApiServer:
        """The HTTP API on this daemon's keystore, broker and guard (one copy of state)."""
        assert self.keystore is not None and self.audit is not None and self.broker is not None
        broker, settings = self.broker, self.settings

        def protocol(device_id: str) -> str | None:
            session = broker.registry.get(device_id)
            if session is None or not session.online:
                return None
            return "5.0" if session.version == 5 else "3.1.1"

        def live_connections(key: str) -> int:
            return len(broker.registry.sessions_of_key(key))

        callers = Callers(self.keystore, guard, self.audit, settings.device_prefix)
        api = Api(settings=settings, keystore=self.keystore, audit=self.audit,
                  callers=callers, publish=broker.inbound.accepted, protocol=protocol,
                  live_connections=live_connections, ready=self.readiness,
                  observability=self.observability)
        mounts = []
        if settings.api_console:
            console = Console(api, settings.api_certfile is not None)
            mounts.append(partial(add_console, console=console))
        return ApiServer(api, settings, mounts)

    async def readiness(self) -> dict[str, bool]:
        """Is every configured listener bound, and does the keystore answer (within 2 s)?"""
        bound = self.bound_addresses()
        listeners = bool(bound) and all(bound.get(item.name) for item in self.settings.listeners)
        assert self.keystore is not None
        keystore = await keystore_answers(self.keystore)
        return {"listeners": listeners, "keystore": keystore}

    def _applied_change_id(self) -> int:
        """The last change-feed row the watcher applied (and the broker state saved, which
        a restart catches up from): rows up to it may be pruned."""
        if self.state is not None:
            return min(self._watched_change_id(), self.state.saved_position)
        return self._watched_change_id()

    def bound_addresses(self) -> dict[str, list[tuple[str, int]]]:
        if self.broker is None:
            return {}
        return self.broker.bound_addresses()

    def port(self, listener: str) -> int:
        """The port a listener is bound to (useful with port 0)."""
        return self.bound_addresses()[listener][0][1]

    async def stop(self) -> None:
        await self._stack.aclose()
        self.api = None
        self.observability = None
        self.broker = None
        self.keystore = None
        self.state = None

    async def serve(
        self,
        stop: asyncio.Event | None = None,
        on_started: Callable[[BrokerServer], None] | None = None,
    ) -> None:
        """Run until SIGINT/SIGTERM (or ``stop`` is set), then shut down cleanly."""
        await serve_until_signalled(self, stop, on_started)


# Objects allocated between two young collections. CPython's default (700) runs one
# every few CONNECTs of a busy daemon, and every tenth of those walks an older
# generation, where every session lives (a full collection at 18,000 devices pauses the
# loop for a large part of a second). Measured with `scripts/bench --only many` (18,000
# CONNECTs, 64 in flight): default 2,800/s, CONNACK p99 190 ms; 10,000: 4,100/s, p99
# 37-50 ms; 50,000: 4,100/s but p99 104-119 ms (rarer, longer middle-generation walks).
# Sessions hold few reference cycles, so collecting less often costs little memory.
GC_YOUNG_THRESHOLD = 10_000


def tune_garbage_collector() -> None:
    """For the daemon's own process (`keybroker serve`), once it is up: what start-up
    built (modules, the restored state) moves to the permanent generation, which
    collections no longer walk, and young collections run less often."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


# Descriptors besides client connections: listeners, the keystore and its WAL, the audit
# log, the API's sockets, the event loop's own.
SPARE_FILES = 200


def raise_open_files_limit(max_connections: int) -> int:
    """Raise this process's soft open-files limit to the hard one (every connection is a
    descriptor; a soft limit of 1,024 would refuse devices long before max_connections).
    Warns when max_connections cannot fit. Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard,
                           exc)
    if soft != resource.RLIM_INFINITY and max_connections + SPARE_FILES > soft:
        logger.warning(
            "[limits] max_connections = %d but this process may open only %d files: about "
            "%d connections fit (raise the hard limit, e.g. LimitNOFILE= in the systemd unit)",
            max_connections, soft, max(0, soft - SPARE_FILES))
    return soft


def _scheme(server: BrokerServer, name: str) -> str:
    listener = next(item for item in server.settings.listeners if item.name == name)
    base = "mqtt" if listener.type == "tcp" else "ws"
    return base + ("s" if listener.tls else "")


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
