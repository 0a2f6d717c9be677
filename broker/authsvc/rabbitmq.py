"""RabbitMQ's HTTP auth backend contract (rabbitmq_auth_backend_http, as RabbitMQ 3.10's
MQTT plugin uses it; docs/cluster.md#rabbitmq), translated into AuthService calls.

Every request is a form-encoded POST (``auth_http.http_method = post``; with ``get``
RabbitMQ puts the fields, the password included, in the URL, which its debug log then
prints: a GET is refused and logged, without its URL). The answer is ``allow`` or
``deny`` as plain text. No tags are ever returned: RabbitMQ turns each tag into an
Erlang atom, and atoms are never freed, so a tag per connection (or per key) would
eventually exhaust a node's atom table; a connection's state is its snapshot instead.

=============== ============================================ ===========================
path            fields                                       decided by
=============== ============================================ ===========================
/auth/user      username, password, vhost, client_id         the secret (deny: CONNACK 4)
/auth/vhost     username, vhost, ip, client_id               admission (deny: CONNACK 5)
/auth/resource  username, resource, name, permission,        own queues, MQTT exchange
                client_id
/auth/topic     username, name, permission (read|write),     SUBSCRIBE (containment) /
                routing_key, variable_map.client_id          PUBLISH
=============== ============================================ ===========================

A request without a client id is not from the MQTT plugin (AMQP 0-9-1, STOMP, the
management UI): it is denied.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from broker.authsvc.decisions import (
    DENY_NOT_MQTT,
    DENY_RESOURCE,
    app_of_vhost,
    mqtt_form,
)
from broker.authsvc.service import DECIDED, RABBITMQ, Asker, AuthService
from broker.policy import Decision

logger = logging.getLogger(__name__)

PATHS = ("/auth/user", "/auth/vhost", "/auth/resource", "/auth/topic")
ALLOW_TEXT = "allow"
DENY_TEXT = "deny"
PeerOf = Callable[[web.Request], str]  # the asking node's address
Handler = Callable[[Asker, Mapping[str, str]], Awaitable[Decision]]


def answer(decision: Decision) -> web.Response:
    return web.Response(text=ALLOW_TEXT if decision.allowed else DENY_TEXT)


class RabbitHandlers:
    def __init__(self, service: AuthService) -> None:
        self.service = service
        self._warned_get = False

    def add_routes(self, app: web.Application, peer_of: PeerOf) -> None:
        handlers = (self.user, self.vhost, self.resource, self.topic)
        for path, handler in zip(PATHS, handlers, strict=True):
            app.router.add_post(path, self._endpoint(handler, peer_of))
            app.router.add_get(path, self.refuse_get)

    @staticmethod
    def _endpoint(handler: Handler,
                  peer_of: PeerOf) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def endpoint(request: web.Request) -> web.Response:
            form = await request.post()
            fields = {name: value for name, value in form.items() if isinstance(value, str)}
            decision = await handler(Asker(RABBITMQ, peer_of(request)), fields)
            request[DECIDED] = decision.allowed
            return answer(decision)

        return endpoint

    async def refuse_get(self, request: web.Request) -> web.Response:
        if not self._warned_get:
            self._warned_get = True
            logger.warning("RabbitMQ asked with GET (its URLs, passwords included, end up "
                           "in its debug log): set auth_http.http_method = post")
        return web.Response(status=405, text=DENY_TEXT)

    async def user(self, asker: Asker, form: Mapping[str, str]) -> Decision:
        return await self.service.check_credentials(
            asker, form.get("username"), form.get("password"), form.get("client_id", ""))

    async def vhost(self, asker: Asker, form: Mapping[str, str]) -> Decision:
        vhost = form.get("vhost", "")
        return await self.service.admit(asker, form.get("username", ""),
                                        form.get("client_id", ""), form.get("ip", ""),
                                        app_of_vhost(vhost), vhost)

    async def resource(self, asker: Asker, form: Mapping[str, str]) -> Decision:
        client_id = form.get("client_id", "")
        if not client_id:
            return DENY_NOT_MQTT
        return await self.service.may_use(asker, form.get("username", ""), client_id,
                                          form.get("resource", ""), form.get("name", ""),
                                          form.get("permission", ""))

    async def topic(self, asker: Asker, form: Mapping[str, str]) -> Decision:
        client_id = form.get("variable_map.client_id", "")
        if not client_id:
            return DENY_NOT_MQTT
        if form.get("resource") != "topic" or form.get("name") != self.service.exchange:
            return DENY_RESOURCE
        username = form.get("username", "")
        topic = mqtt_form(form.get("routing_key", ""))
        permission = form.get("permission")
        if permission == "read":
            return await self.service.may_subscribe(asker, username, client_id, topic)
        if permission == "write":
            return await self.service.may_publish(asker, username, client_id, topic)
        return DENY_RESOURCE
