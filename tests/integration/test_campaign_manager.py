"""Campaign Manager on real PostgreSQL with real processes: Campaign Manager daemons, Rule Engine daemons
(pom1..pom3) and the media simulator (pom3, calls 100x faster than real time).

The test is the allocator (the Campaign Director's part of the contract): it holds the
``campaign_director`` lease itself and assigns jobs with :func:`pom_ha.ha.assignments.assign`.
Conditions are polled with deadlines, never slept for.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from pom_ha.domain.campaigns import validate_campaign
from pom_ha.domain.strategy import RetryStrategy
from pom_ha.ha.assignments import assign
from pom_ha.ha.fencing import LeaseFence
from pom_ha.ha.store import Holder
from pom_ha.infra.process import ProcessRecord, kill_process, log_tail, stop_process
from pom_ha.infra.stack import Stack
from pom_ha.lab.daemons import start_daemon
from pom_ha.media.client import MediaClient
from services.campaign_manager.completions import resolve_in_flight
from services.campaign_manager.job_store import FenceLost, JobStore, NewAttempt, WriteConflict

pytestmark = pytest.mark.integration
CM_HTTP_PORT = 7610
OUTCOMES = json.dumps({"ANSWER_HUMAN": 0.6, "BUSY": 0.2, "NO_ANSWER": 0.2})


# ---- processes -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
async def rules(pg_dsn: str) -> AsyncIterator[None]:
    """No minimum gap between attempts (retries are immediate in these tests); set before any Rule Engine
    starts, so every one loads it, and put back afterwards for the other tests of the session."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        before = await conn.fetchval(
            "UPDATE pim_config p SET value = '0' FROM pim_config o WHERE p.key = o.key"
            " AND p.key = 'RuleEngineMinGapBetweenAttemptsMs' RETURNING o.value")
        yield
        await conn.execute("UPDATE pim_config SET value = $1 WHERE key = 'RuleEngineMinGapBetweenAttemptsMs'",
                           before)
    finally:
        await conn.close()


@pytest.fixture(scope="module", autouse=True)
async def release_test_allocator(pg_dsn: str) -> AsyncIterator[None]:
    """These tests hold the campaign_director lease themselves (as holder 'test'); release it afterwards so
    real Campaign Directors of later tests in the same session can become master."""
    yield
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("UPDATE ha_lease SET expires_at = now(), released_at = now()"
                           " WHERE service = 'campaign_director' AND holder_instance = 'test'")
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def engines(stack: Stack, topology_file: Path, rules: None) -> Iterator[dict[str, ProcessRecord]]:
    recs = {s: start_daemon(stack.topo, topology_file, s, "rule-engine") for s in ("pom1", "pom2", "pom3")}
    try:
        yield recs
    finally:
        for rec in recs.values():
            stop_process(rec, stack.topo.lab_dir() / "run")


@pytest.fixture(scope="module")
def media(stack: Stack, topology_file: Path) -> Iterator[tuple[str, int]]:
    rec = start_daemon(stack.topo, topology_file, "pom3", "media-simulator", "--time-scale", "0.01",
                       "--capacity", "2000", "--seed", "5", "--outcomes", OUTCOMES)
    try:
        yield stack.topo.server("pom3").address, stack.topo.ports.media_simulator
    finally:
        stop_process(rec, stack.topo.lab_dir() / "run")


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_dsn)
    yield conn
    await conn.close()


StartCM = Callable[[str], Awaitable[tuple[ProcessRecord, str]]]


