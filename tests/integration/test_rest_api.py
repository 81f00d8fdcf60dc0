"""The REST API daemon (``pom-ha run rest-api``) against real servers: PostgreSQL, the ActiveMQ master/slave
pair, Rule Engines, the media simulator and a real Campaign Manager process running a job. Conditions are
polled with deadlines, never slept for.

Run: ``POM_TEST_BLOCK=60 POM_TEST_SERVERS=postgres,activemq pytest -q tests/integration/test_rest_api.py``
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from pom_ha.infra.activemq import ActiveMQLauncher
from pom_ha.infra.process import ProcessRecord, log_tail, stop_process
from pom_ha.infra.stack import Stack
from pom_ha.lab.daemons import start_daemon
from pom_ha.web import auth
from tests.integration.test_campaign_manager import create_job, poll
from tests.integration.test_runtime_changes import (  # noqa: F401  (fixtures: platform, rules, db, cm)
    cm,
    cm_health,
    cm_on_activemq,
    db,
    platform,
    rules,
    running_job,
    stop_job,
)

pytestmark = pytest.mark.integration
REST_PORT = 7790
ZONE = "Zone1"


@pytest.fixture(scope="module")
def rest_daemon(stack: Stack, topology_file: Path) -> Iterator[ProcessRecord]:
    rec = start_daemon(stack.topo, topology_file, "pom1", "rest-api", "--port", str(REST_PORT))
    try:
        yield rec
    finally:
        stop_process(rec, stack.topo.lab_dir() / "run")


@pytest.fixture(scope="module")
async def api_token(stack: Stack) -> str:
    """Every endpoint needs a token: an admin user and its token, made through the library."""
    conn = await asyncpg.connect(stack.topo.postgres.dsn())
    try:
        if not await conn.fetchval("SELECT 1 FROM web_users WHERE name = 'rest-test'"):
            await auth.add_user(conn, "rest-test", "admin", secrets.token_urlsafe(16))
        return await auth.create_token(conn, "rest-test", "admin")
    finally:
        await conn.close()


@pytest.fixture
async def api(stack: Stack, rest_daemon: ProcessRecord, api_token: str) -> AsyncIterator[Api]:
    client = Api(f"http://{stack.topo.server('pom1').address}:{REST_PORT}")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90),
                                     headers={"Authorization": f"Bearer {api_token}"}) as http:
        client.http = http

        async def up() -> bool:
            assert rest_daemon.alive(), f"rest-api exited:\n{log_tail(rest_daemon.log)}"
            try:
                status, _ = await client.call("GET", "/health")
            except aiohttp.ClientError:
                return False
            return status == 200

        await poll(up, 60, "the REST API answers /health")
        yield client


class Api:
    def __init__(self, base: str) -> None:
        self.base = base
        self.http: aiohttp.ClientSession

    async def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        kwargs: dict[str, Any] = {"data": raw} if raw is not None else ({"json": body} if body is not None else {})
        async with self.http.request(method, self.base + path, **kwargs) as resp:
            assert resp.content_type == "application/json", (resp.status, await resp.text())
            return resp.status, await resp.json()


# ---- health, status -------------------------------------------------------------------------------------------
async def test_health_status_and_unknown_paths(api: Api, stack: Stack, db: asyncpg.Connection) -> None:  # noqa: F811
    status, body = await api.call("GET", "/health")
    assert status == 200 and body["service"] == "rest_api" and body["database"] == "ok", body
    assert body["server"] == "pom1"
    await db.execute("INSERT INTO ha_member (service, server, instance_id, state, scopes, load, seen_at)"
                     " VALUES ('rest_it', 'pom2', 'it-rest', 'MASTER', ARRAY['Zone1'], 0, now())"
                     " ON CONFLICT DO NOTHING")
    try:
        status, table = await api.call("GET", "/v1/status")
        assert status == 200, table
        assert table["servers"][:3] == [s.name for s in stack.topo.servers]
        cell = table["components"]["rest_it"]["pom2"]
        assert cell["state"] == "MASTER" and cell["scopes"] == ["Zone1"] and cell["stale"] is False
    finally:
        await db.execute("DELETE FROM ha_member WHERE service = 'rest_it'")
    status, err = await api.call("GET", "/v1/status?stale_after_s=soon")
    assert status == 400 and err["field"] == "stale_after_s", err
    status, err = await api.call("GET", "/v1/nothing")
    assert status == 404 and "/v1/nothing" in err["error"], err
    status, err = await api.call("DELETE", "/v1/status")
    assert status == 405, err


# ---- runtime changes: bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "body", "raw", "status", "field", "says"), [
    ("/v1/jobs/abc/runtime", {"action": "pause"}, None, 400, "job_id", "positive integer"),
    ("/v1/jobs/0/runtime", {"action": "pause"}, None, 400, "job_id", "positive integer"),
    ("/v1/jobs/999999/runtime", {"action": "pause"}, None, 404, "job_id", "unknown job 999999"),
    ("/v1/jobs/1/runtime", None, b"{not json", 400, "body", "not valid JSON"),
    ("/v1/jobs/1/runtime", None, b"[1, 2]", 400, "body", "JSON object"),
    ("/v1/jobs/1/runtime", None, b"", 400, "body", "JSON object body"),
    ("/v1/jobs/1/runtime", {"action": "speed_up"}, None, 400, "action", "pacing_rate, pause, resume"),
    ("/v1/jobs/1/runtime", {"value": 5}, None, 400, "action", "action is required"),
    ("/v1/jobs/1/runtime", {"action": "pacing_rate"}, None, 400, "value", "required"),
    ("/v1/jobs/1/runtime", {"action": "pacing_rate", "value": -3}, None, 400, "value", "(0, 100000]"),
    ("/v1/jobs/1/runtime", {"action": "pacing_rate", "value": 0}, None, 400, "value", "(0, 100000]"),
    ("/v1/jobs/1/runtime", {"action": "pacing_rate", "value": "fast"}, None, 400, "value", "number"),
    ("/v1/jobs/1/runtime", {"action": "pacing_rate", "value": True}, None, 400, "value", "number"),
    ("/v1/jobs/1/runtime", {"action": "pause", "value": 3}, None, 400, "value", "takes no value"),
    ("/v1/jobs/1/runtime", {"action": "pause", "colour": "red"}, None, 400, "colour", "unknown field"),
    ("/v1/jobs/1/runtime", {"action": "pause", "timeout_s": 0.1}, None, 400, "timeout_s", "[0.5, 300]"),
    ("/v1/jobs/1/runtime", {"action": "pause", "request_id": "x y"}, None, 400, "request_id", "8-64"),
])
async def test_runtime_change_bad_input_names_the_field(api: Api, path: str, body: Any, raw: bytes | None,
                                                        status: int, field: str, says: str) -> None:
    got, err = await api.call("POST", path, body, raw)
    assert (got, err.get("field")) == (status, field), err
    assert says in err["error"], err


async def test_runtime_change_refused_for_a_job_no_cm_runs(api: Api, db: asyncpg.Connection) -> None:  # noqa: F811
    job = await create_job(db, 10, 1)
    await db.execute("UPDATE jobs SET state = 'Completed' WHERE id = $1", job)
    status, err = await api.call("POST", f"/v1/jobs/{job}/runtime", {"action": "pause"})
    assert status == 409 and err["applied"] is False and "Completed" in err["error"], err


# ---- runtime changes against a real Campaign Manager -----------------------------------------------------------
async def test_runtime_changes_applied_by_the_cm(api: Api, stack: Stack, db: asyncpg.Connection,  # noqa: F811
                                                  cm: tuple[ProcessRecord, str]) -> None:  # noqa: F811
    _rec, instance = cm
    await cm_on_activemq(stack)
    job = await running_job(db, instance, 20_000, 10)
    try:
        t0 = time.monotonic()
        status, body = await api.call("POST", f"/v1/jobs/{job}/runtime", {"action": "pacing_rate", "value": 40})
        took = time.monotonic() - t0
        assert status == 200, body
        assert body["status"] == "applied" and body["applied"] is True and body["cm_server"] == "pom1", body
        assert "40" in body["detail"], body
        assert await db.fetchval("SELECT pacing_rate FROM jobs WHERE id = $1", job) == 40

        status, body = await api.call("POST", f"/v1/jobs/{job}/runtime", {"action": "pause"})
        assert status == 200 and "Running -> Paused" in body["detail"], body
        assert await db.fetchval("SELECT state FROM jobs WHERE id = $1", job) == "Paused"
        # a second pause is refused before anything is sent, with the reason
        status, err = await api.call("POST", f"/v1/jobs/{job}/runtime", {"action": "pause"})
        assert status == 409 and err["applied"] is False and "Paused" in err["error"], err
        status, body = await api.call("POST", f"/v1/jobs/{job}/runtime", {"action": "resume"})
        assert status == 200 and "Paused -> Running" in body["detail"], body

        # the same request id twice (a client retrying after a lost HTTP answer) is applied once
        rid = "it-retry-" + str(job)
        first = await api.call("POST", f"/v1/jobs/{job}/runtime", {"action": "pacing_rate", "value": 12,
                                                                    "request_id": rid})
        before = (await cm_health(stack))["runtime_changes"]
        second = await api.call("POST", f"/v1/jobs/{job}/runtime", {"action": "pacing_rate", "value": 12,
                                                                     "request_id": rid})
        after = (await cm_health(stack))["runtime_changes"]
        assert first[0] == second[0] == 200 and first[1]["detail"] == second[1]["detail"], (first, second)
        assert after["duplicates"] == before["duplicates"] + 1 and after["applied"] == before["applied"]
        print(f"\nREST pacing change round trip {took * 1000:.0f} ms (HTTP + ActiveMQ + CM fenced write)")
    finally:
        await stop_job(db, job)


async def test_change_for_a_dead_owner_is_answered_not_applied(api: Api, db: asyncpg.Connection,  # noqa: F811
                                                                cm: tuple[ProcessRecord, str]) -> None:  # noqa: F811
    """The job's recorded owner is gone: the change expires unapplied at the broker and the API says so."""
    _rec, instance = cm
    job = await running_job(db, instance, 2_000, 5)
    try:
        await db.execute("UPDATE ha_assignment SET owner_instance = 'gone0000dead' WHERE item = $1", f"job:{job}")
        status, err = await api.call("POST", f"/v1/jobs/{job}/runtime",
                                     {"action": "pacing_rate", "value": 30, "timeout_s": 1.5})
        assert status == 503 and err["applied"] is False and err["status"] == "not_applied", err
        assert "no Campaign Manager answered" in err["error"] and "not applied" in err["error"], err
        assert await db.fetchval("SELECT pacing_rate FROM jobs WHERE id = $1", job) != 30
    finally:
        await db.execute("UPDATE ha_assignment SET owner_instance = $2 WHERE item = $1", f"job:{job}", instance)
        await stop_job(db, job)


