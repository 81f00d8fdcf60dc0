"""Agent-based campaigns on real PostgreSQL with real processes: Agent Managers (pom1, pom2), Rule Engines,
a media simulator and a Campaign Manager; the agents are desktop bots (``BotAgent``) in the test, speaking
the real desktop protocol to the AMs. The test is the allocator (it assigns the job to the CM itself).

* A predictive job dials for its agents: every live answer reaches an agent (or is abandoned, NUISANCE),
  the abandon rate stays within the 3 % cap.
* The AM master of the job's zone is frozen then SIGKILLed while live answers are queued for its agents:
  the new master re-offers each one or closes it AGENT_UNAVAILABLE (the CM records it NUISANCE), none is
  lost; the CM dials nothing in the zone while ``agent_zone_status.available`` is false, and dials again
  after.
* Preview: a call is dialed only after its agent accepted the preview.

Conditions are polled with deadlines, never slept for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pom_ha.desktop.client import BotAgent, BotSettings, DesktopClient
from pom_ha.domain.campaigns import validate_campaign
from pom_ha.infra.process import ProcessRecord, kill_process, stop_process
from pom_ha.infra.stack import Stack
from pom_ha.lab.daemons import start_daemon
from tests.integration.test_agent_manager import (  # noqa: F401  (fixtures)
    Managers,
    db,
    holders,
    managers,
    until,
)
from tests.integration.test_campaign_manager import (  # noqa: F401  (fixtures)
    StartCM,
    cm_health,
    cms,
    engines,
    give,
    noon_zone,
    poll,
    release_test_allocator,
    rules,
    wait_ended,
)

pytestmark = pytest.mark.integration
ZONE = "Default"
# ring times, not whole calls: a live answer's outcome is the moment the person answered (the CM then hands
# the call to an agent, who talks for the bot's talk time)
OUTCOMES = json.dumps({
    "ANSWER_HUMAN": {"weight": 0.4, "duration_ms": [300, 1200]},
    "NO_ANSWER": {"weight": 0.3, "duration_ms": [800, 2000]},
    "BUSY": {"weight": 0.2, "duration_ms": [200, 600]},
    "ANSWER_MACHINE": {"weight": 0.1, "duration_ms": [400, 1000]},
})


@pytest.fixture(scope="module")
def media(stack: Stack, topology_file: Path) -> Any:
    rec = start_daemon(stack.topo, topology_file, "pom3", "media-simulator", "--capacity", "2000", "--seed", "11",
                       "--outcomes", OUTCOMES)
    try:
        yield stack.topo.server("pom3").address, stack.topo.ports.media_simulator
    finally:
        stop_process(rec, stack.topo.lab_dir() / "run")


class Bots:
    def __init__(self, managers: Managers, job: int, n: int, *, talk_s: float, wrap_s: float,  # noqa: F811
                 prefix: str | None = None) -> None:
        prefix = prefix or f"ag{uuid.uuid4().hex[:4]}-"
        addresses = [managers.address(s) for s in ("pom1", "pom2")]
        self.ids = [f"{prefix}{i:03d}" for i in range(n)]
        self.clients: dict[str, DesktopClient] = {}
        self.agents: dict[str, BotAgent] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        settings = BotSettings(talk_s=talk_s, wrap_s=wrap_s, jitter=0.3, job_id=str(job))
        for a in self.ids:
            client = DesktopClient(addresses, a, ZONE)
            self.clients[a] = client
            self.agents[a] = BotAgent(client, settings)

    def start(self) -> None:
        for a, client in self.clients.items():
            client.start()
            self.tasks[a] = asyncio.create_task(self.agents[a].run())

    async def drop(self, agent: str) -> None:
        """The desktop goes away for good (it does not come back after the failover)."""
        self.tasks[agent].cancel()
        await self.clients[agent].close()

    def answered(self) -> int:
        return sum(b.stats.calls_answered for b in self.agents.values())

    async def close(self) -> None:
        for t in self.tasks.values():
            t.cancel()
        await asyncio.gather(*(c.close() for c in self.clients.values()), return_exceptions=True)
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


async def create_agent_job(pg: asyncpg.Connection, contacts: int, pacing: dict[str, Any]) -> int:
    tag = uuid.uuid4().hex[:8]
    definition = validate_campaign({
        "name": f"ag-it-{tag}", "contact_list": f"list-{tag}",
        "strategy": {"max_attempts": 1}, "pacing": pacing,
    })
    list_id = await pg.fetchval("INSERT INTO contact_lists (name) VALUES ($1) RETURNING id", f"list-{tag}")
    await pg.copy_records_to_table("contacts", records=[
        (list_id, f"c{i:05d}", f"+1416{int(tag, 16) % 1000:03d}{i:05d}", noon_zone()) for i in range(contacts)
    ], columns=["list_id", "contact_id", "phone", "timezone"])
    campaign = await pg.fetchval("INSERT INTO campaigns (name, definition, zone) VALUES ($1, $2::jsonb, $3)"
                                 " RETURNING id", definition.name, definition.model_dump_json(), ZONE)
    return int(await pg.fetchval("INSERT INTO jobs (campaign_id, list_id, zone) VALUES ($1, $2, $3) RETURNING id",
                                 campaign, list_id, ZONE))


async def agents_ready(pg: asyncpg.Connection, bots: Bots, job: int) -> bool:
    rows = await pg.fetch("SELECT agent_id FROM agents WHERE zone = $1 AND logged_in AND ready AND job_id = $2",
                          ZONE, str(job))
    return {r["agent_id"] for r in rows} >= set(bots.ids)


async def codes(pg: asyncpg.Connection, job: int) -> dict[str, int]:
    rows = await pg.fetch("SELECT code, count(*) AS n FROM attempts WHERE job_id = $1 AND state = 'completed'"
                          " GROUP BY code", job)
    return {r["code"]: int(r["n"]) for r in rows}


async def offers_of(pg: asyncpg.Connection, job: int) -> list[asyncpg.Record]:
    return list(await pg.fetch(
        "SELECT id, ref, agent_id, applied_at, result, reoffered_from FROM agent_call_command"
        " WHERE job_id = $1 AND event = 'offered' ORDER BY id", str(job)))


async def test_predictive_job_dials_for_its_agents(stack: Stack, db: asyncpg.Connection,  # noqa: F811
                                                  managers: Managers, cms: StartCM) -> None:  # noqa: F811
    job = await create_agent_job(db, 240, {"kind": "predictive"})
    bots = Bots(managers, job, 10, talk_s=0.6, wrap_s=0.2)
    bots.start()
    try:
        await until(lambda: agents_ready(db, bots, job), "10 bots logged in, ready, attached to the job", 30)
        rec, instance = await cms("pom1")
        await give(db, job, "pom1", instance)

        async def health_shows_agents() -> dict[str, Any] | None:
            jobs = (await cm_health(stack.topo.server("pom1").address))["campaign_manager"]["jobs"]
            agents: dict[str, Any] | None = jobs.get(str(job), {}).get("agents")
            return agents if agents and agents.get("handed_to_agents", 0) >= 10 else None
        agents = await poll(health_shows_agents, 60, "the CM's /health showing calls handed to agents")
        assert agents["zone"] == ZONE and agents["available"] and agents["abandon_cap"] == 0.03, agents
        assert agents["abandon_rate"] is None or agents["abandon_rate"] <= 0.03, agents
        assert await wait_ended(db, job, 120, [rec]) == "Completed"
        by_code = await codes(db, job)
        live = by_code.get("ANSWER_HUMAN", 0) + by_code.get("NUISANCE", 0)
        rate = by_code.get("NUISANCE", 0) / live
        offers = await offers_of(db, job)
        ok = [o for o in offers if (o["result"] or "").startswith("ok")]
        # every live answer that an agent took is one offer the AM applied, and one call a bot answered
        assert len(ok) == by_code.get("ANSWER_HUMAN", 0), (len(ok), by_code)
        assert {o["ref"] for o in ok} == {r["call_id"] for r in await db.fetch(
            "SELECT call_id FROM attempts WHERE job_id = $1 AND code = 'ANSWER_HUMAN'", job)}
        await until(lambda: _true(bots.answered() >= len(ok)), "the bots answered every call handed to them", 10)
        assert live >= 60, by_code
        assert rate <= 0.03, f"abandon rate {rate:.2%} over the cap: {by_code}"
        assert all(o["applied_at"] is not None for o in offers), "an offer left pending"
        busy = await db.fetchval(
            "SELECT count(*) FROM agent_call_command WHERE job_id = $1 AND event = 'offered' AND result LIKE 'ok%'"
            " AND agent_id = ANY($2::text[])", str(job), bots.ids)
        assert busy == len(ok)
        await no_runner_crash(rec)
        print(f"\npredictive job, 10 agents: {by_code}; abandon rate {rate:.2%}; {len(ok)} calls to agents")
    finally:
        await bots.close()


async def no_runner_crash(rec: ProcessRecord) -> None:
    """The CM's job runner never crashed (a restart would resolve the job's calls in flight CALL_FAILOVER)."""
    text = await asyncio.to_thread(Path(rec.log).read_text, errors="replace")
    crashes = [line for line in text.splitlines() if "runner crashed" in line]
    assert not crashes, crashes[0][:3000]


async def _true(value: bool) -> bool:
    return value


async def test_am_failover_queued_offers_and_no_dialing_while_unavailable(
    stack: Stack, db: asyncpg.Connection, managers: Managers, cms: StartCM, pg_dsn: str,  # noqa: F811
) -> None:
    await db.execute("UPDATE pim_config SET value = '3000' WHERE key = 'AppServerWaitTimeOut'")
    # answers ring longer than the agents talk: most agents wait Idle with a dial ringing for them, so live
    # answers are offered to them while their AM is frozen
    job = await create_agent_job(db, 400, {"kind": "progressive"})
    bots = Bots(managers, job, 12, talk_s=0.3, wrap_s=0.1)
    bots.start()
    watch = ZoneWatch(await asyncpg.connect(pg_dsn))
    try:
        await until(lambda: agents_ready(db, bots, job), "12 bots logged in, ready, attached to the job", 30)
        master, epoch = (await holders(db))[ZONE]
        rec, instance = await cms("pom1")
        await give(db, job, "pom1", instance)
        await until(lambda: _enough_calls(db, job, 20), "20 calls handed to agents before the failover", 60)
        watch.start()
        victim = managers.procs[master]
        os.kill(victim.pid, signal.SIGSTOP)  # frozen: offers the CM makes now stay pending
        try:
            await until(lambda: _pending(db, job, 2), "live answers queued for agents of the frozen AM", 15)
            pending = await db.fetch("SELECT id, agent_id FROM agent_call_command WHERE job_id = $1"
                                     " AND event = 'offered' AND applied_at IS NULL ORDER BY id", str(job))
            # the desktops of half the agents calls are queued for never come back: after AppServerWaitTimeOut
            # those agents are unnailed and detached, so their calls must go to another agent or be closed
            gone = sorted({r["agent_id"] for r in pending[: max(1, len(pending) // 2)]})
            for a in gone:
                await bots.drop(a)
        finally:
            kill_process(victim)
        queued = {r["id"] for r in await db.fetch(
            "SELECT id FROM agent_call_command WHERE job_id = $1 AND event = 'offered' AND applied_at IS NULL",
            str(job))}

        async def taken_over() -> bool:
            h = (await holders(db)).get(ZONE)
            row = await db.fetchrow("SELECT available, epoch FROM agent_zone_status WHERE zone = $1", ZONE)
            return h is not None and h[1] > epoch and row is not None and row["available"] and row["epoch"] == h[1]
        await until(taken_over, f"{ZONE} taken over by the other AM and available", 30)
        assert await wait_ended(db, job, 150, [rec]) == "Completed"
        await watch.stop()

        # every queued call: applied by the new master (to its agent or re-offered to another) or closed
        rows = {r["id"]: r for r in await offers_of(db, job)}
        outcomes = {"ok": 0, "reoffered": 0, "closed": 0}
        attempts = {r["call_id"]: r["code"] for r in await db.fetch(
            "SELECT call_id, code FROM attempts WHERE job_id = $1", job)}
        for cid in queued:
            r = rows[cid]
            assert r["applied_at"] is not None, f"queued offer {cid} never resolved"
            result = r["result"] or ""
            if result.startswith("ok"):
                outcomes["reoffered" if r["reoffered_from"] else "ok"] += 1
                assert attempts[r["ref"]] == "ANSWER_HUMAN", (r, attempts[r["ref"]])
                assert r["agent_id"] not in gone
            else:
                assert result.startswith("closed: AGENT_UNAVAILABLE") or result.startswith("refused"), result
                outcomes["closed"] += 1
                assert attempts[r["ref"]] == "NUISANCE", (r, attempts[r["ref"]])
        assert outcomes["reoffered"] + outcomes["closed"] >= 1, outcomes  # the dropped agents' calls moved
        # no attempt of the job was written while the zone was unavailable (one dial-loop tick of grace:
        # a tick that read "available" just before the new master wrote false)
        assert watch.windows, "the zone was never seen unavailable"
        for start, end in watch.windows:
            during = await db.fetchval(
                "SELECT count(*) FROM attempts WHERE job_id = $1"
                " AND created_at > $2::timestamptz + interval '200 milliseconds' AND created_at < $3", job, start, end)
            assert during == 0, f"{during} attempts written while {ZONE} was unavailable ({start} .. {end})"
        after = await db.fetchval("SELECT count(*) FROM attempts WHERE job_id = $1 AND created_at > $2",
                                  job, watch.windows[-1][1])
        assert after > 0, "dialing never resumed after the takeover"
        await no_runner_crash(rec)
        print(f"\nqueued at the AM kill: {len(queued)} -> {outcomes}; unavailable windows "
              f"{[(e - s).total_seconds() for s, e in watch.windows]} s; {await codes(db, job)}")
    finally:
        await watch.stop()
        await bots.close()
        await db.execute("UPDATE pim_config SET value = '30000' WHERE key = 'AppServerWaitTimeOut'")


async def _enough_calls(pg: asyncpg.Connection, job: int, n: int) -> bool:
    return int(await pg.fetchval("SELECT count(*) FROM agent_call_command WHERE job_id = $1 AND event = 'offered'"
                                 " AND result LIKE 'ok%'", str(job))) >= n


async def _pending(pg: asyncpg.Connection, job: int, n: int) -> bool:
    return int(await pg.fetchval("SELECT count(*) FROM agent_call_command WHERE job_id = $1 AND event = 'offered'"
                                 " AND applied_at IS NULL", str(job))) >= n


class ZoneWatch:
    """Polls ``agent_zone_status`` every 10 ms; ``windows`` = (false since, true again since) on the
    database clock."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.windows: list[tuple[datetime, datetime]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        down: datetime | None = None
        while True:
            row = await self.conn.fetchrow("SELECT available, since FROM agent_zone_status WHERE zone = $1", ZONE)
            if row is not None and not row["available"] and down is None:
                down = row["since"]
            elif row is not None and row["available"] and down is not None:
                self.windows.append((down, row["since"]))
                down = None
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if not self.conn.is_closed():
            await self.conn.close()


