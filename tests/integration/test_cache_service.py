"""Cache service on the real 3-node Ignite cluster and PostgreSQL.

In file order: one node SIGKILLed under a stream of client operations (zero failed operations); every node
down (each impact of the guide's list is its own clear error, quickly); cache services started on every
server bring their nodes back and rebuild the cache from PostgreSQL (counters match the tables); a cache
service restarts its SIGKILLed local node; a SIGSTOPped node costs a bounded delay, not a failure. Conditions
are polled with deadlines, never slept for.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pom_ha.cache import (
    AddContactRefused,
    AgentEntry,
    CacheUnavailable,
    Callback,
    CallbackRefused,
    ContactAdd,
    JobEntry,
    JobStartRefused,
    OperationalCache,
    StatisticsFrozen,
    load_jobs,
    refresh_job,
)
from pom_ha.campaign import admin
from pom_ha.infra.ignite import IgniteLauncher
from pom_ha.infra.process import ProcessRecord, stop_process
from pom_ha.infra.stack import Stack
from pom_ha.lab.daemons import start_daemon
from tests.integration.cache_helpers import rebuild_when_lock_free

pytestmark = pytest.mark.integration
DEADLINE_S = 180.0  # loose: the 2-core lab machine is shared; figures are printed, not asserted
FIGURES: dict[str, Any] = {}


def nodes(stack: Stack) -> list[IgniteLauncher]:
    found = [n for n in stack.launchers("ignite") if isinstance(n, IgniteLauncher)]
    assert len(found) == 3, "these tests need the 3-node lab topology"
    return found


async def until(check: Callable[[], Awaitable[bool]], what: str, deadline_s: float = DEADLINE_S) -> float:
    t0 = time.monotonic()
    while not await check():
        assert time.monotonic() - t0 < deadline_s, f"not within {deadline_s:.0f} s: {what}"
        await asyncio.sleep(0.2)
    return time.monotonic() - t0


async def full_topology(stack: Stack) -> bool:
    every = nodes(stack)
    return all(n.topology_servers() == len(every) for n in every) and all(
        await asyncio.gather(*(n.probe() for n in every))
    )


def process_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def strip(entry: JobEntry | None) -> JobEntry | None:
    return None if entry is None else replace(entry, updated_at=0.0)


@pytest.fixture(scope="module")
async def db(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_dsn)
    yield conn
    await conn.close()


@pytest.fixture(scope="module")
async def jobs(db: asyncpg.Connection) -> dict[str, int]:
    """A campaign with one Running, one Paused and one Queued job, contacts in every state and attempts."""
    tag = uuid.uuid4().hex[:8]
    campaign = await db.fetchval("INSERT INTO campaigns (name, definition) VALUES ($1, '{}') RETURNING id",
                                 f"cache-{tag}")
    list_id = await db.fetchval("INSERT INTO contact_lists (name) VALUES ($1) RETURNING id", f"cache-{tag}")
    out: dict[str, int] = {}
    for state, contacts in (("Running", 12), ("Paused", 7), ("Queued", 3)):
        job = await db.fetchval("INSERT INTO jobs (campaign_id, list_id, state) VALUES ($1, $2, $3) RETURNING id",
                                campaign, list_id, state)
        out[state] = job
        await add_progress(db, job, contacts)
        # owned already (by a CM that is not running): the Common CD of these tests reallocates them, it does not
        # start them, so the cache content the rebuild checks below compare is the rebuild's alone
        await db.execute("INSERT INTO ha_assignment (service, item, owner_server, owner_instance)"
                         " VALUES ('campaign_manager', $1, 'pom2', 'gone-cm')", f"job:{job}")
    return out


async def add_progress(db: asyncpg.Connection, job: int, contacts: int, prefix: str = "c") -> None:
    states = ["pending", "dialing", "done", "filtered_out"]
    for i in range(contacts):
        cid = f"{prefix}{i}"
        state = states[i % 4]
        await db.execute("INSERT INTO job_contacts (job_id, contact_id, state, attempts) VALUES ($1, $2, $3, $4)",
                         job, cid, state, 1 if state in ("dialing", "done") else 0)
        if state in ("dialing", "done"):
            done = state == "done"
            await db.execute(
                "INSERT INTO attempts (job_id, contact_id, attempt_no, state, code, cm_server, cm_instance,"
                " assignment_epoch) VALUES ($1, $2, 1, $3, $4, 'pom1', 'test', 1)",
                job, cid, "completed" if done else "dialing", ("ANSWER_HUMAN" if i % 8 == 2 else "NO_ANSWER")
                if done else None)


@pytest.fixture(scope="module")
async def cache(stack: Stack) -> AsyncIterator[OperationalCache]:
    async with OperationalCache.from_topology(stack.topo) as c:
        yield c


async def test_one_node_killed_under_load_zero_failed_operations(
    stack: Stack, db: asyncpg.Connection, jobs: dict[str, int], cache: OperationalCache,
) -> None:
    # a fresh cluster holds no generation: gated operations are refused until a rebuild ran
    if await cache.generation() is None:
        with pytest.raises(JobStartRefused, match="being rebuilt from PostgreSQL"):
            await cache.start_job(JobEntry(99_998, 1, "default", "Filter in Progress"))
    assert await rebuild_when_lock_free(db, cache) is not None
    await cache.get_job(jobs["Running"])  # connect, and learn which node serves this client
    victim = next(n for n in nodes(stack) if (n.address, n.thin_client_port) == cache.connected_to)
    ok: list[float] = []
    failed: list[BaseException] = []
    stop = asyncio.Event()

    async def worker(w: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            t0 = time.monotonic()
            try:
                job = JobEntry(10_000 + w, 1, "default", "Running", updated_at=float(i))
                await cache.put_job(job)
                assert await cache.get_job(job.job_id) == job, "read-your-write broken"
                await cache.set_agent_state(AgentEntry(f"agent-{w}", "Busy" if i % 2 else "Ready", job_id=job.job_id))
                await cache.set_callback(Callback(f"cb-{w}-{i}", job.job_id, f"c{i}", f"agent-{w}",
                                                  "2026-12-02T09:00:00+00:00"))
                await cache.add_contact(ContactAdd(1, f"w{w}-{i}", "+33123456789", "Europe/Paris"))
                ok.append(time.monotonic() - t0)
            except Exception as exc:  # any error is a failed client operation
                failed.append(exc)

    workers = [asyncio.create_task(worker(w)) for w in range(4)]
    try:
        await until(lambda: _ge(len(ok), 50), "50 operation rounds before the kill")
        before = len(ok)
        t_kill = time.monotonic()
        await asyncio.to_thread(victim.kill)
        survivors = [n for n in nodes(stack) if n is not victim]

        async def left() -> bool:
            return all(n.topology_servers() == 2 for n in survivors)

        FIGURES["node_left_s"] = round(await until(left, f"{victim.name} leaves the topology"), 2)
        mark = len(ok)
        await until(lambda: _ge(len(ok), mark + 100), "100 operation rounds after the node left")
    finally:
        stop.set()
        await asyncio.gather(*workers)
    FIGURES["rounds"] = len(ok)
    FIGURES["rounds_after_kill"] = len(ok) - before
    FIGURES["retries"] = cache.stats.retries
    FIGURES["max_round_ms"] = round(max(ok) * 1000)
    FIGURES["kill_to_done_s"] = round(time.monotonic() - t_kill, 2)
    print("one node killed:", json.dumps(FIGURES))
    assert not failed, f"{len(failed)} failed client operations, first: {failed[0]!r}"
    assert cache.connected_to != (victim.address, victim.thin_client_port)

    victim.start()
    await victim.wait_ready()
    await until(lambda: full_topology(stack), f"{victim.name} rejoins")


def _ge(a: int, b: int) -> Awaitable[bool]:
    async def check() -> bool:
        return a >= b

    return check()


async def test_every_node_down_each_impact_is_a_clear_error_quickly(
    stack: Stack, jobs: dict[str, int], cache: OperationalCache,
) -> None:
    assert await cache.get_job(jobs["Running"]) is not None
    await asyncio.gather(*(asyncio.to_thread(n.kill) for n in nodes(stack)))
    fresh = OperationalCache.from_topology(stack.topo)
    calls: list[tuple[str, Callable[[OperationalCache], Awaitable[Any]], type[CacheUnavailable], str]] = [
        ("set a callback", lambda c: c.set_callback(Callback("cb-x", jobs["Running"], "c1", "a1",
                                                             "2026-12-02T09:00:00+00:00")),
         CallbackRefused, "callback refused"),
        ("read monitor statistics", lambda c: c.job_statistics(list(jobs.values())), StatisticsFrozen,
         "monitor statistics frozen"),
        ("publish job counters", lambda c: c.put_job(JobEntry(jobs["Running"], 1, "default", "Running")),
         StatisticsFrozen, "monitor statistics frozen"),
        ("start a new job", lambda c: c.start_job(JobEntry(99_999, 1, "default", "Filter in Progress")),
         JobStartRefused, "new job start refused"),
        ("add a contact", lambda c: c.add_contact(ContactAdd(1, "new", "+33123456789", "Europe/Paris")),
         AddContactRefused, "add contact refused"),
    ]
    slowest = 0.0
    try:
        for client in (cache, fresh):
            for what, call, error, impact in calls:
                t0 = time.monotonic()
                with pytest.raises(error) as info:
                    await call(client)
                took = time.monotonic() - t0
                slowest = max(slowest, took)
                assert str(info.value).startswith(impact), f"{what}: unclear message {info.value}"
                assert "no cache node is reachable" in str(info.value)
                assert took < 5.0, f"{what} took {took:.1f} s to be refused"
    finally:
        await fresh.close()
    FIGURES["all_down_slowest_refusal_ms"] = round(slowest * 1000)
    print("all nodes down:", json.dumps(FIGURES))


@dataclass
class Director:
    """A real Common CD (``--cache on``) and a Campaign Manager as the CD sees it (an ``ha_member`` row kept
    fresh by a task): enough for the CD to allocate, i.e. start, a Queued job."""

    rec: ProcessRecord
    job_id: int
    cm_instance: str


@pytest.fixture(scope="module")
async def director(stack: Stack, topology_file: Path, db: asyncpg.Connection,
                   pg_dsn: str) -> AsyncIterator[Director]:
    instance = f"cache-cm-{uuid.uuid4().hex[:8]}"

    async def fake_cm() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            while True:
                await conn.execute(
                    "INSERT INTO ha_member (service, server, instance_id, state, load)"
                    " VALUES ('campaign_manager', 'pom3', $1, 'RUNNING', 0) ON CONFLICT (service, server) DO UPDATE"
                    " SET instance_id = $1, state = 'RUNNING', load = 0, seen_at = now()", instance)
                await asyncio.sleep(0.2)
        finally:
            await conn.close()

    tag = uuid.uuid4().hex[:8]
    await admin.create_list(db, f"cache-start-{tag}")
    campaign = await admin.create_campaign(db, {"name": f"cache-start-{tag}", "contact_list": f"cache-start-{tag}",
                                                "pacing": {"calls_per_second": 1}})
    job_id = await admin.create_job(db, campaign.id)
    task = asyncio.create_task(fake_cm())
    rec = start_daemon(stack.topo, topology_file, "pom1", "campaign-director", "--cache", "on")
    try:
        yield Director(rec, job_id, instance)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.to_thread(stop_process, rec, stack.topo.lab_dir() / "run")
        await db.execute("UPDATE ha_member SET state = 'STOPPED' WHERE service = 'campaign_manager'"
                         " AND instance_id = $1", instance)


async def owner(db: asyncpg.Connection, job_id: int) -> str | None:
    got = await db.fetchval("SELECT owner_instance FROM ha_assignment WHERE service = 'campaign_manager'"
                            " AND item = $1", f"job:{job_id}")
    return None if got is None else str(got)


async def test_the_common_cd_refuses_a_new_job_start_while_the_cache_is_down(
    db: asyncpg.Connection, director: Director,
) -> None:
    """The guide's "a new job cannot start": the job stays Queued and unallocated, one open alarm says why."""

    async def alarmed() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM cd_alarms WHERE kind = 'job_start_refused'"
                                      " AND job_id = $1 AND cleared_at IS NULL", director.job_id))

    await until(alarmed, "the Common CD raises job_start_refused for the new job")
    row = await db.fetchrow("SELECT message FROM cd_alarms WHERE kind = 'job_start_refused' AND job_id = $1"
                            " AND cleared_at IS NULL", director.job_id)
    assert row["message"].startswith("new job start refused: start job"), row["message"]
    assert await owner(db, director.job_id) is None, "a job the cache refused was allocated"
    assert await db.fetchval("SELECT state FROM jobs WHERE id = $1", director.job_id) == "Queued"
    # retried every allocation round, the refusal stays one open alarm
    n_open = await db.fetchval("SELECT count(*) FROM cd_alarms WHERE kind = 'job_start_refused' AND job_id = $1",
                               director.job_id)
    assert n_open == 1


