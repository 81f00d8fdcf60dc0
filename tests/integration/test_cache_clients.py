"""The Campaign Manager and the Agent Manager as clients of the cache service, on the real 3-node Ignite
cluster, PostgreSQL, Rule Engines, the media simulator, a real CM and a real AM (both ``--cache on``).

In file order: the CM publishes job statistics equal to PostgreSQL's; the AM publishes agent states; every
Ignite node is SIGKILLed: the CM keeps dialing and logs "statistics frozen" once, a WRAP_UP booking a callback
completes and the desktop gets ``ERROR callback_refused`` with the cache's message; the nodes come back and
the cache is rebuilt from PostgreSQL (the test does what a cache service does): the CM's Running job passes
through Filter in Progress back to Running (a state-history trigger on ``jobs`` records every change), its
statistics come back, the Paused job keeps the rebuild's entry until it resumes (then Running -> Filter in
Progress -> Running and statistics), the AM's states and callbacks reach the cache again. The module leaves
the cluster whole. Conditions are polled with deadlines, never slept for.

Run: ``POM_TEST_BLOCK=70 POM_TEST_SERVERS=postgres,ignite .venv/bin/pytest -q -s
tests/integration/test_cache_clients.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pom_ha.cache import CacheUnavailable, OperationalCache, load_jobs, quiet_pyignite_logs
from pom_ha.desktop.client import DesktopClient, DesktopSettings
from pom_ha.desktop.protocol import AgentStateFrame, CallbackRequest, ErrorFrame, ToDesktop
from pom_ha.domain.agents import CallState
from pom_ha.infra.ignite import IgniteLauncher
from pom_ha.infra.process import ProcessRecord, log_tail, stop_process
from pom_ha.infra.stack import Stack
from pom_ha.lab.daemons import start_daemon
from tests.integration.cache_helpers import rebuild_when_lock_free
from tests.integration.test_campaign_manager import OUTCOMES, create_job, give

pytestmark = pytest.mark.integration
DEADLINE_S = 180.0  # loose: the lab machine is shared; figures are printed
CM_HTTP_PORT = 7614
AM_HTTP_PORT = 7654
ZONE = "Default"
AGENT = "cache-agent-1"
AGENT_JOB = "4242"
FIGURES: dict[str, Any] = {}
FROZEN = '"statistics frozen: the cache service does not take job statistics'  # the CM's log event, once per outage


async def until(check: Callable[[], Awaitable[Any]], what: str, deadline_s: float = DEADLINE_S) -> Any:
    t0 = time.monotonic()
    while not (value := await check()):
        assert time.monotonic() - t0 < deadline_s, f"not within {deadline_s:.0f} s: {what}"
        await asyncio.sleep(0.1)
    return value


def nodes(stack: Stack) -> list[IgniteLauncher]:
    found = [n for n in stack.launchers("ignite") if isinstance(n, IgniteLauncher)]
    assert len(found) == 3, "these tests need the 3-node lab topology"
    return found


# ---- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
async def db(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_dsn)
    yield conn
    await conn.close()


@pytest.fixture(scope="module")
async def history(db: asyncpg.Connection) -> AsyncIterator[None]:
    """Every job state change, as PostgreSQL saw it (a trigger of this module, dropped at its end)."""
    await db.execute("""
        CREATE TABLE IF NOT EXISTS test_cache_job_states (id bigserial PRIMARY KEY, job_id bigint, from_state text,
            to_state text, reason text, at timestamptz DEFAULT clock_timestamp());
        CREATE OR REPLACE FUNCTION test_cache_job_state() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO test_cache_job_states (job_id, from_state, to_state, reason)
                VALUES (NEW.id, OLD.state, NEW.state, NEW.state_reason);
            RETURN NEW;
        END $$;
        DROP TRIGGER IF EXISTS test_cache_job_state ON jobs;
        CREATE TRIGGER test_cache_job_state AFTER UPDATE OF state ON jobs FOR EACH ROW
            WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION test_cache_job_state();
    """)
    yield
    await db.execute("DROP TRIGGER IF EXISTS test_cache_job_state ON jobs; DROP FUNCTION IF EXISTS "
                     "test_cache_job_state(); DROP TABLE IF EXISTS test_cache_job_states")


async def states_of(db: asyncpg.Connection, job: int, since_id: int = 0) -> list[tuple[str, str, str | None]]:
    rows = await db.fetch("SELECT from_state, to_state, reason FROM test_cache_job_states WHERE job_id = $1"
                          " AND id > $2 ORDER BY id", job, since_id)
    return [(r["from_state"], r["to_state"], r["reason"]) for r in rows]


async def last_history_id(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT coalesce(max(id), 0) FROM test_cache_job_states"))


@pytest.fixture(scope="module")
async def cache(stack: Stack, db: asyncpg.Connection) -> AsyncIterator[OperationalCache]:
    """The test's own client; the cluster starts whole and holding a generation (the gate of every client)."""
    quiet_pyignite_logs()
    await stack.heal_ignite()
    async with OperationalCache.from_topology(stack.topo) as c:
        if await c.generation() is None:
            await rebuild_when_lock_free(db, c)
        yield c
    await stack.heal_ignite()  # the outage test killed every node: leave one whole cluster for later tests


