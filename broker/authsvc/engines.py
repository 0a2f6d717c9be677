"""The engines' management APIs: closing connections and dropping the subscriptions a
client keeps between connections (docs/cluster.md#revocation).

* RabbitMQ (management plugin). A key's connections are closed by user name
  (``/api/connections/username/K``: the connection tracker, immediate and cluster-wide).
  A client id's connection is found in the connection list and closed by name, both of
  which RabbitMQ serves from statistics, a second or a few after the connection opened:
  a caller that finds nothing asks again (broker.authsvc.revoker). A client's
  subscriptions are bindings of its queues ``mqtt-subscription-<client id>qos0|1``.
* EMQX (REST API v5): clients by user name; a client id's session is discarded with the
  client (``DELETE /api/v5/clients/{clientid}``).

Each API is a list of base URLs of the cluster's nodes, tried in order until one answers.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from broker.authsvc.decisions import QUEUE_PREFIX, session_queues
from keystore.errors import KeybrokerError

logger = logging.getLogger(__name__)

TIMEOUT = 5.0  # seconds for one call to an engine
PAGE = 1000  # EMQX clients per page


class EngineError(KeybrokerError):
    """No node of the engine's API answered as expected."""


@dataclass(frozen=True, slots=True)
class Kicked:
    """One closed connection, for the audit log."""

    connection: str  # the engine's name for it
    key: str | None
    client_id: str | None
    client_ip: str | None


def read_secret(path: Any, what: str) -> str:
    """A password from its file (first line); one line naming the file if unreadable."""
    try:
        with open(path, encoding="utf-8") as file:
            secret = file.readline().rstrip("\r\n")
    except OSError as exc:
        raise KeybrokerError(f"{what} {str(path)!r}: {exc.strerror or exc}") from None
    if not secret:
        raise KeybrokerError(f"{what} {str(path)!r}: empty")
    return secret


class EngineApi:
    """HTTP plumbing shared by both engines: basic auth, timeouts, node fail-over."""

    name = "engine"

    def __init__(self, urls: Iterable[str], user: str, password: str) -> None:
        self.urls = tuple(url.rstrip("/") for url in urls)
        self._auth = aiohttp.BasicAuth(user, password)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            auth=self._auth, timeout=aiohttp.ClientTimeout(total=TIMEOUT))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, method: str, path: str, *, params: dict[str, str] | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """(status, parsed JSON body or None) from the first node that answers; 404 is an
        answer (nothing to close), any other failure tries the next node."""
        assert self._session is not None, "start() first"
        failures: list[str] = []
        for base in self.urls:
            try:
                async with self._session.request(method, base + path, params=params,
                                                 headers=headers) as response:
                    text = await response.text()
                    if response.status < 300 or response.status == 404:
                        return response.status, json.loads(text) if text.strip() else None
                    failures.append(f"{base}: HTTP {response.status} {text[:200]!r}")
            except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
                failures.append(f"{base}: {type(exc).__name__} {exc}")
        raise EngineError(f"{self.name} API {method} {path.split('?')[0]} failed: "
                          + "; ".join(failures))

    async def kick_key(self, key: str, reason: str) -> list[Kicked]:
        """Close every connection of the key (user name), on any node."""
        raise NotImplementedError

    async def kick_clients(self, client_ids: set[str], reason: str) -> list[Kicked]:
        """Close the connections of these client ids (those the engine lists by now)."""
        raise NotImplementedError

    async def reset_session(self, client_id: str, vhost: str | None) -> int:
        """Drop the subscriptions the engine keeps for the client between connections
        (RabbitMQ: in ``vhost``, or wherever they are); returns how many stores existed."""
        raise NotImplementedError


class RabbitApi(EngineApi):
    name = "rabbitmq"

    async def kick_key(self, key: str, reason: str) -> list[Kicked]:
        # By user name: the tracker knows a connection at once (closing one by its name
        # needs its statistics, seconds later). Listed first, for the audit.
        path = f"/api/connections/username/{_part(key)}"
        status, found = await self.call("GET", path)
        if status == 404 or not found:
            return []
        await self.call("DELETE", path, headers={"X-Reason": f"keybroker: {reason}"})
        return [Kicked(item["name"], key, None, None) for item in found]

    async def kick_clients(self, client_ids: set[str], reason: str) -> list[Kicked]:
        # Listed from statistics: a connection a few seconds old may not be there yet.
        if not client_ids:
            return []
        _, found = await self.call(
            "GET", "/api/connections",
            params={"columns": "name,user,peer_host,client_properties"})
        out = []
        for item in found or ():
            client_id = (item.get("client_properties") or {}).get("client_id")
            if client_id in client_ids:
                status, _ = await self.call("DELETE", f"/api/connections/{_part(item['name'])}",
                                            headers={"X-Reason": f"keybroker: {reason}"})
                if status != 404:
                    out.append(Kicked(item["name"], item.get("user"), client_id,
                                      item.get("peer_host")))
        return out

    async def reset_session(self, client_id: str, vhost: str | None) -> int:
        # The subscriptions are the bindings of the client's queues: they go with them.
        if vhost is None:
            pattern = "^" + re.escape(QUEUE_PREFIX + client_id) + "qos[01]$"
            _, found = await self.call("GET", "/api/queues", params={
                "columns": "name,vhost", "name": pattern, "use_regex": "true"})
            places = [(item["vhost"], item["name"]) for item in found or ()]
        else:
            places = [(vhost, name) for name in session_queues(client_id)]
        deleted = 0
        for where, name in places:
            status, _ = await self.call("DELETE", f"/api/queues/{_part(where)}/{_part(name)}")
            deleted += status != 404
        return deleted


class EmqxApi(EngineApi):
    name = "emqx"

    async def kick_key(self, key: str, reason: str) -> list[Kicked]:
        found: list[dict[str, Any]] = []
        while True:  # every page first: kicking shifts the pages
            _, body = await self.call("GET", "/api/v5/clients", params={
                "username": key, "limit": str(PAGE), "page": str(len(found) // PAGE + 1)})
            items = (body or {}).get("data") or []
            found += items
            if len(items) < PAGE:
                break
        return [kicked for item in found
                if (kicked := await self._kick(item["clientid"], key, item.get("ip_address")))
                is not None]

    async def kick_clients(self, client_ids: set[str], reason: str) -> list[Kicked]:
        return [kicked for client_id in sorted(client_ids)
                if (kicked := await self._kick(client_id, None, None)) is not None]

    async def _kick(self, client_id: str, key: str | None, ip: str | None) -> Kicked | None:
        status, _ = await self.call("DELETE", f"/api/v5/clients/{_part(client_id)}")
        return None if status == 404 else Kicked(client_id, key, client_id, ip)

    async def reset_session(self, client_id: str, vhost: str | None) -> int:
        status, _ = await self.call("DELETE", f"/api/v5/clients/{_part(client_id)}")
        return int(status != 404)


def _part(text: str) -> str:
    """One URL path segment (RabbitMQ's "/" vhost is "%2F")."""
    return quote(text, safe="")
