"""What `keybroker authsvc` counts, and ``GET /metrics``, ``/healthz`` and ``/readyz`` on
its listener (docs/observability.md#keybroker-authsvc), the same endpoints as the daemon's.

The service's middleware times every engine request and counts it by engine, route and
result (``allow``, ``deny``, or ``error`` when it could not be decided and was denied);
the revoker counts the connections it closed through each engine's API and the attempts
that failed. Label values come from fixed sets (the six contract routes, two engines):
never a key, client id or topic.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.authsvc.emqx import AUTHN_PATH, AUTHZ_PATH
from broker.authsvc.revoker import Revoker
from broker.authsvc.service import EMQX, RABBITMQ, AuthService
from broker.core.counters import Buckets
from broker.services.metrics import LoopProbe, health_families

ROUTES: dict[str, tuple[str, str]] = {
    "/auth/user": (RABBITMQ, "user"),
    "/auth/vhost": (RABBITMQ, "vhost"),
    "/auth/resource": (RABBITMQ, "resource"),
    "/auth/topic": (RABBITMQ, "topic"),
    AUTHN_PATH: (EMQX, "authn"),
    AUTHZ_PATH: (EMQX, "authz"),
}
RESULTS = ("allow", "deny", "error")


class Decisions:
    """Engine requests by (engine, route, result), and how long each took."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], int] = {}
        self.latency = Buckets()

    def observe(self, path: str, result: str, seconds: float) -> None:
        route = ROUTES.get(path)
        if route is None:  # not a contract route: health, metrics, unknown paths
            return
        key = (*route, result)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.latency.observe(seconds)


class Observed(Protocol):
    """What the collector reads off the running service (broker.authsvc.server)."""

    decisions: Decisions
    refused_requests: int
    revoker: Revoker | None
    service: AuthService | None


class AuthsvcCollector(Collector):
    def __init__(self, server: Observed, probe: LoopProbe) -> None:
        self.server = server
        self.probe = probe

    def collect(self) -> Iterator[Metric]:
        server = self.server
        decisions = CounterMetricFamily(
            "keybroker_authsvc_decisions", "Engine requests answered, by engine, contract "
            "route and result (error: could not be decided, denied)",
            labels=["engine", "route", "result"])
        for engine, route in ROUTES.values():
            for result in RESULTS:
                decisions.add_metric([engine, route, result],
                                     server.decisions.counts.get((engine, route, result), 0))
        yield decisions
        yield server.decisions.latency.family("keybroker_authsvc_decision_seconds",
                                              "Engine request received to answer written")
        revoker = server.revoker
        kicks = CounterMetricFamily("keybroker_authsvc_kicks", "Connections closed through "
                                    "an engine's API, and failed attempts",
                                    labels=["engine", "result"])
        if revoker is not None:
            for engine in sorted(revoker.engines):
                kicks.add_metric([engine, "closed"], revoker.kicks.get(engine, 0))
                kicks.add_metric([engine, "failed"], revoker.kick_failures.get(engine, 0))
        yield kicks
        refused = CounterMetricFamily("keybroker_authsvc_refused_peers",
                                      "Requests refused: the peer is not in allowed_peers")
        refused.add_metric([], server.refused_requests)
        yield refused
        if server.service is not None:
            yield from health_families(server.service.guard, server.service.audit, revoker,
                                       self.probe)


class AuthsvcMetrics:
    """The service's registry and loop probe."""

    def __init__(self, server: Observed) -> None:
        self.probe = LoopProbe()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AuthsvcCollector(server, self.probe))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