@pytest.fixture(scope="module")
async def rules(db: asyncpg.Connection) -> AsyncIterator[None]:
    before = await db.fetchval(
        "UPDATE pim_config p SET value = '0' FROM pim_config o WHERE p.key = o.key"
        " AND p.key = 'RuleEngineMinGapBetweenAttemptsMs' RETURNING o.value")
    yield
    await db.execute("UPDATE pim_config SET value = $1 WHERE key = 'RuleEngineMinGapBetweenAttemptsMs'", before)


@pytest.fixture(scope="module")
async def release_allocator(db: asyncpg.Connection) -> AsyncIterator[None]:
    """``give`` holds the campaign_director lease as 'test': release it for later tests' real directors."""
    yield
    await db.execute("UPDATE ha_lease SET expires_at = now(), released_at = now()"
                     " WHERE service = 'campaign_director' AND holder_instance = 'test'")


@pytest.fixture(scope="module")
def dial_servers(stack: Stack, topology_file: Path, rules: None) -> Iterator[tuple[str, int]]:
    run_dir = stack.topo.lab_dir() / "run"
    recs = [start_daemon(stack.topo, topology_file, s, "rule-engine") for s in ("pom1", "pom2", "pom3")]
    recs.append(start_daemon(stack.topo, topology_file, "pom3", "media-simulator", "--time-scale", "0.01",
                             "--capacity", "2000", "--seed", "7", "--outcomes", OUTCOMES))
    try:
        yield stack.topo.server("pom3").address, stack.topo.ports.media_simulator
    finally:
        for rec in recs:
            stop_process(rec, run_dir)


@dataclass
class CM:
    rec: ProcessRecord
    instance: str

    def log(self) -> str:
        path = Path(self.rec.log)
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
async def cm(stack: Stack, topology_file: Path, db: asyncpg.Connection, dial_servers: tuple[str, int],
             cache: OperationalCache, release_allocator: None, history: None) -> AsyncIterator[CM]:
    before = await db.fetchval("SELECT instance_id FROM ha_member WHERE service = 'campaign_manager'"
                               " AND server = 'pom1'")
    rec = start_daemon(stack.topo, topology_file, "pom1", "campaign-manager", "--media",
                       f"{dial_servers[0]}:{dial_servers[1]}", "--http-port", str(CM_HTTP_PORT), "--cache", "on")
    try:
        async def running() -> str | None:
            assert rec.alive(), f"campaign manager exited:\n{log_tail(rec.log)}"
            row = await db.fetchrow("SELECT instance_id, state FROM ha_member WHERE service = 'campaign_manager'"
                                    " AND server = 'pom1'")
            ok = row is not None and row["state"] == "RUNNING" and row["instance_id"] != before
            return str(row["instance_id"]) if ok and row is not None else None

        yield CM(rec, await until(running, "the campaign manager runs", 30))
    finally:
        await db.execute("UPDATE jobs SET state = 'Stopping', ending = 'Stopped', state_reason = 'test end'"
                         " WHERE state IN ('Running', 'Paused', 'Filter in Progress', 'Queued') AND id IN"
                         " (SELECT split_part(item, ':', 2)::bigint FROM ha_assignment WHERE service ="
                         " 'campaign_manager' AND owner_instance = (SELECT instance_id FROM ha_member WHERE"
                         " service = 'campaign_manager' AND server = 'pom1'))")
        await asyncio.to_thread(stop_process, rec, stack.topo.lab_dir() / "run")