@pytest.fixture
async def cms(stack: Stack, topology_file: Path, db: asyncpg.Connection, engines: dict[str, ProcessRecord],
              media: tuple[str, int]) -> AsyncIterator[StartCM]:
    """Start a Campaign Manager on a server; returns its process and instance id once its member row runs."""
    started: list[ProcessRecord] = []

    async def start(server: str) -> tuple[ProcessRecord, str]:
        before = await db.fetchval(
            "SELECT instance_id FROM ha_member WHERE service = 'campaign_manager' AND server = $1", server)
        rec = start_daemon(stack.topo, topology_file, server, "campaign-manager", "--media", f"{media[0]}:{media[1]}",
                           "--http-port", str(CM_HTTP_PORT))
        started.append(rec)

        async def running() -> str | None:
            assert rec.alive(), f"campaign manager on {server} exited:\n{log_tail(rec.log)}"
            row = await db.fetchrow("SELECT instance_id, state FROM ha_member WHERE service = 'campaign_manager'"
                                    " AND server = $1", server)
            ok = row is not None and row["state"] == "RUNNING" and row["instance_id"] != before
            return str(row["instance_id"]) if ok and row is not None else None

        return rec, await poll(running, 20, f"campaign manager on {server} running")

    yield start
    run_dir = stack.topo.lab_dir() / "run"
    await asyncio.gather(*(asyncio.to_thread(stop_process, rec, run_dir) for rec in started))


# ---- helpers -------------------------------------------------------------------------------------------------
async def poll(check: Callable[[], Awaitable[Any]], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.05)


def noon_zone() -> str:
    """An Etc/GMT zone where it is about noon now: the calling window (08:00-21:00 local) is open."""
    offset = (12 - datetime.now(UTC).hour) % 24
    offset = offset - 24 if offset > 12 else offset
    return f"Etc/GMT{-offset:+d}"


async def create_job(db: asyncpg.Connection, contacts: int, calls_per_second: float) -> int:
    tag = uuid.uuid4().hex[:8]
    definition = validate_campaign({
        "name": f"cm-it-{tag}", "contact_list": f"list-{tag}",
        "strategy": {"max_attempts": 3, "default_retry_interval_s": 0},
        "pacing": {"calls_per_second": calls_per_second},
    })
    list_id = await db.fetchval("INSERT INTO contact_lists (name) VALUES ($1) RETURNING id", f"list-{tag}")
    zone = noon_zone()
    await db.copy_records_to_table("contacts", records=[
        (list_id, f"c{i:05d}", f"+1415{int(tag, 16) % 1000:03d}{i:05d}", zone) for i in range(contacts)
    ], columns=["list_id", "contact_id", "phone", "timezone"])
    campaign = await db.fetchval("INSERT INTO campaigns (name, definition) VALUES ($1, $2::jsonb) RETURNING id",
                                 definition.name, definition.model_dump_json())
    return int(await db.fetchval("INSERT INTO jobs (campaign_id, list_id) VALUES ($1, $2) RETURNING id",
                                 campaign, list_id))


async def allocator(db: asyncpg.Connection) -> LeaseFence:
    """Hold the campaign_director lease as the test (a new epoch, valid for an hour)."""
    epoch = await db.fetchval(
        "INSERT INTO ha_lease AS l (service, scope, holder_server, holder_instance, epoch, acquired_at, renewed_at,"
        " expires_at) VALUES ('campaign_director', '', 'test', 'test', 1, now(), now(), now() + interval '1 hour')"
        " ON CONFLICT (service, scope) DO UPDATE SET holder_server = 'test', holder_instance = 'test',"
        " epoch = l.epoch + 1, acquired_at = now(), renewed_at = now(), expires_at = now() + interval '1 hour',"
        " released_at = NULL RETURNING epoch")
    return LeaseFence("campaign_director", "", int(epoch))


async def give(db: asyncpg.Connection, job: int, server: str, instance: str) -> int:
    a = await assign(db, await allocator(db), "campaign_manager", f"job:{job}", Holder(server, instance))
    assert a is not None
    return a.epoch


async def job_state(db: asyncpg.Connection, job: int) -> str:
    return str(await db.fetchval("SELECT state FROM jobs WHERE id = $1", job))