async def test_preview_dials_only_after_accept(stack: Stack, db: asyncpg.Connection,  # noqa: F811
                                               managers: Managers, cms: StartCM) -> None:  # noqa: F811
    job = await create_agent_job(db, 30, {"kind": "preview"})
    bots = Bots(managers, job, 4, talk_s=0.3, wrap_s=0.1)
    bots.start()
    try:
        await until(lambda: agents_ready(db, bots, job), "4 bots ready on the preview job", 30)
        rec, instance = await cms("pom1")
        await give(db, job, "pom1", instance)
        assert await wait_ended(db, job, 90, [rec]) == "Completed"
        previews = await db.fetch("SELECT ref, agent_id, applied_at, result FROM agent_call_command"
                                  " WHERE job_id = $1 AND event = 'preview_offered'", str(job))
        accepted = sum(b.stats.previews_accepted for b in bots.agents.values())
        assert len(previews) >= 30 and accepted >= 30, (len(previews), accepted)
        # every attempt's call was first offered as a preview, applied to an agent before it was dialed
        rows = await db.fetch(
            "SELECT a.call_id, a.code, p.applied_at FROM attempts a LEFT JOIN agent_call_command p"
            " ON p.ref = a.call_id AND p.event = 'preview_offered' WHERE a.job_id = $1", job)
        assert all(r["applied_at"] is not None for r in rows), rows
        follow = await db.fetch("SELECT event, count(*) AS n FROM agent_call_command WHERE job_id = $1"
                                " AND event IN ('answered', 'released') GROUP BY event", str(job))
        by_code = await codes(db, job)
        answered = {r["event"]: int(r["n"]) for r in follow}
        assert answered.get("answered", 0) == by_code.get("ANSWER_HUMAN", 0), (answered, by_code)
        assert "NUISANCE" not in by_code
        print(f"\npreview job: {by_code}; follow-ups {answered}; previews accepted {accepted}")
        follow_after = await db.fetchval(
            "SELECT count(*) FROM agent_call_command f JOIN agent_call_command p ON p.ref = f.call_id"
            " AND p.event = 'preview_offered' WHERE f.job_id = $1 AND f.event IN ('answered', 'released')"
            " AND f.created_at < p.applied_at", str(job))
        assert follow_after == 0, "a preview's call ended before its agent had the preview"
        await no_runner_crash(rec)
    finally:
        await bots.close()
