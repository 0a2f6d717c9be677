"""One aiohttp application on one TCP listener inside the running event loop: the HTTP
API's (broker.api) and the access-key service's (broker.authsvc).

``start`` binds (a bind error is one line naming the listener and address), ``url`` and
``port`` give the bound address (port 0 resolved), ``stop`` ends requests in progress
within a second and cuts what is left. aiohttp sets TCP_NODELAY on every connection and
writes a small response's headers and body in one send, so an answer never waits for
Nagle's algorithm and the peer's delayed ACK (40 ms a request on Linux).
"""

from __future__ import annotations

import asyncio
import ssl

from aiohttp import web

from broker.core.bind import bind_error
from broker.http.connections import ConnectionGuard

# Headers every response gets (a handler may set its own first, e.g. the console's CSP).
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def readiness(checks: dict[str, bool]) -> web.Response:
    """A readiness probe's answer (``GET /readyz``): 200 when every check passed, else
    503, with the checks in the body."""
    ready = bool(checks) and all(checks.values())
    return web.json_response({"status": "ready" if ready else "not ready", "checks": checks},
                             status=200 if ready else 503)


class WebListener:
    def __init__(self, what: str, host: str, port: int,
                 ssl_context: ssl.SSLContext | None = None,
                 guard: ConnectionGuard | None = None) -> None:
        self.what = what  # e.g. "API listener", named in a bind error
        self.host = host
        self.requested_port = port
        self.ssl_context = ssl_context
        self.guard = guard  # connection caps and idle timeout (the API's; none: no caps)
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    async def start(self, app: web.Application) -> None:
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               shutdown_timeout=1.0)
        await runner.setup()
        assert runner.server is not None
        # Our own server (not web.TCPSite) so that every connection can pass the guard.
        factory = runner.server if self.guard is None else self.guard.factory(runner.server)
        try:
            self._server = await asyncio.get_running_loop().create_server(
                factory, self.host, self.requested_port, ssl=self.ssl_context,
                reuse_address=True)
        except OSError as exc:
            await runner.cleanup()
            raise bind_error(self.what, self.host, self.requested_port, exc) from None
        self._runner = runner
        if self.guard is not None:
            self.guard.start_ticking()

    @property
    def url(self) -> str:
        """Where the application is served (port 0 resolved)."""
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        where = f"[{host}]" if ":" in host else host
        return f"{'https' if self.ssl_context else 'http'}://{where}:{port}"

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def routes(self) -> list[web.AbstractRoute]:
        """The routes the running application serves."""
        assert self._runner is not None
        return list(self._runner.app.router.routes())

    async def stop(self) -> None:
        if self.guard is not None:
            await self.guard.stop_ticking()
        if self._server is not None:
            self._server.close()  # no new connections
            self._server = None
        if self._runner is not None:
            server = self._runner.server
            transports = [c.transport for c in server.connections] if server else []
            await self._runner.cleanup()  # requests in progress get shutdown_timeout to end
            # A TLS connection's close waits for the peer's close_notify (up to 30 s): the
            # process is stopping, so cut what is left.
            for transport in transports:
                if transport is not None:
                    transport.abort()
            self._runner = None