async def wait_ended(db: asyncpg.Connection, job: int, timeout_s: float, logs: list[ProcessRecord]) -> str:
    async def ended() -> str | None:
        state = await job_state(db, job)
        return state if state in ("Completed", "Stopped") else None

    try:
        return str(await poll(ended, timeout_s, f"job {job} ended"))
    except AssertionError:
        tails = "\n".join(f"--- {r.name}\n{log_tail(r.log, 30)}" for r in logs)
        raise AssertionError(f"job {job} is {await job_state(db, job)}:\n{tails}") from None


async def check_invariants(db: asyncpg.Connection, job: int) -> dict[str, int]:
    """No attempt twice, none in flight, no stuck contact, every contact done, counters consistent."""
    n, distinct = await db.fetchrow(
        "SELECT count(*), count(DISTINCT (contact_id, attempt_no)) FROM attempts WHERE job_id = $1", job)
    assert n == distinct, f"{n} attempts but {distinct} distinct (job, contact, attempt_no)"
    assert await db.fetchval("SELECT count(*) FROM attempts WHERE job_id = $1 AND state = 'dialing'", job) == 0
    states = dict(await db.fetch("SELECT state, count(*) FROM job_contacts WHERE job_id = $1 GROUP BY state", job))
    listed = await db.fetchval("SELECT count(*) FROM contacts c JOIN jobs j ON j.list_id = c.list_id WHERE j.id = $1",
                               job)
    assert states == {"done": listed}, f"contacts by state {states}, {listed} in the list"
    gaps = await db.fetchval(
        "SELECT count(*) FROM (SELECT jc.contact_id FROM job_contacts jc LEFT JOIN attempts a"
        " ON a.job_id = jc.job_id AND a.contact_id = jc.contact_id WHERE jc.job_id = $1"
        " GROUP BY jc.contact_id, jc.attempts HAVING count(a.*) <> jc.attempts"
        " OR coalesce(max(a.attempt_no), 0) <> jc.attempts) x", job)
    assert gaps == 0, f"{gaps} contacts whose attempt numbers are not 1..n"
    no_code = await db.fetchval("SELECT count(*) FROM job_contacts WHERE job_id = $1 AND final_code IS NULL", job)
    assert no_code == 0
    return {"attempts": int(n), "contacts": int(listed)}


async def sim_dialed(media: tuple[str, int]) -> int:
    async with MediaClient([media]) as client:
        await client.wait_connected(5)
        return (await client.stats()).dialed


async def cm_health(address: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"http://{address}:{CM_HTTP_PORT}/health") as resp:
        body: dict[str, Any] = await resp.json()
        return body


# ---- tests ---------------------------------------------------------------------------------------------------
async def test_a_job_runs_to_completion(stack: Stack, db: asyncpg.Connection, cms: StartCM,
                                        media: tuple[str, int]) -> None:
    rec, instance = await cms("pom1")
    job = await create_job(db, 300, 150)
    dialed_before = await sim_dialed(media)
    t0 = time.monotonic()
    await give(db, job, "pom1", instance)
    assigned_at = await db.fetchval("SELECT assigned_at FROM ha_assignment WHERE item = $1", f"job:{job}")
    assert await wait_ended(db, job, 40, [rec]) == "Completed"
    took = time.monotonic() - t0
    first = await db.fetchval("SELECT min(created_at) FROM attempts WHERE job_id = $1", job)
    # learnt by NOTIFY ha_assignment, not by the 5 s reconcile
    assert (first - assigned_at).total_seconds() < 2.5, first - assigned_at
    counts = await check_invariants(db, job)
    not_dialed = await db.fetchval("SELECT count(*) FROM attempts WHERE job_id = $1 AND code = 'CANCELLED'", job)
    assert await sim_dialed(media) - dialed_before == counts["attempts"] - not_dialed, "an attempt dialed twice"
    row = await db.fetchrow("SELECT ending, state_reason, started_at, ended_at FROM jobs WHERE id = $1", job)
    assert row["ending"] == "Completed" and row["started_at"] is not None and row["ended_at"] is not None
    assert {r["assignment_epoch"] for r in await db.fetch(
        "SELECT DISTINCT assignment_epoch FROM attempts WHERE job_id = $1", job)} == {1}
    health = await cm_health(stack.topo.server("pom1").address)
    assert health["campaign_manager"]["counters"]["attempts"] >= counts["attempts"]
    print(f"\njob of {counts['contacts']} contacts, {counts['attempts']} attempts completed in {took:.2f} s; "
          f"assignment to first attempt {(first - assigned_at).total_seconds() * 1000:.0f} ms")