class Desk:
    def __init__(self, client: DesktopClient) -> None:
        self.client = client
        self.frames: list[ToDesktop] = []
        self.state: AgentStateFrame | None = None
        self._pump = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            frame = await self.client.events.get()
            self.frames.append(frame)
            if isinstance(frame, AgentStateFrame):
                self.state = frame

    async def wait_state(self, state: CallState) -> None:
        async def reached() -> bool:
            return self.state is not None and self.state.call_state is state

        await until(reached, f"agent in {state.value} (is {self.state})", 20)

    async def close(self) -> None:
        await self.client.close()
        self._pump.cancel()
        await asyncio.gather(self._pump, return_exceptions=True)


@dataclass
class AM:
    rec: ProcessRecord
    desk: Desk


@pytest.fixture(scope="module")
async def am(stack: Stack, topology_file: Path, db: asyncpg.Connection, cache: OperationalCache) -> AsyncIterator[AM]:
    # agents an earlier module left logged in would make the new master wait AppServerWaitTimeOut (30 s) for
    # their desktops, and their unapplied offers would be re-offered: this module starts from an empty zone
    await db.execute("DELETE FROM agents WHERE zone = $1", ZONE)
    await db.execute("UPDATE agent_call_command SET applied_at = now(), result = 'test reset'"
                     " WHERE zone = $1 AND applied_at IS NULL", ZONE)
    rec = start_daemon(stack.topo, topology_file, "pom1", "agent-manager", "--zone", ZONE, "--http-port",
                       str(AM_HTTP_PORT), "--desktop-heartbeat-ms", "250", "--cache", "on")
    desk: Desk | None = None
    try:
        async def master() -> bool:
            assert rec.alive(), f"agent manager exited:\n{log_tail(rec.log)}"
            return bool(await db.fetchval("SELECT available AND master_server = 'pom1' FROM agent_zone_status"
                                          " WHERE zone = $1", ZONE))

        await until(master, "the agent manager is master of the zone", 30)
        address = (stack.topo.server("pom1").address, stack.topo.ports.desktop)
        desk = Desk(DesktopClient([address], AGENT, ZONE, settings=DesktopSettings(reply_timeout_s=3.0)))
        desk.client.start()
        await asyncio.wait_for(desk.client.logged_in.wait(), 20)
        yield AM(rec, desk)
    finally:
        if desk is not None:
            await desk.close()
        await asyncio.to_thread(stop_process, rec, stack.topo.lab_dir() / "run")
        # leave no logged-in agent behind for a later module's master of the zone to wait for
        await db.execute("DELETE FROM agents WHERE zone = $1 AND agent_id = $2", ZONE, AGENT)


_calls = iter(range(1, 1000))


async def to_wrapup(db: asyncpg.Connection, desk: Desk) -> str:
    """A call offered to the agent (as the platform does), answered, released: the agent is in Wrapup."""
    call_id = f"{AGENT_JOB}:{next(_calls)}:cb-contact-{uuid.uuid4().hex[:4]}"
    cmd = await db.fetchval("INSERT INTO agent_call_command (zone, agent_id, event, call_id, job_id)"
                            " VALUES ($1, $2, 'offered', $3, $4) RETURNING id", ZONE, AGENT, call_id, AGENT_JOB)

    async def applied() -> bool:
        return bool(await db.fetchval("SELECT applied_at IS NOT NULL FROM agent_call_command WHERE id = $1", cmd))

    await until(applied, "the offer is applied", 20)
    await desk.wait_state(CallState.PENDING_CALL)
    await desk.client.call_event(call_id, "answered")
    await desk.client.call_event(call_id, "released")
    await desk.wait_state(CallState.WRAPUP)
    return call_id


