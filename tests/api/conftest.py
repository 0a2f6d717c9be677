"""A real daemon with its HTTP API on 127.0.0.1 port 0, an admin token for all
applications, and Losant's own REST client (losant-rest) pointed at it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import requests
from losant_rest import Client as LosantClient
from losant_rest.losant_error import LosantError

from tests.support.harness import RunningBroker


@dataclass
class ApiEnv:
    daemon: RunningBroker
    url: str  # ends with "/", as users write base URLs (the client then sends "//...")
    token: str  # an admin token for every application, scope all.Application
    app_id: str  # the "default" application

    def client(self, token: str | None = None) -> LosantClient:
        return LosantClient(auth_token=self.token if token is None else token, url=self.url)

    def http(self, method: str, path: str, token: str | None = None,
             **kwargs: Any) -> requests.Response:
        """A plain HTTP request (for what Losant's client cannot send)."""
        headers = dict(kwargs.pop("headers", {}))
        bearer = self.token if token is None else token
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        return requests.request(method, self.url.rstrip("/") + path, headers=headers,
                                timeout=10, **kwargs)

    def token_for(self, name: str, **options: Any) -> str:
        _row, token = self.daemon.ks("create_token", name, **options)
        return str(token)


@pytest.fixture
def api(broker: RunningBroker) -> ApiEnv:
    api_server = broker.server.api
    assert api_server is not None
    _row, token = broker.ks("create_token", "admin")
    return ApiEnv(broker, api_server.url + "/", token, broker.ks("app").id)


def refused(call: Any, status: int, *needles: str) -> dict[str, Any]:
    """Run a Losant client call that must fail with ``status``; its error body (Losant's
    {"type", "message"}) must mention every needle."""
    with pytest.raises(LosantError) as caught:
        call()
    error = caught.value
    assert error.status == status, error.args
    body = error.data
    assert set(body) == {"type", "message"}, body
    for needle in needles:
        assert needle in body["message"], body
    return dict(body)