async def test_sigkill_of_a_cm_mid_job(stack: Stack, db: asyncpg.Connection, cms: StartCM,
                                       media: tuple[str, int]) -> None:
    rec_a, inst_a = await cms("pom1")
    rec_b, inst_b = await cms("pom2")
    job = await create_job(db, 600, 120)
    dialed_before = await sim_dialed(media)
    await give(db, job, "pom1", inst_a)

    async def busy() -> bool:
        n, dialing = await db.fetchrow("SELECT count(*), count(*) FILTER (WHERE state = 'dialing') FROM attempts"
                                       " WHERE job_id = $1", job)
        return bool(n >= 150 and dialing >= 5)

    await poll(busy, 20, "the first CM dialing")
    await asyncio.to_thread(kill_process, rec_a)
    killed_at = await db.fetchval("SELECT now()")
    orphans = {(r["contact_id"], r["attempt_no"]) for r in await db.fetch(
        "SELECT contact_id, attempt_no FROM attempts WHERE job_id = $1 AND state = 'dialing'", job)}
    assert orphans and await db.fetchval(
        "SELECT count(*) FROM attempts WHERE job_id = $1 AND state = 'dialing' AND cm_instance <> $2", job, inst_a) == 0

    # contacts added to the list since the job was filtered: the taker's re-read (beside its dial loop) adds
    # them, and the job does not complete without them (check_invariants: every contact of the list done)
    await db.execute(
        "INSERT INTO contacts (list_id, contact_id, phone, timezone)"
        " SELECT c.list_id, 'late' || lpad(i::text, 3, '0'), '+1415999' || lpad(i::text, 5, '0'), c.timezone"
        " FROM (SELECT list_id, timezone FROM contacts WHERE list_id = (SELECT list_id FROM jobs WHERE id = $1)"
        " LIMIT 1) c, generate_series(1, 20) i", job)
    epoch = await give(db, job, "pom2", inst_b)  # the allocator moves the dead CM's job
    moved_at = await db.fetchval("SELECT now()")
    assert epoch == 2
    assert await wait_ended(db, job, 45, [rec_a, rec_b]) == "Completed"

    counts = await check_invariants(db, job)
    assert await db.fetchval("SELECT count(*) FROM job_contacts WHERE job_id = $1 AND contact_id LIKE 'late%'"
                             " AND state = 'done'", job) == 20
    resolved = await db.fetch(
        "SELECT contact_id, attempt_no, code, cm_instance FROM attempts WHERE job_id = $1"
        " AND (contact_id, attempt_no) IN (SELECT * FROM unnest($2::text[], $3::int[]))",
        job, [c for c, _ in orphans], [n for _, n in orphans])
    assert len(resolved) == len(orphans)
    assert {r["code"] for r in resolved} == {"CALL_FAILOVER"} and {r["cm_instance"] for r in resolved} == {inst_a}
    for r in resolved:  # each retried by the taker (or ended by max attempts)
        nxt = await db.fetchrow("SELECT assignment_epoch, cm_instance FROM attempts WHERE job_id = $1"
                                " AND contact_id = $2 AND attempt_no = $3", job, r["contact_id"], r["attempt_no"] + 1)
        final = await db.fetchval("SELECT final_code FROM job_contacts WHERE job_id = $1 AND contact_id = $2",
                                  job, r["contact_id"])
        assert (nxt is not None and nxt["cm_instance"] == inst_b) or final == "MAX_ATTEMPTS_REACHED"
    late = await db.fetchval("SELECT count(*) FROM attempts WHERE job_id = $1 AND created_at > $2 AND"
                             " (cm_instance <> $3 OR assignment_epoch <> 2)", job, killed_at, inst_b)
    assert late == 0, "an attempt written by the dead CM after its death"
    first_b = await db.fetchval("SELECT min(created_at) FROM attempts WHERE job_id = $1 AND assignment_epoch = 2", job)
    not_dialed = await db.fetchval("SELECT count(*) FROM attempts WHERE job_id = $1 AND code = 'CANCELLED'", job)
    dialed = await sim_dialed(media) - dialed_before
    assert dialed <= counts["attempts"] - not_dialed, "an attempt dialed twice"
    # the row is written before its dial command leaves: only the dead CM's in-flight rows (now CALL_FAILOVER)
    # may have died with it undialed (a loaded machine widens that window)
    assert counts["attempts"] - not_dialed - dialed <= len(orphans), "an attempt never dialed, not the dead CM's"

    health = await cm_health(stack.topo.server("pom2").address)
    counters = health["campaign_manager"]["counters"]
    assert counters.get("failover_resolved") == len(orphans)
    # the dead CM's calls report to the taker after its CLAIM, under epoch 1: dropped and counted
    assert counters.get("outcomes_stale_epoch", 0) >= 1, counters

    # a recovered CM on pom1 does not take its old job back
    _rec_c, inst_c = await cms("pom1")
    owner = await db.fetchval("SELECT owner_instance FROM ha_assignment WHERE item = $1", f"job:{job}")
    assert owner == inst_b and inst_c != inst_a
    assert (await cm_health(stack.topo.server("pom1").address))["campaign_manager"]["jobs"] == {}
    print(f"\n{len(orphans)} in-flight attempts resolved as CALL_FAILOVER; reassignment to first attempt of the "
          f"taker {(first_b - moved_at).total_seconds() * 1000:.0f} ms; {counts['attempts']} attempts in all")



