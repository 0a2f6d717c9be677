"""``GET /metrics`` (Prometheus), ``GET /healthz`` and ``GET /readyz`` (probes for systemd
and Kubernetes), on the API's listener (docs/observability.md)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from broker.api.context import Call
from broker.api.errors import not_found
from broker.http.listener import readiness


async def metrics(call: Call) -> web.Response:
    observability = call.api.observability
    if observability is None:
        raise not_found("metrics are off ([api] metrics = false)")
    return web.Response(body=observability.exposition(),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(call: Call) -> dict[str, Any]:
    """Alive: this handler ran on the daemon's event loop."""
    observability = call.api.observability
    lag = observability.probe.last if observability is not None else None
    return {"status": "ok", "loopLagSeconds": lag}


async def readyz(call: Call) -> web.Response:
    """Ready: every listener bound and the keystore answering (503 otherwise)."""
    return readiness(await call.api.ready() if call.api.ready is not None else {})
