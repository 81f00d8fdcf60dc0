"""The REST API's input checks, in process (aiohttp test server, no database): every refusal names its field
and is answered before anything is sent or written (the integration test covers the real servers). The
identity lookup (PostgreSQL) is replaced by a fixed one here: auth itself is tested on real servers in
tests/integration/test_console_auth.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from pom_ha.bench.isolated import isolated_topology
from pom_ha.config import DEFAULT_TOPOLOGY, load_topology
from pom_ha.web.app import RestApi
from pom_ha.web.auth import Identity
from pom_ha.web.routes import openapi_document


def _api(tmp_path: Any, role: str | None) -> RestApi:
    # PostgreSQL of this copy is never reached: every request below is refused before the database
    topo = isolated_topology(load_topology(DEFAULT_TOPOLOGY), block=30, lab_dir=str(tmp_path / "lab"))
    api = RestApi(topo, "pom1")

    async def fixed(_request: Any) -> Identity | None:
        return Identity("tester", role, "token") if role else None  # type: ignore[arg-type]

    api.security.authenticate = fixed  # type: ignore[method-assign]
    return api


@pytest.fixture
async def client(tmp_path: Any) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(_api(tmp_path, "admin").app())) as c:
        yield c


@pytest.mark.parametrize(("method", "path", "body", "status", "field"), [
    ("POST", "/v1/jobs/abc/runtime", {"action": "pause"}, 400, "job_id"),
    ("POST", "/v1/jobs/-4/runtime", {"action": "pause"}, 400, "job_id"),
    ("POST", "/v1/jobs/1/runtime", {"action": "faster"}, 400, "action"),
    ("POST", "/v1/jobs/1/runtime", {"action": "pacing_rate", "value": 100001}, 400, "value"),
    ("POST", "/v1/jobs/1/runtime", {"action": "resume", "why": "x"}, 400, "why"),
    ("POST", "/v1/jobs/1/runtime", {"action": "pause", "value": True}, 400, "value"),
    ("GET", "/v1/zones/Nowhere/allocation", None, 404, "zone"),
    ("PUT", "/v1/zones/Zone1/allocation", {"server": 7}, 400, "server"),
    ("POST", "/v1/zones/Zone1/apply", {"server": "pom2", "confirm": 1}, 400, "confirm"),
    ("POST", "/v1/zones/Zone1/apply", {"server": "pom2", "confirm": "yes"}, 400, "confirm"),
    ("GET", "/v1/status?stale_after_s=0", None, 400, "stale_after_s"),
    ("GET", "/v1/jobs?limit=0", None, 400, "limit"),
    ("GET", "/v1/ha/events?since_id=-1", None, 400, "since_id"),
])
async def test_refusals_name_the_field(client: TestClient[Any, Any], method: str, path: str, body: Any,
                                       status: int, field: str) -> None:
    resp = await client.request(method, path, json=body)
    got = await resp.json()
    assert (resp.status, got.get("field")) == (status, field), got
    assert got["error"]


async def test_non_finite_numbers_are_refused(client: TestClient[Any, Any]) -> None:
    # not JSON, but Python's parser reads NaN/Infinity: the value check must still refuse them
    for raw in (b'{"action": "pacing_rate", "value": NaN}', b'{"action": "pacing_rate", "value": Infinity}'):
        resp = await client.post("/v1/jobs/1/runtime", data=raw)
        got = await resp.json()
        assert (resp.status, got["field"]) == (400, "value"), got


async def test_unknown_paths_and_methods_answer_json(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/v2/anything")
    assert resp.status == 404 and "/v2/anything" in (await resp.json())["error"]
    resp = await client.delete("/v1/zones/Zone1/allocation")
    assert resp.status == 405 and "DELETE" in (await resp.json())["error"]


@pytest.mark.parametrize(("role", "method", "path", "body", "status"), [
    (None, "GET", "/v1/status", None, 401),
    (None, "GET", "/v2/unknown", None, 401),  # the API's shape is not visible without a login
    (None, "POST", "/v1/jobs/1/runtime", {"action": "pause"}, 401),
    ("viewer", "POST", "/v1/jobs/1/runtime", {"action": "pause"}, 403),
    ("operator", "PUT", "/v1/zones/Zone1/allocation", {"server": "pom2"}, 403),
    ("operator", "GET", "/v1/audit", None, 403),
])
async def test_roles_are_enforced_before_the_handler(tmp_path: Any, role: str | None, method: str, path: str,
                                                     body: Any, status: int) -> None:
    api = _api(tmp_path, role)
    api.security.record = _no_audit  # type: ignore[method-assign]
    async with TestClient(TestServer(api.app())) as c:
        resp = await c.request(method, path, json=body)
        assert resp.status == status, await resp.text()


async def _no_audit(*_a: Any, **_k: Any) -> None:
    return None


def test_openapi_covers_every_api_route_with_its_models(tmp_path: Any) -> None:
    api = _api(tmp_path, "admin")
    doc = openapi_document(api.routes(), title="t", version="1")
    assert doc["openapi"].startswith("3.1")
    runtime = doc["paths"]["/v1/jobs/{job_id}/runtime"]["post"]
    assert runtime["x-required-role"] == "operator" and {"401", "403", "400", "200"} <= set(runtime["responses"])
    body = doc["components"]["schemas"]["RuntimeBody"]
    assert body["properties"]["action"]["enum"] == ["pacing_rate", "pause", "resume"]
    assert body["additionalProperties"] is False
    # every declared API route is documented, and every operation needs a token or session but /healthz, /metrics
    declared = {(r.method.lower(), r.path) for r in api.routes() if r.api}
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert declared == documented
    assert all(op.get("security") for p, ops in doc["paths"].items() for op in ops.values()
               if p not in ("/healthz", "/metrics"))


async def test_a_route_table_plugs_in_with_models_role_and_openapi(tmp_path: Any) -> None:
    """What another module's table (e.g. admin routes) gets from one add_routes line: body validation with
    the field named, the answer checked against its model, the role enforced, the OpenAPI entry."""
    from aiohttp import web
    from pydantic import BaseModel

    from pom_ha.web.routes import API_KEY, Body, Call, Route, add_routes

    class ThingIn(Body):
        name: str
        size: int

    class ThingOut(BaseModel):
        name: str
        size: int
        by: str

    async def make(request: web.Request, call: Call) -> dict[str, Any]:
        assert request.app[API_KEY] is not None and call.identity is not None
        return {"name": call.body.name, "size": call.body.size, "by": call.identity.user}

    table = [Route("POST", "/v1/things", make, request=ThingIn, response=ThingOut, role="admin", status=201)]
    for role, status in (("operator", 403), ("admin", 201)):
        api = _api(tmp_path, role)
        api.security.record = _no_audit  # type: ignore[method-assign]
        app = api.app()
        add_routes(app, table)
        async with TestClient(TestServer(app)) as c:
            resp = await c.post("/v1/things", json={"name": "a", "size": 3})
            assert resp.status == status, await resp.text()
            if status == 201:
                assert await resp.json() == {"name": "a", "size": 3, "by": "tester"}
                bad = await c.post("/v1/things", json={"name": "a", "size": "big", "colour": 1})
                assert bad.status == 400 and (await bad.json())["field"] == "colour"
                bad = await c.post("/v1/things", json={"name": "a", "size": "big"})
                assert bad.status == 400 and (await bad.json())["field"] == "size"
                doc = await (await c.get("/v1/openapi.json")).json()
                op = doc["paths"]["/v1/things"]["post"]
                assert op["x-required-role"] == "admin" and "201" in op["responses"]
                assert doc["components"]["schemas"]["ThingIn"]["required"] == ["name", "size"]


async def test_postgres_down_is_a_503_that_says_so_and_static_files_still_serve(tmp_path: Any) -> None:
    """No database at this copy's address (nothing listens there): the real auth lookup fails -> 503 naming
    PostgreSQL (JSON for the API, a page for a browser), never a 500; the console's static files still serve;
    /healthz says the database is unreachable."""
    topo = isolated_topology(load_topology(DEFAULT_TOPOLOGY), block=30, lab_dir=str(tmp_path / "lab"))
    async with TestClient(TestServer(RestApi(topo, "pom1").app())) as c:
        resp = await c.get("/v1/status")
        body = await resp.json()
        assert resp.status == 503 and "PostgreSQL unreachable" in body["error"], body
        resp = await c.get("/jobs", headers={"Accept": "text/html"})
        assert resp.status == 503 and "Database unreachable" in await resp.text()
        resp = await c.get("/static/console.js")
        assert resp.status == 200 and "EventSource" in await resp.text()
        resp = await c.get("/login")
        assert resp.status == 200 and 'name="password"' in await resp.text()
        resp = await c.get("/healthz")  # open on loopback
        assert resp.status == 200 and (await resp.json())["database"].startswith("unreachable")