async def test_broker_failover_during_a_change_is_applied_or_refused(
    api: Api, stack: Stack, db: asyncpg.Connection, cm: tuple[ProcessRecord, str],  # noqa: F811
) -> None:
    """SIGKILL of the ActiveMQ master while changes are posted: each ends applied (held and delivered by the
    new master) or as an explicit 503 — and the CM applied exactly the ones answered applied."""
    _rec, instance = cm
    await cm_on_activemq(stack)
    brokers = [b for b in stack.launchers("activemq") if isinstance(b, ActiveMQLauncher)]
    masters = [b for b in brokers if await b.is_master()]
    assert len(masters) == 1
    master = masters[0]
    job = await running_job(db, instance, 20_000, 10)
    before = (await cm_health(stack))["runtime_changes"]
    try:
        async def post(i: int) -> tuple[int, Any]:
            return await api.call("POST", f"/v1/jobs/{job}/runtime",
                                  {"action": "pacing_rate", "value": 20 + i, "timeout_s": 25})

        tasks = [asyncio.create_task(post(i)) for i in range(3)]
        await asyncio.to_thread(master.kill)
        killed = time.monotonic()
        tasks += [asyncio.create_task(post(i)) for i in range(3, 8)]
        results = await asyncio.gather(*tasks)
        took = time.monotonic() - killed
        statuses = [s for s, _ in results]
        assert set(statuses) <= {200, 503}, results
        for status, body in results:
            if status == 503:
                assert body["applied"] is False and ("not applied" in body["error"] or "nothing was applied"
                                                     in body["error"]), body
            else:
                assert body["status"] == "applied", body
        after = (await cm_health(stack))["runtime_changes"]
        assert after["applied"] - before["applied"] == statuses.count(200)
        assert statuses.count(200) >= 5, results  # the ones posted after the kill ride out the failover
        print(f"\nActiveMQ master killed under REST changes: {statuses.count(200)} applied, "
              f"{statuses.count(503)} answered 503; all answered {took:.1f} s after the kill")
    finally:
        await stop_job(db, job)
        master.start()
        await master.wait_ready()


