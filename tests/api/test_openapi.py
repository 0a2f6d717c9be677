"""GET /openapi.json describes exactly the routes served, as valid OpenAPI 3.1."""

from __future__ import annotations

import re

from openapi_spec_validator import validate

from broker.api.routes import ROUTES
from tests.api.conftest import ApiEnv

LEAD = "/{_lead}"  # the optional extra leading slash (see broker.api.server)


def _served(api: ApiEnv) -> set[tuple[str, str]]:
    """(method, path) of every route the running daemon's router has."""
    server = api.daemon.server.api
    assert server is not None
    out = set()
    for route in server.routes():
        if route.resource is not None and route.resource.canonical.startswith("/console"):
            continue  # the web console: HTML pages, not part of the API
        info = route.resource.get_info() if route.resource is not None else {}
        template = info.get("formatter") or info.get("path")
        assert template is not None and template.startswith(LEAD), info
        out.add((route.method, "/" + template[len(LEAD):]))
    return out


def test_openapi_lists_every_served_route_and_nothing_else(api: ApiEnv) -> None:
    response = api.http("GET", "/openapi.json", token="")  # public: it holds no data
    assert response.status_code == 200
    doc = response.json()
    validate(doc)  # a valid OpenAPI 3.1 document
    described = {(method.upper(), path) for path, item in doc["paths"].items()
                 for method in item}
    served = _served(api)
    assert described == served
    assert described == {(r.method, r.path) for r in ROUTES}
    assert ("POST", "/applications/{applicationId}/keys") in described
    for path, item in doc["paths"].items():
        for operation in item.values():
            names = {p["name"] for p in operation["parameters"] if p["in"] == "path"}
            assert names == set(re.findall(r"{(\w+)}", path))


def test_the_published_schemas_are_the_ones_enforced(api: ApiEnv) -> None:
    doc = api.http("GET", "/openapi.json", token="").json()
    post = doc["paths"]["/applications/{applicationId}/keys"]["post"]
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert schema["additionalProperties"] is False
    for field in sorted(schema["properties"]):  # each documented field is accepted ...
        assert field in {"name", "description", "status", "filterType", "pubTopics",
                         "subTopics", "addressFilterType", "addresses", "expirationDate",
                         "deviceIds", "deviceTags"}
    refused = api.http("POST", f"/applications/{api.app_id}/keys",
                       json={"notInSchema": 1})  # ... and one it does not list is refused
    assert refused.status_code == 400 and "notInSchema" in refused.json()["message"]