async def test_a_job_moved_from_a_live_cm_fences_it_out(stack: Stack, db: asyncpg.Connection, cms: StartCM) -> None:
    """The allocator moves a job away from a CM that is still running (as after a partition): from the
    moment the item moves, nothing of the old owner lands; the new owner resolves its calls and finishes."""
    _rec_a, inst_a = await cms("pom1")
    rec_b, inst_b = await cms("pom2")
    job = await create_job(db, 400, 120)
    await give(db, job, "pom1", inst_a)
    await poll(lambda: db.fetchval("SELECT count(*) >= 100 FROM attempts WHERE job_id = $1", job), 20, "dialing")
    epoch = await give(db, job, "pom2", inst_b)
    moved_at = await db.fetchval("SELECT now()")
    assert epoch == 2
    assert await wait_ended(db, job, 40, [rec_b]) == "Completed"
    await check_invariants(db, job)
    assert await db.fetchval("SELECT count(*) FROM attempts WHERE job_id = $1 AND cm_instance = $2"
                             " AND created_at > $3", job, inst_a, moved_at) == 0, "a write of the old owner landed"
    old = dict(await db.fetch("SELECT coalesce(code, 'dialing'), count(*) FROM attempts WHERE job_id = $1"
                              " AND assignment_epoch = 1 GROUP BY 1", job))
    assert "dialing" not in old, old
    counters = (await cm_health(stack.topo.server("pom2").address))["campaign_manager"]["counters"]
    assert counters.get("failover_resolved", 0) == old.get("CALL_FAILOVER", 0)
    assert (await cm_health(stack.topo.server("pom1").address))["campaign_manager"]["jobs"] == {}