async def attempts(db: asyncpg.Connection, job: int) -> int:
    return int(await db.fetchval("SELECT count(*) FROM attempts WHERE job_id = $1", job))


def same_statistics(a: Any, b: Any) -> bool:
    return a is not None and b is not None and (a.state, a.counters, a.refilter) == (b.state, b.counters, b.refilter)


@dataclass
class Jobs:
    running: int
    paused: int


@pytest.fixture(scope="module")
async def long_jobs(db: asyncpg.Connection, cm: CM) -> Jobs:
    """Two jobs that outlast the outage: one stays Running, one is paused (as the Director pauses: a
    compare-and-set on ``jobs.state``) once it has dialed."""
    running, paused = await create_job(db, 8000, 25), await create_job(db, 3000, 25)
    for job in (running, paused):
        await give(db, job, "pom1", cm.instance)
    for job in (running, paused):
        await until(lambda job=job: _ge(attempts(db, job), 20), f"job {job} dials", 60)  # type: ignore[misc]
    assert await db.fetchval("UPDATE jobs SET state = 'Paused', updated_at = now() WHERE id = $1 AND state ="
                             " 'Running' RETURNING true", paused)
    return Jobs(running, paused)


async def _ge(value: Awaitable[int], n: int) -> bool:
    return await value >= n


# ---- tests ---------------------------------------------------------------------------------------------------
async def test_cm_publishes_job_statistics_equal_to_postgresql(db: asyncpg.Connection, cm: CM,
                                                              cache: OperationalCache) -> None:
    job = await create_job(db, 120, 60)
    await give(db, job, "pom1", cm.instance)

    async def live_running() -> bool:
        got = await cache.get_job(job)
        return got is not None and got.source == "live" and got.counters is not None \
            and got.counters.attempts_total > 0

    FIGURES["first_statistics_s"] = round(await _timed(until(live_running, "statistics while the job runs", 60)), 2)

    async def ended() -> bool:
        return await db.fetchval("SELECT state FROM jobs WHERE id = $1", job) in ("Completed", "Stopped")

    await until(ended, "the job completes", 90)
    [expected] = await load_jobs(db, [job])

    async def equal() -> bool:
        return same_statistics(await cache.get_job(job), expected)

    FIGURES["completed_to_equal_s"] = round(await _timed(until(equal, "the cache shows PostgreSQL's counters", 30)), 2)
    got = await cache.get_job(job)
    assert got is not None and got.state == "Completed" and got.counters == expected.counters
    assert expected.counters is not None and expected.counters.contacts_done == 120
    print("\ncm statistics:", json.dumps(FIGURES), expected.counters)


async def _timed(aw: Awaitable[Any]) -> float:
    t0 = time.monotonic()
    await aw
    return time.monotonic() - t0


async def test_am_publishes_agent_states(db: asyncpg.Connection, am: AM, cache: OperationalCache) -> None:
    desk = am.desk
    await desk.client.ready()
    await desk.client.job_attach(AGENT_JOB)

    async def ready() -> bool:
        got = await cache.get_agent_state(AGENT)
        return got is not None and got.state == "Ready" and got.job_id == int(AGENT_JOB) and got.zone == ZONE

    await until(ready, "the agent's state in the cache", 20)
    await to_wrapup(db, desk)

    async def wrapup() -> bool:
        got = await cache.get_agent_state(AGENT)
        return got is not None and got.state == "Wrapup"

    await until(wrapup, "Wrapup in the cache", 20)
    call_id = str(desk.state.call_id) if desk.state is not None else ""
    at = datetime.now(UTC) + timedelta(hours=1)
    await desk.client.wrap_up(call_id, "CALLBACK", CallbackRequest(at=at, phone="+33100000000"))

    async def stored() -> bool:
        try:
            return await cache.get_callback(f"{ZONE}:{call_id}") is not None
        except CacheUnavailable:
            return False

    await until(stored, "the callback in the cache", 20)
    cb = await cache.get_callback(f"{ZONE}:{call_id}")
    assert cb is not None and cb.job_id == int(AGENT_JOB) and cb.contact_id == call_id.split(":", 2)[2]
    assert not [f for f in desk.frames if isinstance(f, ErrorFrame)]