@pytest.fixture(scope="module")
async def services(stack: Stack, topology_file: Path) -> AsyncIterator[dict[str, ProcessRecord]]:
    """A cache service on every server. They run as the lab operator (root): a supervisor drops to the
    server's uid when it starts the node, exactly as the launcher does (setpriv)."""
    recs: dict[str, ProcessRecord] = {}
    try:
        for node in nodes(stack):
            recs[node.server.name] = start_daemon(stack.topo, topology_file, node.server.name, "cache-service",
                                                  as_server_uid=False)
        yield recs
    finally:
        run_dir = stack.topo.lab_dir() / "run"
        await asyncio.gather(*(asyncio.to_thread(stop_process, rec, run_dir) for rec in recs.values()))
        # the services restarted nodes the tests killed or froze: leave one whole cluster for later tests
        await stack.heal_ignite()


async def test_cache_services_restart_the_lost_cluster_and_rebuild_it_from_postgres(
    stack: Stack, db: asyncpg.Connection, jobs: dict[str, int], cache: OperationalCache,
    services: dict[str, ProcessRecord], director: Director,
) -> None:
    # PostgreSQL moved on while the cache was down: the rebuild must show the new counters
    await add_progress(db, jobs["Running"], 6, prefix="late")
    t0 = time.monotonic()
    assert all(not n.running() for n in nodes(stack)), "the previous test left a node running"
    await until(lambda: full_topology(stack), "the cache services start every node into one cluster")
    FIGURES["cluster_back_s"] = round(time.monotonic() - t0, 2)

    async def rebuilt() -> bool:
        try:
            return await cache.generation() is not None
        except CacheUnavailable:
            return False

    await until(rebuilt, "a cache service rebuilds the cache")
    FIGURES["cluster_back_to_rebuilt_s"] = round(time.monotonic() - t0, 2)
    expected = {e.job_id: e for e in await load_jobs(db, list(jobs.values()))}
    got = await cache.job_statistics(list(jobs.values()))
    running, paused, queued = (got[jobs[s]] for s in ("Running", "Paused", "Queued"))
    assert strip(running) == strip(expected[jobs["Running"]])
    assert running.state == "Running" and running.counters is not None
    assert running.counters.contacts_total == 18 and running.counters.attempts_total == 9
    assert strip(queued) == strip(expected[jobs["Queued"]])
    assert paused.state == "Paused" and paused.refilter and paused.counters is None, "paused stats return on resume"

    # the operations refused while the cache was down work again
    await cache.set_callback(Callback("cb-after", jobs["Running"], "c1", "a1", "2026-12-02T09:00:00+00:00"))
    await cache.add_contact(ContactAdd(1, "after", "+33123456789", "Europe/Paris"))

    # idempotent: a second rebuild leaves the same content
    before = {k: strip(v) for k, v in (await cache.job_statistics(list(jobs.values()))).items()}
    assert await rebuild_when_lock_free(db, cache) is not None
    after = {k: strip(v) for k, v in (await cache.job_statistics(list(jobs.values()))).items()}
    assert after == before

    # the paused job's statistics come back on resume
    resumed = await refresh_job(db, cache, jobs["Paused"])
    assert resumed is not None and strip(await cache.get_job(jobs["Paused"])) == strip(expected[jobs["Paused"]])

    async def members_running() -> bool:
        rows = await db.fetch("SELECT server, state FROM ha_member WHERE service = 'cache_service' "
                              "AND instance_id <> '' AND seen_at > now() - interval '5 seconds'")
        return {r["server"] for r in rows if r["state"] == "RUNNING"} >= set(services)

    await until(members_running, "every cache service shows RUNNING in ha_member")

    # the job the Common CD refused while the cache was down starts now, and its alarm is cleared
    async def started() -> bool:
        return await owner(db, director.job_id) == director.cm_instance

    await until(started, "the refused job is allocated once the cache is back")
    assert await db.fetchval("SELECT count(*) FROM cd_alarms WHERE kind = 'job_start_refused' AND job_id = $1"
                             " AND cleared_at IS NULL", director.job_id) == 0
    # the cache holds the job (as the CD started it, or as a later rebuild read it from PostgreSQL)
    assert await cache.get_job(director.job_id) is not None
    print("restore:", json.dumps(FIGURES))


