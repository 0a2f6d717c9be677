"""The HTTP API (docs/api.md): Losant-compatible management of applications, access keys
and devices, and device access over HTTP, served by the daemon on its own listener.

* ``server``: the aiohttp application inside the daemon's loop, its middleware (errors in
  Losant's shape, security headers, CORS, path checks) and the listener;
* ``routes``: the route table, one entry per Losant action, from which both the router
  and ``GET /openapi.json`` are built; ``endpoint`` runs one request through it;
* ``callers``: who is calling (admin token or device token) and what they may do;
* ``applications``, ``keys``, ``devices``, ``device_auth``: the handlers;
* ``params``, ``schemas``: query parameters and request bodies, checked before any work.
"""