async def test_every_cache_node_lost_dialing_goes_on_and_callbacks_are_refused(
    stack: Stack, db: asyncpg.Connection, cm: CM, am: AM, long_jobs: Jobs, cache: OperationalCache,
) -> None:
    async def published() -> bool:
        got = await cache.get_job(long_jobs.running)
        return got is not None and got.state == "Running" and got.counters is not None
    await until(published, "the running job's statistics in the cache", 60)
    desk = am.desk
    call_id = await to_wrapup(db, desk)
    frozen_logs = cm.log().count(FROZEN)

    t_kill = time.monotonic()
    await asyncio.gather(*(asyncio.to_thread(n.kill) for n in nodes(stack)))
    at_kill = await attempts(db, long_jobs.running)

    # the CM: dialing goes on, statistics frozen (logged once for the outage)
    async def frozen_logged() -> bool:
        return cm.log().count(FROZEN) > frozen_logs

    FIGURES["kill_to_frozen_logged_s"] = round(await _timed(until(frozen_logged, "the CM logs statistics frozen",
                                                                  30)), 2)
    await until(lambda: _ge(attempts(db, long_jobs.running), at_kill + 100), "100 more attempts with the cache down",
                60)
    FIGURES["attempts_during_outage"] = await attempts(db, long_jobs.running) - at_kill
    assert await db.fetchval("SELECT state FROM jobs WHERE id = $1", long_jobs.running) == "Running"

    # the AM: the wrap-up completes (OK, Idle), then the callback's refusal comes back as an error frame
    n_frames = len(desk.frames)
    t0 = time.monotonic()
    ok = await desk.client.wrap_up(call_id, "CALLBACK", CallbackRequest(at=datetime.now(UTC) + timedelta(hours=2)))
    FIGURES["wrap_up_ok_ms"] = round((time.monotonic() - t0) * 1000, 1)
    await desk.wait_state(CallState.IDLE)

    async def refused() -> ErrorFrame | None:
        return next((f for f in desk.frames[n_frames:] if isinstance(f, ErrorFrame)), None)

    error: ErrorFrame = await until(refused, "ERROR callback_refused at the desktop", 30)
    FIGURES["callback_refused_frame_ms"] = round((time.monotonic() - t0) * 1000, 1)
    assert error.code == "callback_refused" and error.req == ok.req and not error.fatal, error
    assert error.reason.startswith(f"callback refused: set callback {ZONE}:{call_id}"), error.reason
    assert "no cache node is reachable" in error.reason
    row = await db.fetchrow("SELECT call_state, last_completion_code FROM agents WHERE zone = $1 AND agent_id = $2",
                            ZONE, AGENT)
    assert (row["call_state"], row["last_completion_code"]) == ("Idle", "CALLBACK")
    await desk.client.not_ready()  # a state change while the cache is down: published once it is back
    FIGURES["outage_checked_s"] = round(time.monotonic() - t_kill, 2)
    print("\nall nodes down:", json.dumps(FIGURES))
    assert cm.log().count(FROZEN) == frozen_logs + 1, "statistics frozen logged more than once"