async def test_sigkill_of_the_rule_engine_master_pauses_dialing(
    stack: Stack, db: asyncpg.Connection, cms: StartCM, engines: dict[str, ProcessRecord],
) -> None:
    rec, instance = await cms("pom1")
    job = await create_job(db, 500, 100)
    old = await db.fetchrow("SELECT holder_server, epoch FROM ha_lease WHERE service = 'rule_engine' AND scope = ''"
                            " AND expires_at > now()")
    assert old is not None
    await give(db, job, "pom1", instance)
    await poll(lambda: db.fetchval("SELECT count(*) >= 60 FROM attempts WHERE job_id = $1", job), 20, "dialing")
    await asyncio.to_thread(kill_process, engines[old["holder_server"]])
    killed_at = await db.fetchval("SELECT now()")

    async def new_master() -> Any:
        return await db.fetchrow("SELECT holder_server, acquired_at FROM ha_lease WHERE service = 'rule_engine'"
                                 " AND scope = '' AND epoch > $1 AND expires_at > now()", old["epoch"])

    master = await poll(new_master, 20, "a new rule engine master")
    assert await wait_ended(db, job, 45, [rec]) == "Completed"
    await check_invariants(db, job)
    grace = "interval '300 milliseconds'"  # verdicts the old master gave just before it died
    during = await db.fetchval(
        f"SELECT count(*) FROM attempts WHERE job_id = $1 AND created_at > $2::timestamptz + {grace}"
        " AND created_at < $3", job, killed_at, master["acquired_at"])
    assert during == 0, f"{during} attempts dialed while no Rule Engine master was up"
    resumed = await db.fetchval(
        f"SELECT min(created_at) FROM attempts WHERE job_id = $1 AND created_at > $2::timestamptz + {grace}",
        job, killed_at)
    assert resumed is not None and resumed >= master["acquired_at"]
    health = await cm_health(stack.topo.server("pom1").address)
    cm = health["campaign_manager"]
    # the pause shows in the attempts above; whether the CM also logged "dialing paused" depends on whether
    # the new master answered within one evaluation's timeout (re_timeout_s)
    assert cm["rule_engine"]["reconnects"] >= 1, cm
    assert cm["rule_engine"]["master"] == master["holder_server"] and cm["rule_engine"]["stale_replies"] == 0
    print(f"\nrule engine master killed: new master after "
          f"{(master['acquired_at'] - killed_at).total_seconds() * 1000:.0f} ms, dialing again after "
          f"{(resumed - killed_at).total_seconds() * 1000:.0f} ms")


