"""Measurements of scripts/bench_authsvc: the decision latency of a `keybroker authsvc`
replica per request type (each request as the engine sends it, RabbitMQ's forms or EMQX's
JSON, over one keep-alive HTTP connection, one at a time, timed from send to answer), and
CONNECT latency through an engine for two kinds of credentials taken in turns."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from .conns import _percentile
from .flows import Cred
from .keystores import BigCreds
from .mqttload import Client, MqttError


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    fields: dict[str, str]
    json: bool = False
    expect: str = "allow"
    # RabbitMQ's /auth/user request that comes first (not timed): /auth/vhost admits only
    # a client id whose secret was just checked.
    before: dict[str, str] | None = None


def cases(big: BigCreds) -> list[Case]:
    """Every request type, for a key scoped to one device and for a key whose tag query
    matches ``big.tag_matches`` devices."""
    device, key, secret = big.single[0]
    tag_key, tag_secret = big.tag_key
    tag_device = big.tag_devices[1]
    topic = {"username": key, "vhost": "/", "resource": "topic", "name": "amq.topic",
             "tags": "", "variable_map.client_id": device, "variable_map.username": key,
             "variable_map.vhost": "/"}
    user = {"username": key, "password": secret, "vhost": "/", "client_id": device}
    tag_user = {"username": tag_key, "password": tag_secret, "vhost": "/",
                "client_id": tag_device}
    return [
        Case("rabbitmq /auth/user", "/auth/user", user),
        Case("rabbitmq /auth/vhost (1-device scope)", "/auth/vhost",
             {"username": key, "vhost": "/", "ip": "127.0.0.1", "tags": "",
              "client_id": device}, before=user),
        Case(f"rabbitmq /auth/vhost ({big.tag_matches:,}-device scope)", "/auth/vhost",
             {"username": tag_key, "vhost": "/", "ip": "127.0.0.1", "tags": "",
              "client_id": tag_device}, before=tag_user),
        Case("rabbitmq /auth/resource", "/auth/resource",
             {"username": key, "vhost": "/", "resource": "queue",
              "name": f"mqtt-subscription-{device}qos1", "permission": "configure",
              "tags": "", "client_id": device}),
        Case("rabbitmq /auth/topic write", "/auth/topic",
             {**topic, "permission": "write", "routing_key": f"losant.{device}.state"}),
        Case("rabbitmq /auth/topic read", "/auth/topic",
             {**topic, "permission": "read", "routing_key": f"losant.{device}.#"}),
        Case("rabbitmq /auth/topic read (refused)", "/auth/topic",
             {**topic, "permission": "read", "routing_key": "losant.*.state"}, expect="deny"),
        Case("emqx /emqx/authn", "/emqx/authn",
             {"username": key, "password": secret, "clientid": device,
              "peerhost": "127.0.0.1"}, json=True),
        Case("emqx /emqx/authz publish", "/emqx/authz",
             {"username": key, "clientid": device, "topic": f"losant/{device}/state",
              "action": "publish"}, json=True),
        Case("emqx /emqx/authz subscribe", "/emqx/authz",
             {"username": key, "clientid": device, "topic": f"losant/{device}/#",
              "action": "subscribe"}, json=True),
    ]


async def measure_decisions(url: str, big: BigCreds, *, count: int, warmup: int = 50,
                            log: Callable[[str], None] = print) -> dict[str, Any]:
    """p50/p99 per request type; a wrong answer is counted as an error."""
    out: dict[str, Any] = {}
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for case in cases(big):
            samples: list[float] = []
            errors = 0
            for index in range(warmup + count):
                kwargs: dict[str, Any] = {"json": case.fields} if case.json else \
                    {"data": case.fields}
                if case.before is not None:
                    async with session.post(url + "/auth/user", data=case.before) as first:
                        await first.read()
                started = time.perf_counter()
                async with session.post(url + case.path, **kwargs) as response:
                    body = await response.text()
                elapsed = time.perf_counter() - started
                if index >= warmup:
                    samples.append(elapsed)
                    errors += case.expect not in body
            ordered = sorted(samples)
            out[case.name] = {
                "requests": len(samples), "errors": errors,
                "p50_ms": round(_percentile(ordered, 0.50) * 1e3, 3),
                "p99_ms": round(_percentile(ordered, 0.99) * 1e3, 3),
            }
            log(f"  {case.name:45s} p50 {out[case.name]['p50_ms']:7.3f} ms   "
                f"p99 {out[case.name]['p99_ms']:7.3f} ms"
                + (f"   {errors} wrong answers" if errors else ""))
    return out


async def compare_connects(host: str, port: int, sides: dict[str, list[Cred]], *, count: int,
                           warmup: int = 20) -> dict[str, Any]:
    """CONNECT→CONNACK latency of each side, taken in turns (one connect of each side,
    then the next round), so that load from elsewhere on the machine falls on both."""
    samples: dict[str, list[float]] = {name: [] for name in sides}
    errors: dict[str, list[str]] = {name: [] for name in sides}
    for index in range(warmup + count):
        for name, creds in sides.items():
            cred = creds[index % len(creds)]
            client = Client(host, port)
            try:
                elapsed = await client.connect(cred.client_id, cred.username, cred.password,
                                               keepalive=60, timeout=10)
                await client.disconnect()
            except (MqttError, OSError, TimeoutError) as exc:
                errors[name].append(f"{type(exc).__name__}: {exc}")
                await client.close()
                continue
            if index >= warmup:
                samples[name].append(elapsed)
    out: dict[str, Any] = {}
    for name, values in samples.items():
        ordered = sorted(values)
        out[name] = {"connects": len(values), "errors": len(errors[name]),
                     "first_error": errors[name][0] if errors[name] else None,
                     "p50_ms": round(_percentile(ordered, 0.50) * 1e3, 3),
                     "p99_ms": round(_percentile(ordered, 0.99) * 1e3, 3),
                     "mean_ms": round(statistics.fmean(ordered) * 1e3, 3) if ordered else None}
    return out
