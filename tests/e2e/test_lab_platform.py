"""The lab's platform end to end, with the same functions `pom-ha lab up` runs: every daemon on every POM
server (real processes under the servers' uids), the demo campaign imported by the Common CD from CSV and
dialing through the media simulators; the agent-based (predictive) demo campaigns of two zones with a
desktop simulator of 50 bot agents per zone, whose agents take calls; then the agentless job's Campaign
Manager is SIGKILLed and dialing goes on."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pom_ha.infra.process import ProcessRecord, kill_process, stop_process
from pom_ha.infra.stack import Stack
from pom_ha.lab.platform import (
    DEMO_CAMPAIGN,
    agent_zones,
    create_agent_demo,
    create_demo,
    start_desktops,
    start_platform,
    wait_platform,
)

pytestmark = pytest.mark.integration


async def poll(check: Callable[[], Awaitable[Any]], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        await asyncio.sleep(0.1)


@pytest.fixture
async def platform(stack: Stack, topology_file: Path) -> AsyncIterator[list[ProcessRecord]]:
    recs = start_platform(stack.topo, topology_file, echo=lambda _m: None)
    try:
        yield recs
    finally:
        run_dir = stack.topo.lab_dir() / "run"
        await asyncio.gather(*(asyncio.to_thread(stop_process, r, run_dir) for r in recs if r.alive()))


async def test_lab_platform_runs_the_demo_and_survives_a_campaign_manager_kill(
    stack: Stack, topology_file: Path, platform: list[ProcessRecord]
) -> None:
    await wait_platform(stack.topo, timeout_s=90)
    said = await create_demo(stack.topo, contacts=500, calls_per_second=100, echo=lambda _m: None)
    assert "started" in said, said
    again = await create_demo(stack.topo, contacts=500, echo=lambda _m: None)
    assert "exists already" in again, "a second lab up must not create a second demo"
    jobs = await create_agent_demo(stack.topo, echo=lambda _m: None)
    assert sorted(jobs) == sorted(agent_zones(stack.topo)) and len(jobs) == min(2, len(stack.topo.zones))
    assert await create_agent_demo(stack.topo, echo=lambda _m: None) == jobs, "a second lab up: same agent jobs"
    desktops = start_desktops(stack.topo, topology_file, jobs, echo=lambda _m: None)
    platform.extend(desktops)  # stopped with the platform

    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "pom_ha.cli", "status", "--topology", str(topology_file), "--json"],
        capture_output=True, text=True, timeout=30, check=True,
    )
    table = json.loads(out.stdout.strip().splitlines()[-1])["components"]
    servers = [s.name for s in stack.topo.servers]
    for singleton in ("rule_engine", "campaign_director"):
        states = [table[singleton][s]["state"] for s in servers]
        assert states.count("MASTER") == 1 and states.count("DORMANT") == len(servers) - 1, (singleton, states)
    assert all(table["campaign_manager"][s]["state"] == "RUNNING" for s in servers)

    conn = await asyncpg.connect(stack.topo.postgres.dsn())
    try:
        for zone, agent_job in jobs.items():
            async def agents_take_calls(zone: str = zone, agent_job: int = agent_job) -> bool:
                n = await conn.fetchval(
                    "SELECT count(*) FROM agent_call_command WHERE zone = $1 AND job_id = $2 AND event = 'offered'"
                    " AND result LIKE 'ok%'", zone, str(agent_job))
                return bool(n >= 5)

            await poll(agents_take_calls, 120, f"agents of zone {zone} taking calls of job {agent_job}")
            talked = await conn.fetchval("SELECT count(*) FROM agents WHERE zone = $1 AND job_id = $2"
                                         " AND last_completion_code = 'SALE'", zone, str(agent_job))
            rate = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE code = 'NUISANCE') AS n, count(*) FILTER (WHERE code IN"
                " ('ANSWER_HUMAN', 'NUISANCE')) AS live FROM attempts WHERE job_id = $1", agent_job)
            assert rate["n"] <= 0.03 * rate["live"], f"abandon rate over the cap in zone {zone}: {dict(rate)}"
            print(f"\nzone {zone}: job {agent_job}, {dict(rate)} live/abandoned, {talked} agents wrapped up a call")
        job = await conn.fetchval(
            "SELECT j.id FROM jobs j JOIN campaigns c ON c.id = j.campaign_id WHERE c.name = $1", DEMO_CAMPAIGN)
        assert await conn.fetchval(
            "SELECT count(*) FROM contacts c JOIN jobs j ON j.list_id = c.list_id WHERE j.id = $1", job) == 500

        async def owner() -> Any:
            if await conn.fetchval("SELECT count(*) FROM attempts WHERE job_id = $1", job) < 20:
                return None
            return await conn.fetchrow("SELECT owner_server, owner_instance FROM ha_assignment"
                                       " WHERE service = 'campaign_manager' AND item = $1", f"job:{job}")

        first = await poll(owner, 90, "the demo job dialing")
        victim = next(r for r in platform if r.name == f"campaign-manager-{first['owner_server']}")
        await asyncio.to_thread(kill_process, victim)
        killed_at = await conn.fetchval("SELECT clock_timestamp()")

        async def resumed() -> Any:
            return await conn.fetchval(
                "SELECT count(*) FROM attempts WHERE job_id = $1 AND created_at > $2 AND cm_instance <> $3",
                job, killed_at, first["owner_instance"])

        await poll(resumed, 60, "dialing resumed on another Campaign Manager")
        n, distinct = await conn.fetchrow(
            "SELECT count(*), count(DISTINCT (contact_id, attempt_no)) FROM attempts WHERE job_id = $1", job)
        assert n == distinct, f"{n} attempts but {distinct} distinct (contact, attempt_no): an attempt dialed twice"

        async def no_orphans() -> bool:
            stuck = await conn.fetchval(
                "SELECT count(*) FROM attempts WHERE job_id = $1 AND state = 'dialing' AND cm_instance = $2",
                job, first["owner_instance"])
            return bool(stuck == 0)

        await poll(no_orphans, 30, "the dead CM's in-flight attempts resolved (CALL_FAILOVER)")
    finally:
        await conn.close()
