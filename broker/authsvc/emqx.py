"""EMQX 5's HTTP authentication and authorization contract (docs/cluster.md#emqx),
translated into AuthService calls.

EMQX POSTs a body built from its placeholders (JSON by default, or form-encoded):

* ``/emqx/authn``: ``username``, ``password``, ``clientid``, ``peerhost``
  (``${username}`` ...): credentials and admission in one request, so the client address
  counts in the brute-force guard for every refusal;
* ``/emqx/authz``: ``username``, ``clientid``, ``topic``, ``action`` (``publish`` or
  ``subscribe``): a PUBLISH topic, or a SUBSCRIBE filter granted by containment.

The answer is always HTTP 200 with ``{"result": "allow" | "deny"}`` (authentication adds
``"is_superuser": false``). Never ``ignore``, and never an error status: EMQX would then
ask its next source, and an EMQX whose ``authorization.no_match`` is left at ``allow``
would let the request through. A body that cannot be read is denied.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from broker.authsvc.service import DECIDED, EMQX, Asker, AuthService
from broker.policy import Decision
from broker.policy.decisions import DENY_INVALID_TOPIC

logger = logging.getLogger(__name__)

AUTHN_PATH = "/emqx/authn"
AUTHZ_PATH = "/emqx/authz"
DENY_ACTION = Decision(False, "unknown_action")
PeerOf = Callable[[web.Request], str]


def answer(decision: Decision, *, authn: bool = False) -> web.Response:
    body: dict[str, Any] = {"result": "allow" if decision.allowed else "deny"}
    if authn:
        body["is_superuser"] = False
    return web.json_response(body)


def deny(path: str) -> web.Response:
    """The answer to a request that failed (fail closed, in EMQX's shape)."""
    return answer(Decision(False, "error"), authn=path == AUTHN_PATH)


async def read_body(request: web.Request) -> dict[str, str]:
    """The fields of a JSON or form body (only string values count)."""
    raw: Mapping[str, Any]
    if request.content_type == "application/json":
        try:
            parsed = json.loads(await request.text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
        raw = parsed if isinstance(parsed, dict) else {}
    else:
        raw = await request.post()
    return {str(name): value for name, value in raw.items() if isinstance(value, str)}


class EmqxHandlers:
    def __init__(self, service: AuthService, application: str) -> None:
        self.service = service
        self.application = application  # the one application this EMQX serves

    def add_routes(self, app: web.Application, peer_of: PeerOf) -> None:
        app.router.add_post(AUTHN_PATH, self._endpoint(self.authn, peer_of, authn=True))
        app.router.add_post(AUTHZ_PATH, self._endpoint(self.authz, peer_of))

    @staticmethod
    def _endpoint(handler: Callable[[Asker, Mapping[str, str]], Awaitable[Decision]],
                  peer_of: PeerOf,
                  authn: bool = False) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def endpoint(request: web.Request) -> web.Response:
            fields = await read_body(request)
            decision = await handler(Asker(EMQX, peer_of(request)), fields)
            request[DECIDED] = decision.allowed
            return answer(decision, authn=authn)

        return endpoint

    async def authn(self, asker: Asker, body: Mapping[str, str]) -> Decision:
        return await self.service.authenticate(
            asker, body.get("username"), body.get("password"), body.get("clientid", ""),
            body.get("peerhost", ""), self.application)

    async def authz(self, asker: Asker, body: Mapping[str, str]) -> Decision:
        username, client_id = body.get("username", ""), body.get("clientid", "")
        topic, action = body.get("topic", ""), body.get("action")
        if not topic:
            return DENY_INVALID_TOPIC
        if action == "publish":
            return await self.service.may_publish(asker, username, client_id, topic)
        if action == "subscribe":
            return await self.service.may_subscribe(asker, username, client_id, topic)
        return DENY_ACTION
