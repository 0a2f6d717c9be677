"""The API's listener: an aiohttp application run inside the daemon's event loop
(``web.AppRunner`` + ``TCPSite``), and the middleware every response goes through.

The middleware resolves the client address (X-Forwarded-For only from trusted proxies),
refuses path tricks (``..`` segments, encoded slashes) before routing looks at ids, turns
every error into Losant's ``{"type", "message"}`` shape with the right status, adds the
security headers, and answers CORS only for configured origins.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from aiohttp.typedefs import Handler

from broker.api.callers import Source
from broker.api.context import SOURCE, Api
from broker.api.errors import ApiError, bad_request, from_keystore
from broker.api.routes import ROUTES, endpoint
from broker.core.clientip import client_ip_from_forwarded
from broker.core.settings import Settings
from broker.core.tls import ssl_context
from broker.http.connections import ConnectionGuard
from broker.http.listener import SECURITY_HEADERS, WebListener
from broker.policy.addresses import TrustedProxies, normalize_ip
from keystore.errors import KeybrokerError

logger = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024
CORS_METHODS = "GET, POST, PATCH, DELETE"
CORS_HEADERS = "Authorization, Content-Type, Accept, Accept-Version"
HTTP_ERRORS = {
    404: ("NotFound", "no such route: {method} {path}"),
    405: ("MethodNotAllowed", "method {method} is not allowed on {path}"),
    413: ("PayloadTooLarge", f"body over {MAX_BODY // 1024 // 1024} MiB"),
}


def _error(exc: ApiError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers)


def check_path(raw_path: str) -> None:
    """Refuse dot segments and encoded separators anywhere in the path (also encoded):
    an id must never be able to name something else."""
    for segment in raw_path.split("?", 1)[0].split("/"):
        text = unquote(segment)
        if text in (".", "..") or any(c in text for c in "/\\\x00"):
            raise bad_request(f"invalid path segment {segment!r}")


class ApiServer:
    def __init__(self, api: Api, settings: Settings,
                 mounts: Sequence[Callable[[web.Application], None]] = ()) -> None:
        self.api = api
        self.settings = settings
        self.mounts = mounts  # more routes on the same application (the console)
        self.trusted = TrustedProxies(settings.api_trusted_proxies)
        self.cors = frozenset(settings.api_cors_origins)
        self.tls = settings.api_certfile is not None
        self.guard = ConnectionGuard(settings.api_max_connections,
                                     settings.api_max_connections_per_source,
                                     settings.api_request_timeout)
        self.listener = WebListener("API listener", settings.api_host, settings.api_port,
                                    guard=self.guard)

    def application(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._middleware],
                              handler_args={"max_field_size": 16384, "max_line_size": 32768})
        for route in ROUTES:
            # "{_lead}": Losant's client joins a base URL ending in "/" and a path starting
            # with one, so "//applications" must find the same route.
            app.router.add_route(route.method, "/{_lead:/?}" + route.path[1:],
                                 endpoint(self.api, route))
        for mount in self.mounts:
            mount(app)
        return app

    async def start(self) -> None:
        settings = self.settings
        if self.tls:
            self.listener.ssl_context = ssl_context(settings.api_certfile, settings.api_keyfile)
        await self.listener.start(self.application())

    @property
    def url(self) -> str:
        """Where the API is served (port 0 resolved)."""
        return self.listener.url

    @property
    def port(self) -> int:
        return self.listener.port

    def routes(self) -> list[web.AbstractRoute]:
        """The routes the running application serves."""
        return self.listener.routes()

    async def stop(self) -> None:
        await self.listener.stop()

    # --- every request ------------------------------------------------------------------

    def source(self, request: web.Request) -> Source:
        peer: Any = request.transport.get_extra_info("peername") if request.transport else None
        peer_ip = normalize_ip(str(peer[0])) or str(peer[0]) if peer else ""
        forwarded = request.headers.getall("X-Forwarded-For", [])
        client_ip = client_ip_from_forwarded(peer_ip, forwarded, self.trusted) \
            if forwarded else peer_ip
        https = self.tls or (self.trusted.contains(peer_ip) and
                             request.headers.get("X-Forwarded-Proto", "").lower() == "https")
        return Source(client_ip=client_ip, peer_ip=peer_ip, https=https)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        request[SOURCE] = self.source(request)
        origin = request.headers.get("Origin")
        self.guard.started(request.transport)
        try:
            if request.method == "OPTIONS":
                response: web.StreamResponse = self._preflight(origin)
            else:
                check_path(request.raw_path)
                response = await handler(request)
        except ApiError as exc:
            response = _error(exc)
        except KeybrokerError as exc:
            response = _error(from_keystore(exc))
        except web.HTTPException as exc:
            kind, text = HTTP_ERRORS.get(exc.status, ("Error", exc.reason))
            message = text.format(method=request.method, path=request.path)
            response = _error(ApiError(exc.status, kind, message))
        except Exception:
            logger.exception("API request %s %s failed", request.method, request.path)
            response = _error(ApiError(500, "InternalError", "internal error (logged)"))
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)  # the console sets its own CSP
        response.headers["Server"] = "keybroker"
        if self.tls:
            response.headers["Strict-Transport-Security"] = "max-age=31536000"
        if origin is not None and self._allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        self.guard.ended(request.transport)
        return response

    def _allowed(self, origin: str) -> bool:
        return origin in self.cors or "*" in self.cors

    def _preflight(self, origin: str | None) -> web.Response:
        if not self.cors:
            raise ApiError(405, "MethodNotAllowed", "CORS is off ([api] cors_origins)")
        if origin is None or not self._allowed(origin):
            raise ApiError(403, "Forbidden", f"origin {origin!r} is not allowed")
        return web.Response(status=204, headers={
            "Access-Control-Allow-Methods": CORS_METHODS,
            "Access-Control-Allow-Headers": CORS_HEADERS,
            "Access-Control-Max-Age": "600",
        })