async def test_pause_resume_and_stop(db: asyncpg.Connection, cms: StartCM) -> None:
    """The Director's commands as state changes of the job row: Paused dials nothing (outcomes are still
    recorded), Running dials again, Stopping dials nothing new, settles its in-flight attempts, ends Stopped."""
    rec, instance = await cms("pom2")
    job = await create_job(db, 400, 60)
    await give(db, job, "pom2", instance)
    count = "SELECT count(*) FROM attempts WHERE job_id = $1"
    await poll(lambda: db.fetchval(f"{count} AND state = 'completed'", job), 20, "first outcomes")
    await poll(lambda: db.fetchval("SELECT count(*) >= 40 FROM attempts WHERE job_id = $1", job), 20, "dialing")

    paused_at = await db.fetchval("UPDATE jobs SET state = 'Paused' WHERE id = $1 AND state = 'Running'"
                                  " RETURNING now()", job)
    assert paused_at is not None
    await poll(lambda: db.fetchval("SELECT NOT EXISTS (SELECT 1 FROM attempts WHERE job_id = $1 AND state = 'dialing')",
                                   job), 10, "in-flight attempts settled while paused")
    settled = await db.fetchval(count, job)
    deadline = time.monotonic() + 1.0  # an observation window: nothing may happen during it
    while time.monotonic() < deadline:
        assert await db.fetchval(count, job) == settled, "a paused job dialed"
        await asyncio.sleep(0.05)
    assert await db.fetchval(f"{count} AND created_at > $2::timestamptz + interval '300 milliseconds'",
                             job, paused_at) == 0

    await db.execute("UPDATE jobs SET state = 'Running' WHERE id = $1 AND state = 'Paused'", job)
    await poll(lambda: db.fetchval("SELECT count(*) > $2 FROM attempts WHERE job_id = $1", job, settled + 20),
               10, "dialing again after resume")

    stop_at = await db.fetchval("UPDATE jobs SET state = 'Stopping', ending = 'Stopped', state_reason = 'operator'"
                                " WHERE id = $1 AND state = 'Running' RETURNING now()", job)
    assert stop_at is not None
    assert await wait_ended(db, job, 15, [rec]) == "Stopped"
    assert await db.fetchval(f"{count} AND state = 'dialing'", job) == 0
    assert await db.fetchval(f"{count} AND created_at > $2::timestamptz + interval '300 milliseconds'",
                             job, stop_at) == 0
    states = dict(await db.fetch("SELECT state, count(*) FROM job_contacts WHERE job_id = $1 GROUP BY state", job))
    assert "dialing" not in states and states.get("pending", 0) > 0, states
    n, distinct = await db.fetchrow(
        "SELECT count(*), count(DISTINCT (contact_id, attempt_no)) FROM attempts WHERE job_id = $1", job)
    assert n == distinct
    row = await db.fetchrow("SELECT ending, state_reason FROM jobs WHERE id = $1", job)
    assert (row["ending"], row["state_reason"]) == ("Stopped", "operator")


async def test_an_invalid_stored_definition_stops_the_job(db: asyncpg.Connection, cms: StartCM) -> None:
    rec, instance = await cms("pom1")
    tag = uuid.uuid4().hex[:8]
    list_id = await db.fetchval("INSERT INTO contact_lists (name) VALUES ($1) RETURNING id", f"list-{tag}")
    campaign = await db.fetchval("INSERT INTO campaigns (name, definition) VALUES ($1, $2::jsonb) RETURNING id",
                                 f"bad-{tag}", json.dumps({"name": f"bad-{tag}", "pacing": {"kind": "warp"}}))
    job = await db.fetchval("INSERT INTO jobs (campaign_id, list_id) VALUES ($1, $2) RETURNING id", campaign, list_id)
    await give(db, job, "pom1", instance)
    assert await wait_ended(db, job, 10, [rec]) == "Stopped"
    row = await db.fetchrow("SELECT ending, state_reason FROM jobs WHERE id = $1", job)
    assert (row["ending"], row["state_reason"]) == ("Stopped", "invalid campaign definition")
    assert await db.fetchval("SELECT count(*) FROM attempts WHERE job_id = $1", job) == 0