async def test_restored_cache_running_job_refilters_and_statistics_come_back(
    stack: Stack, db: asyncpg.Connection, cm: CM, am: AM, long_jobs: Jobs, cache: OperationalCache,
) -> None:
    assert all(not n.running() for n in nodes(stack)), "the previous test left a node running"
    mark = await last_history_id(db)
    t0 = time.monotonic()
    await stack.heal_ignite()
    FIGURES["nodes_back_s"] = round(time.monotonic() - t0, 2)
    result = await rebuild_when_lock_free(db, cache)
    FIGURES["rebuilt_s"] = round(time.monotonic() - t0, 2)
    at_rebuild = await attempts(db, long_jobs.running)

    # the paused job: the rebuild's entry (Paused, refilter, no statistics) stays while it is paused
    paused = await cache.get_job(long_jobs.paused)
    assert paused is not None and paused.state == "Paused" and paused.refilter and paused.counters is None

    # the running job: Running -> Filter in Progress -> Running in PostgreSQL, by its CM (fenced)
    async def refiltered() -> bool:
        seq = [(a, b) for a, b, _r in await states_of(db, long_jobs.running, mark)]
        return seq[:2] == [("Running", "Filter in Progress"), ("Filter in Progress", "Running")]

    FIGURES["rebuilt_to_refiltered_s"] = round(await _timed(until(refiltered, "the running job re-filters", 60)), 2)
    seq = await states_of(db, long_jobs.running, mark)
    assert seq[0][2] == "cache rebuilt: filtering again" and seq[1][2] is not None \
        and seq[1][2].startswith("cache rebuilt: filtered"), seq

    async def back() -> bool:
        got = await cache.get_job(long_jobs.running)
        return got is not None and got.source == "live" and got.state == "Running" and got.counters is not None \
            and got.counters.attempts_total >= at_rebuild

    FIGURES["statistics_back_s"] = round(await _timed(until(back, "the running job's statistics come back", 60)), 2)
    assert await attempts(db, long_jobs.running) > at_rebuild, "dialing goes on after the rebuild"
    # still paused: no statistics yet
    assert (await cache.get_job(long_jobs.paused)).counters is None  # type: ignore[union-attr]

    # resumed (as the Director does): Running -> Filter in Progress -> Running, and its statistics come back
    resumed_mark = await last_history_id(db)
    assert await db.fetchval("UPDATE jobs SET state = 'Running', updated_at = now() WHERE id = $1 AND state ="
                             " 'Paused' RETURNING true", long_jobs.paused)

    async def paused_refiltered() -> bool:
        seq = [(a, b) for a, b, _r in await states_of(db, long_jobs.paused, resumed_mark)]
        return seq[:3] == [("Paused", "Running"), ("Running", "Filter in Progress"), ("Filter in Progress", "Running")]

    await until(paused_refiltered, "the resumed job re-filters", 60)

    async def paused_back() -> bool:
        got = await cache.get_job(long_jobs.paused)
        return got is not None and got.counters is not None and got.state == "Running" and not got.refilter

    FIGURES["resume_to_statistics_s"] = round(await _timed(until(paused_back, "the resumed job's statistics", 60)), 2)

    # the CM logged the way back; the AM's pending state and new callbacks reach the cache again
    assert "statistics publication works again" in cm.log()

    async def agent_back() -> bool:
        got = await cache.get_agent_state(AGENT)
        return got is not None and got.state == "Not Ready"

    await until(agent_back, "the agent's state changed during the outage reaches the cache", 60)
    desk = am.desk
    await desk.client.ready()
    call_id = await to_wrapup(db, desk)
    n_frames = len(desk.frames)
    await desk.client.wrap_up(call_id, "CALLBACK", CallbackRequest(at=datetime.now(UTC) + timedelta(hours=3)))

    async def stored() -> bool:
        return await cache.get_callback(f"{ZONE}:{call_id}") is not None

    await until(stored, "a callback is stored again", 30)
    assert not [f for f in desk.frames[n_frames:] if isinstance(f, ErrorFrame)]
    FIGURES["rebuild"] = {"jobs": result.jobs, "refiltered": result.refiltered, "paused": result.paused}
    print("\nrestore:", json.dumps(FIGURES))
