"""The REST API's input checks, in process (aiohttp test server, no database): every refusal names its field
and is answered before anything is sent or written (the integration test covers the real servers)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from pom_ha.bench.isolated import isolated_topology
from pom_ha.config import DEFAULT_TOPOLOGY, load_topology
from pom_ha.web.app import RestApi


@pytest.fixture
async def client(tmp_path: Any) -> AsyncIterator[TestClient[Any, Any]]:
    # PostgreSQL of this copy is never reached: every request below is refused before the database
    topo = isolated_topology(load_topology(DEFAULT_TOPOLOGY), block=30, lab_dir=str(tmp_path / "lab"))
    async with TestClient(TestServer(RestApi(topo, "pom1").app())) as c:
        yield c


@pytest.mark.parametrize(("method", "path", "body", "status", "field"), [
    ("POST", "/v1/jobs/abc/runtime", {"action": "pause"}, 400, "job_id"),
    ("POST", "/v1/jobs/-4/runtime", {"action": "pause"}, 400, "job_id"),
    ("POST", "/v1/jobs/1/runtime", {"action": "faster"}, 400, "action"),
    ("POST", "/v1/jobs/1/runtime", {"action": "pacing_rate"}, 400, "value"),
    ("POST", "/v1/jobs/1/runtime", {"action": "pacing_rate", "value": 100001}, 400, "value"),
    ("POST", "/v1/jobs/1/runtime", {"action": "resume", "value": 1}, 400, "value"),
    ("POST", "/v1/jobs/1/runtime", {"action": "resume", "why": "x"}, 400, "why"),
    ("GET", "/v1/zones/Nowhere/allocation", None, 404, "zone"),
    ("PUT", "/v1/zones/Zone1/allocation", {"server": 7}, 400, "server"),
    ("POST", "/v1/zones/Zone1/apply", {"server": "pom2"}, 409, "confirm"),
    ("POST", "/v1/zones/Zone1/apply", {"server": "pom2", "confirm": False}, 409, "confirm"),
    ("POST", "/v1/zones/Zone1/apply", {"server": "pom2", "confirm": 1}, 400, "confirm"),
    ("GET", "/v1/status?stale_after_s=0", None, 400, "stale_after_s"),
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


async def test_apply_without_confirmation_carries_the_warning(client: TestClient[Any, Any]) -> None:
    resp = await client.post("/v1/zones/Zone1/apply", json={"server": "pom2"})
    body = await resp.json()
    assert resp.status == 409
    assert "logs out EVERY agent of zone Zone1" in body["warning"] and "Nothing was written" in body["error"]


async def test_unknown_paths_and_methods_answer_json(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/v2/anything")
    assert resp.status == 404 and "/v2/anything" in (await resp.json())["error"]
    resp = await client.delete("/v1/zones/Zone1/allocation")
    assert resp.status == 405 and "DELETE" in (await resp.json())["error"]