async def test_cache_service_restarts_its_killed_local_node(
    stack: Stack, jobs: dict[str, int], services: dict[str, ProcessRecord],
) -> None:
    node = nodes(stack)[2]
    rec = node.record()
    assert rec is not None and rec.alive()
    t0 = time.monotonic()
    await asyncio.to_thread(node.kill)

    async def restarted() -> bool:
        new = node.record()
        return new is not None and new.pid != rec.pid and new.alive() and await node.probe()

    await until(restarted, f"the cache service of {node.server.name} restarts {node.name}")
    FIGURES["local_restart_s"] = round(time.monotonic() - t0, 2)
    new = node.record()
    assert new is not None
    uid = stack.topo.server_uid(node.server.name)
    assert process_uid(new.pid) == uid, "the restarted node must run under its server's uid, as the launcher starts it"
    await until(lambda: full_topology(stack), f"{node.name} rejoins the cluster")
    FIGURES["local_restart_rejoined_s"] = round(time.monotonic() - t0, 2)
    # the restarted node holds the replicated entries again
    async with OperationalCache([(node.address, node.thin_client_port)]) as local:
        got = await local.get_job(jobs["Running"])
        assert got is not None and got.state == "Running"
    print("local restart:", json.dumps(FIGURES))



async def test_frozen_node_costs_a_bounded_delay_not_a_failure(
    stack: Stack, cache: OperationalCache, services: dict[str, ProcessRecord],
) -> None:
    """SIGSTOP of the node the client uses: the attempt times out, the next one goes to a live node (zero
    failed operations); once continued, the node that was dropped from the cluster comes back (it rejoins,
    or its cache service restarts it)."""
    await cache.get_agent_state("agent-0")
    victim = next(n for n in nodes(stack) if (n.address, n.thin_client_port) == cache.connected_to)
    rec = victim.record()
    assert rec is not None
    os.kill(rec.pid, signal.SIGSTOP)
    slowest = 0.0
    try:
        for i in range(20):
            t0 = time.monotonic()
            await cache.set_agent_state(AgentEntry("agent-frozen", "Ready" if i % 2 else "Busy"))
            assert (await cache.get_agent_state("agent-frozen")) is not None
            slowest = max(slowest, time.monotonic() - t0)
    finally:
        os.kill(rec.pid, signal.SIGCONT)
    FIGURES["frozen_node_slowest_op_s"] = round(slowest, 2)
    assert cache.connected_to != (victim.address, victim.thin_client_port)
    t0 = time.monotonic()
    await until(lambda: full_topology(stack), f"{victim.name} is back in the cluster", deadline_s=240)
    FIGURES["frozen_node_back_s"] = round(time.monotonic() - t0, 2)
    print("frozen node:", json.dumps(FIGURES))