# ---- zone configuration ----------------------------------------------------------------------------------------
@pytest.fixture
async def zones_clean(db: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:  # noqa: F811
    # every zone's: the checks below count all apply requests, and earlier modules (the console's) apply zones too
    await db.execute("DELETE FROM zone_apply_requests")
    await db.execute("UPDATE zones SET allocated_server = NULL WHERE name = $1", ZONE)
    yield db
    await db.execute("DELETE FROM zone_apply_requests WHERE zone = $1", ZONE)
    await db.execute("UPDATE zones SET allocated_server = NULL WHERE name = $1", ZONE)


async def test_zone_save_and_save_and_apply(api: Api, zones_clean: asyncpg.Connection) -> None:
    db_ = zones_clean
    status, body = await api.call("PUT", f"/v1/zones/{ZONE}/allocation", {"server": "pom2"})
    assert status == 200 and body["allocated_server"] == "pom2" and body["applied"] is False, body
    assert await db_.fetchval("SELECT allocated_server FROM zones WHERE name = $1", ZONE) == "pom2"
    assert await db_.fetchval("SELECT count(*) FROM zone_apply_requests WHERE zone = $1", ZONE) == 0
    status, body = await api.call("GET", f"/v1/zones/{ZONE}/allocation")
    assert status == 200 and body == {"zone": ZONE, "allocated_server": "pom2", "last_apply": None}, body

    # Save and Apply without the confirmation: 409 with the warning, nothing written
    status, err = await api.call("POST", f"/v1/zones/{ZONE}/apply", {"server": "pom3"})
    assert status == 409 and err["field"] == "confirm", err
    assert "logs out EVERY agent of zone Zone1" in err["warning"], err
    assert await db_.fetchval("SELECT allocated_server FROM zones WHERE name = $1", ZONE) == "pom2"
    assert await db_.fetchval("SELECT count(*) FROM zone_apply_requests WHERE zone = $1", ZONE) == 0

    status, body = await api.call("POST", f"/v1/zones/{ZONE}/apply", {"server": "pom3", "confirm": True,
                                                                      "grace_s": 5})
    assert status == 202 and body["applied"] is True and body["previous"] == "pom2", body
    row = await db_.fetchrow("SELECT * FROM zone_apply_requests WHERE id = $1", body["apply_id"])
    assert row["zone"] == ZONE and row["allocated_server"] == "pom3" and row["grace_s"] == 5, row
    assert str(row["requested_by"]).startswith("rest-api")
    status, body = await api.call("GET", f"/v1/zones/{ZONE}/allocation")
    assert status == 200 and body["allocated_server"] == "pom3" and body["last_apply"]["id"] == row["id"], body


@pytest.mark.parametrize(("method", "path", "body", "status", "field", "says"), [
    ("GET", "/v1/zones/Atlantis/allocation", None, 404, "zone", "unknown zone 'Atlantis'"),
    ("PUT", "/v1/zones/Atlantis/allocation", {"server": "pom1"}, 404, "zone", "unknown zone 'Atlantis'"),
    ("POST", "/v1/zones/Atlantis/apply", {"server": "pom1", "confirm": True}, 404, "zone", "Atlantis"),
    ("PUT", "/v1/zones/Zone1/allocation", {"server": "pom9"}, 400, "server", "unknown server \"pom9\""),
    ("PUT", "/v1/zones/Zone1/allocation", {}, 400, "server", "server is required"),
    ("PUT", "/v1/zones/Zone1/allocation", {"server": "pom1", "apply": True}, 400, "apply", "unknown field"),
    ("POST", "/v1/zones/Zone1/apply", {"server": "pom9", "confirm": True}, 400, "server", "pom9"),
    ("POST", "/v1/zones/Zone1/apply", {"server": "pom1", "confirm": "yes"}, 400, "confirm", "true or false"),
    ("POST", "/v1/zones/Zone1/apply", {"server": "pom1", "confirm": True, "grace_s": 9000}, 400, "grace_s",
     "[0, 600]"),
])
async def test_zone_bad_input_names_it(api: Api, zones_clean: asyncpg.Connection, method: str, path: str, body: Any,
                                       status: int, field: str, says: str) -> None:
    got, err = await api.call(method, path, body)
    assert (got, err.get("field")) == (status, field), err
    assert says in err["error"], err
    assert await zones_clean.fetchval("SELECT count(*) FROM zone_apply_requests") == 0
    assert await zones_clean.fetchval("SELECT allocated_server FROM zones WHERE name = $1", ZONE) is None