async def test_every_job_write_is_fenced_by_the_assignment_epoch(pg_dsn: str, db: asyncpg.Connection) -> None:
    """JobStore on its own (no daemon): once the job moves, each write of the old owner is refused and
    changes nothing; attempts cannot be written twice; the taker resolves the old owner's attempt."""
    job = await create_job(db, 7, 10)
    list_id = await db.fetchval("SELECT list_id FROM jobs WHERE id = $1", job)
    fence = await allocator(db)
    first = await assign(db, fence, "campaign_manager", f"job:{job}", Holder("pom8", "owner-1"))
    assert first is not None
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        old = JobStore(pool, first, job, "pom8", timeout_s=5)
        assert await old.filter_contacts(list_id, chunk=3) == 7  # three chunks: 3 + 3 + 1
        assert await old.filter_contacts(list_id, chunk=3) == 0
        await old.start_attempts([NewAttempt("c00000", 1, "x1", "+14155550100")])
        with pytest.raises(WriteConflict):  # the contact is dialing: attempt 1 cannot be written again
            await old.start_attempts([NewAttempt("c00001", 1, "x2", "+1"), NewAttempt("c00000", 1, "x3", "+1")])
        assert await db.fetchval("SELECT count(*) FROM attempts WHERE job_id = $1", job) == 1
        assert [(a.contact_id, a.attempt_no, a.call_id, a.phone) for a in await old.ours_dialing()] == [
            ("c00000", 1, "x1", await db.fetchval("SELECT phone FROM contacts WHERE list_id = $1"
                                                  " AND contact_id = 'c00000'", list_id))]

        second = await assign(db, fence, "campaign_manager", f"job:{job}", Holder("pom9", "owner-2"))
        assert second is not None and second.epoch == first.epoch + 1
        before = await db.fetchval("SELECT (SELECT count(*) FROM attempts WHERE job_id = $1) || ':' ||"
                                   " (SELECT string_agg(state, ',' ORDER BY contact_id) FROM job_contacts"
                                   " WHERE job_id = $1)", job)
        for write in (old.set_state("Queued", "Filter in Progress"), old.filter_contacts(list_id),
                      old.start_attempts([NewAttempt("c00002", 1, "x4", "+1")]),
                      resolve_in_flight(old, RetryStrategy(), [])):
            with pytest.raises(FenceLost):
                await write
        after = await db.fetchval("SELECT (SELECT count(*) FROM attempts WHERE job_id = $1) || ':' ||"
                                  " (SELECT string_agg(state, ',' ORDER BY contact_id) FROM job_contacts"
                                  " WHERE job_id = $1)", job)
        assert after == before and await job_state(db, job) == "Queued"

        taker = JobStore(pool, second, job, "pom9", timeout_s=5)
        resolved = await resolve_in_flight(taker, RetryStrategy(max_attempts=3), [])
        assert [(r[0], r[1], r[3], r[4]) for r in resolved] == [("c00000", 1, "owner-1", first.epoch)]
        row = await db.fetchrow("SELECT a.code, jc.state, jc.attempts FROM attempts a JOIN job_contacts jc"
                                " ON jc.job_id = a.job_id AND jc.contact_id = a.contact_id"
                                " WHERE a.job_id = $1 AND a.contact_id = 'c00000'", job)
        assert tuple(row) == ("CALL_FAILOVER", "pending", 1)
        await taker.start_attempts([NewAttempt("c00000", 2, "x5", "+14155550100")])
        assert await db.fetchval("SELECT assignment_epoch FROM attempts WHERE job_id = $1 AND attempt_no = 2",
                                 job) == second.epoch
    finally:
        await pool.close()


async def test_contacts_removed_from_the_list_are_filtered_out(db: asyncpg.Connection, cms: StartCM) -> None:
    rec, instance = await cms("pom2")
    job = await create_job(db, 8, 4)
    list_id = await db.fetchval("SELECT list_id FROM jobs WHERE id = $1", job)
    await give(db, job, "pom2", instance)
    await poll(lambda: db.fetchval("SELECT count(*) > 0 FROM attempts WHERE job_id = $1", job), 10, "dialing")
    removed = [r["contact_id"] for r in await db.fetch(
        "DELETE FROM contacts WHERE list_id = $1 AND contact_id IN (SELECT contact_id FROM job_contacts"
        " WHERE job_id = $2 AND attempts = 0 ORDER BY contact_id DESC LIMIT 3) RETURNING contact_id", list_id, job)]
    assert len(removed) == 3
    assert await wait_ended(db, job, 20, [rec]) == "Completed"
    states = {r["contact_id"]: r["state"] for r in await db.fetch(
        "SELECT contact_id, state FROM job_contacts WHERE job_id = $1", job)}
    assert {c for c, st in states.items() if st == "filtered_out"} == set(removed)
    assert {st for c, st in states.items() if c not in removed} == {"done"}
