"""`pom-ha bench server-loss [--containers]`: every process (or container) of one POM server is killed while
the demo campaigns dial; the victim rotates over the servers.

Per trial, on the database clock (the fault time is read from PostgreSQL just before the kill; every
other time is a timestamp the database wrote):

- roles back: until every role the victim held — the leases it held (singletons and per-zone roles) and
  the items assigned to it (Campaign Manager jobs) — is held by another server: the latest
  ``acquired_at`` / ``assigned_at`` of the new holders, minus the fault time;
- dial gap: for every job that was running, the longest gap between two consecutive attempts from the
  last attempt before the fault until dialing has resumed after it;
- duplicates: two attempts of one contact of one job whose calls overlap (the second created before the
  first completed) — a contact dialed twice at once; must be 0;
- stuck: attempts of the window still ``dialing`` long after the fault (the dead CM's in-flight attempts
  must be resolved by CALL_FAILOVER); must be 0.

Between trials the victim is brought back (containers: the restart policy, or ``docker start``; processes:
its servers and daemons started again) and the bench waits until its components are DORMANT / RUNNING
again, so every trial starts from a complete component table.

The measurement helpers are also what tests/chaos/test_compose_lab.py checks each fault with.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from pom_ha.bench.failover import latency_summary, poll

# a role: ("lease", service, scope) or ("assign", service, item)
Role = tuple[str, str, str]


async def db_now(conn: asyncpg.Connection) -> datetime:
    at: datetime = await conn.fetchval("SELECT clock_timestamp()")
    return at


async def roles_of(conn: asyncpg.Connection, server: str) -> set[Role]:
    """The roles ``server`` holds now: unexpired leases and assigned items."""
    leases = await conn.fetch(
        "SELECT service, scope FROM ha_lease WHERE holder_server = $1 AND expires_at > now()", server)
    items = await conn.fetch(
        "SELECT a.service, a.item FROM ha_assignment a"
        " LEFT JOIN jobs j ON a.service = 'campaign_manager' AND a.item = 'job:' || j.id"
        " WHERE a.owner_server = $1 AND (j.id IS NULL OR j.state = 'Running')", server)
    return {("lease", r["service"], r["scope"]) for r in leases} | {("assign", r["service"], r["item"])
                                                                     for r in items}


async def roles_moved_at(conn: asyncpg.Connection, roles: set[Role], victim: str) -> datetime | None:
    """When every role of ``roles`` is held by a server other than ``victim``: the latest acquisition time
    (database clock); None while any is still with the victim or unheld."""
    latest: datetime | None = None
    for kind, service, key in sorted(roles):
        if kind == "lease":
            row = await conn.fetchrow(
                "SELECT holder_server, acquired_at FROM ha_lease WHERE service = $1 AND scope = $2"
                " AND expires_at > now()", service, key)
            at_col = "acquired_at"
            owner = row["holder_server"] if row else None
        else:
            row = await conn.fetchrow("SELECT owner_server, assigned_at FROM ha_assignment"
                                      " WHERE service = $1 AND item = $2", service, key)
            at_col = "assigned_at"
            owner = row["owner_server"] if row else None
            if row is None and service == "campaign_manager":
                # the job ended meanwhile: nothing left to hold
                continue
        if row is None or owner in (None, victim) or row[at_col] is None:
            return None
        latest = row[at_col] if latest is None or row[at_col] > latest else latest
    return latest


async def running_jobs(conn: asyncpg.Connection) -> dict[int, str]:
    """Running jobs -> their zone."""
    rows = await conn.fetch("SELECT id, zone FROM jobs WHERE state = 'Running' ORDER BY id")
    return {int(r["id"]): str(r["zone"]) for r in rows}


async def dialing_since(conn: asyncpg.Connection, jobs: list[int], since: datetime) -> dict[int, datetime | None]:
    """The first attempt of each job created after ``since`` (None: none yet)."""
    rows = await conn.fetch("SELECT job_id, min(created_at) AS first FROM attempts"
                            " WHERE job_id = ANY($1::bigint[]) AND created_at > $2 GROUP BY job_id", jobs, since)
    got = {int(r["job_id"]): r["first"] for r in rows}
    return {j: got.get(j) for j in jobs}


async def longest_gaps(conn: asyncpg.Connection, jobs: list[int], since: datetime,
                       until: datetime) -> dict[int, float]:
    """Per job, the longest gap (s) between consecutive attempts from its last attempt at or before
    ``since`` to its last attempt at or before ``until`` — or to ``until`` itself when it has not dialed
    again by then (a job that stopped dialing shows the whole stop)."""
    gaps: dict[int, float] = {}
    for job in jobs:
        start = await conn.fetchval("SELECT max(created_at) FROM attempts WHERE job_id = $1 AND created_at <= $2",
                                    job, since)
        times = [r["created_at"] for r in await conn.fetch(
            "SELECT created_at FROM attempts WHERE job_id = $1 AND created_at > $2 AND created_at <= $3"
            " ORDER BY created_at", job, start or since, until)]
        points = [start or since, *times]
        if not times:
            points.append(until)
        gaps[job] = max((b - a).total_seconds() for a, b in itertools.pairwise(points))
    return gaps


async def duplicates(conn: asyncpg.Connection, since: datetime | None = None) -> int:
    """Contacts dialed twice at once: two attempts of one (job, contact) whose calls overlap."""
    return int(await conn.fetchval(
        "SELECT count(*) FROM attempts a JOIN attempts b ON b.job_id = a.job_id AND b.contact_id = a.contact_id"
        " AND b.attempt_no > a.attempt_no"
        " WHERE b.created_at < coalesce(a.completed_at, 'infinity'::timestamptz)"
        " AND ($1::timestamptz IS NULL OR b.created_at >= $1)", since))


async def stuck(conn: asyncpg.Connection, older_than_s: float) -> int:
    """Attempts still in flight ``older_than_s`` after they were created (none may stay so)."""
    return int(await conn.fetchval(
        "SELECT count(*) FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE a.state = 'dialing'"
        " AND a.created_at < now() - make_interval(secs => $1)", older_than_s))


async def members_back(conn: asyncpg.Connection, server: str, services: list[str], since: datetime, *,
                       restarted: bool = True) -> bool:
    """Every HA service of ``services`` on ``server`` is registered again — a member started after ``since``
    (``restarted``), or one that refreshed its row after ``since`` (a paused or cut-off daemon that was not
    restarted) — fresh, and DORMANT / RUNNING / MASTER (the caller checks what it may lead)."""
    col = "started_at" if restarted else "seen_at"
    rows = await conn.fetch(
        f"SELECT service, state FROM ha_member WHERE server = $1 AND {col} > $2"
        " AND seen_at > now() - interval '5 seconds' AND state IN ('DORMANT', 'RUNNING', 'MASTER')",
        server, since)
    have = {r["service"] for r in rows}
    return all(s in have for s in services)


def table_shape(table: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    """The guide's view of a component table (``pom-ha status --json`` components): per component, how many
    servers are MASTER, DORMANT and RUNNING (fresh members only). Equal shapes = the same table up to which
    server leads."""
    shape: dict[str, tuple[int, int, int]] = {}
    for service, cells in table.items():
        fresh = [c["state"] for c in cells.values() if not c.get("stale")]
        shape[service] = (fresh.count("MASTER"), fresh.count("DORMANT"), fresh.count("RUNNING"))
    return shape




# ---- one trial ---------------------------------------------------------------------------------------------
@dataclass
class Trial:
    victim: str
    roles: int
    roles_back_ms: float
    dial_gaps_ms: dict[int, float]
    duplicates: int
    stuck: int
    back_dormant_s: float


@dataclass
class Target:
    """What a trial acts on: the lab's database, and how to kill / bring back one POM server."""
    dsn: str
    servers: list[str]
    kill: Callable[[str], Awaitable[None]]
    revive: Callable[[str], Awaitable[None]]
    ha_services: list[str] = field(default_factory=lambda: [
        "cache_service", "rule_engine", "campaign_director", "campaign_manager", "agent_manager",
        "event_aggregator"])


async def run_trial(target: Target, victim: str, *, timeout_s: float = 120.0,
                    stuck_after_s: float = 30.0, echo: Callable[[str], None] = print) -> Trial:
    conn = await asyncpg.connect(target.dsn, timeout=90)
    try:
        jobs = list(await running_jobs(conn))
        if not jobs:
            raise RuntimeError("no running job: start the demo campaigns first (they dial during every trial)")
        roles = await roles_of(conn, victim)
        t_fault = await db_now(conn)
        await target.kill(victim)
        moved_at = await poll(lambda: roles_moved_at(conn, roles, victim), timeout_s,
                              f"every role of {victim} held elsewhere")
        # dialing resumed: every job that is still running dialed after the roles came back
        async def resumed() -> bool:
            still = set(await running_jobs(conn))
            first = await dialing_since(conn, [j for j in jobs if j in still], moved_at)
            return all(v is not None for v in first.values())

        await poll(resumed, timeout_s, "every running job dialing again")
        until = await db_now(conn)
        gaps = await longest_gaps(conn, jobs, t_fault, until)
        dup = await duplicates(conn, since=t_fault)
        await target.revive(victim)
        t_revive = time.monotonic()
        await poll(lambda: members_back(conn, victim, target.ha_services, t_fault), timeout_s,
                   f"{victim}'s components registered again")
        back_s = time.monotonic() - t_revive
        # in-flight attempts of the dead CM are resolved (CALL_FAILOVER) within the CM's own timeouts
        stuck_n = await poll_stuck(conn, stuck_after_s, timeout_s)
        roles_ms = (moved_at - t_fault).total_seconds() * 1000 if roles else 0.0
        trial = Trial(victim, len(roles), roles_ms, {j: g * 1000 for j, g in gaps.items()}, dup, stuck_n, back_s)
        echo(f"  {victim}: {len(roles)} roles back in {roles_ms:.0f} ms; longest dial gap "
             f"{max(trial.dial_gaps_ms.values()):.0f} ms; duplicates {dup}; stuck {stuck_n}; "
             f"back registered in {back_s:.1f} s")
        return trial
    finally:
        await conn.close()


async def poll_stuck(conn: asyncpg.Connection, older_than_s: float, timeout_s: float) -> int:
    """Attempts in flight longer than ``older_than_s``, once that has had time to resolve (0 expected)."""
    deadline = time.monotonic() + timeout_s
    n = await stuck(conn, older_than_s)
    while n and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        n = await stuck(conn, older_than_s)
    return n


def summarise(trials: list[Trial]) -> dict[str, Any]:
    roles = [t.roles_back_ms for t in trials]
    gaps = [g for t in trials for g in t.dial_gaps_ms.values()]
    r = latency_summary(roles)
    g = latency_summary(gaps)
    return {
        "trials": len(trials),
        "roles_back_p50_ms": r["p50_ms"], "roles_back_p99_ms": r["p99_ms"], "roles_back_max_ms": r["max_ms"],
        "dial_gap_p50_ms": g["p50_ms"], "dial_gap_p99_ms": g["p99_ms"], "dial_gap_max_ms": g["max_ms"],
        "duplicates": sum(t.duplicates for t in trials),
        "stuck": sum(t.stuck for t in trials),
        "victims": [t.victim for t in trials],
    }


async def run_trials(target: Target, trials: int, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    done: list[Trial] = []
    for i in range(trials):
        victim = target.servers[i % len(target.servers)]
        done.append(await run_trial(target, victim, echo=echo))
    return summarise(done)


# ---- the two labs ------------------------------------------------------------------------------------------
async def _container_target(echo: Callable[[str], None]) -> tuple[Target, Callable[[], Awaitable[None]]]:
    """The container lab: the running one of the compose project, or one brought up (and down after)."""
    import subprocess

    from pom_ha.config import REPO_ROOT
    from pom_ha.lab.containers import ComposeLab, docker_available

    why = docker_available()
    if why:
        raise RuntimeError(f"--containers needs a Docker engine: {why} (scripts/docker-engine ensure)")
    lab = ComposeLab()
    script = str(REPO_ROOT / "scripts" / "docker-lab")
    started = not lab.running()
    if started:
        echo("bringing the container lab up (scripts/docker-lab up)")
        up = await asyncio.to_thread(subprocess.run, [script, "up"], capture_output=True, text=True, timeout=1200)
        if up.returncode != 0:
            raise RuntimeError(f"scripts/docker-lab up failed: {up.stderr.strip()[-1000:]}")

    async def kill(server: str) -> None:
        await asyncio.to_thread(lab.kill, *lab.server_services(server))

    async def revive(server: str) -> None:
        # the restart policy (unless-stopped) starts them again; this only makes sure, holder first
        await asyncio.to_thread(lab.start, server)
        await asyncio.to_thread(lab.start, *[s for s in lab.server_services(server) if s != server])

    async def close() -> None:
        await asyncio.to_thread(lab.heal)
        if started:
            await asyncio.to_thread(subprocess.run, [script, "down"], capture_output=True, text=True, timeout=600)

    return Target(lab.dsn, lab.servers, kill, revive), close


async def _process_target(block: int, echo: Callable[[str], None]) -> tuple[Target, Callable[[], Awaitable[None]]]:
    """A private process lab (config/lab.toml moved to 127.0.<block>.N): servers, every daemon on every POM
    server, the demo campaigns and desktop simulators — what `pom-ha lab up` starts."""
    from pom_ha.bench.isolated import isolated_topology
    from pom_ha.config import dump_topology, load_topology
    from pom_ha.infra.process import kill_process, records, stop_process
    from pom_ha.infra.stack import Stack
    from pom_ha.lab.platform import create_agent_demo, create_demo, start_desktops, start_platform, wait_platform

    topo = isolated_topology(load_topology(None), block=block)
    topology_file = dump_topology(topo, topo.lab_dir() / "topology.toml")
    topology_file.chmod(0o644)
    stack = Stack(topo)
    run_dir = topo.lab_dir() / "run"

    async def close() -> None:
        recs = [r for r in records(run_dir) if r.alive()]
        await asyncio.gather(*(asyncio.to_thread(stop_process, r, run_dir) for r in recs))
        await stack.down()
        if not os.environ.get("POM_KEEP_LAB"):
            shutil.rmtree(topo.lab_dir(), ignore_errors=True)

    try:
        echo(f"process lab on 127.0.{block}.N (lab folder {topo.lab_dir()})")
        await stack.up(progress=lambda m: echo(f"  {m}"))
        start_platform(topo, topology_file, echo=echo)
        await wait_platform(topo, timeout_s=300)
        echo(await create_demo(topo, contacts=50_000, calls_per_second=25.0, echo=echo))
        jobs = await create_agent_demo(topo, echo=echo)
        start_desktops(topo, topology_file, jobs, echo=echo)
    except BaseException:
        await close()
        raise

    async def kill(server: str) -> None:
        victims = [r for r in records(run_dir) if r.alive() and r.name.endswith(f"-{server}")]
        for launcher in stack.launchers():
            if launcher.kind != "postgres" and launcher.server.name == server and (rec := launcher.record()) \
                    is not None and rec.alive() and rec.name not in {v.name for v in victims}:
                victims.append(rec)
        await asyncio.gather(*(asyncio.to_thread(kill_process, r) for r in victims))

    async def revive(server: str) -> None:
        for launcher in stack.launchers():
            if launcher.kind != "postgres" and launcher.server.name == server and not launcher.running():
                launcher.start()
        start_platform(topo, topology_file, echo=lambda _m: None)

    return Target(topo.postgres.dsn(), [s.name for s in topo.servers], kill, revive), close


async def run_bench(*, containers: bool, trials: int, block: int = 30,
                    echo: Callable[[str], None] = print) -> dict[str, Any]:
    target, close = await (_container_target(echo) if containers else _process_target(block, echo))
    try:
        # the demo dials before the first trial
        conn = await asyncpg.connect(target.dsn, timeout=90)
        try:
            await poll(lambda: running_jobs(conn), 120, "the demo campaigns running")
            t0 = await db_now(conn)
            jobs = list(await running_jobs(conn))
            await poll(lambda: _all_dialing(conn, jobs, t0), 180, "every demo job dialing")
        finally:
            await conn.close()
        result = await run_trials(target, trials, echo=echo)
    finally:
        await close()
    return {"lab": "containers" if containers else "processes", **result}


async def _all_dialing(conn: asyncpg.Connection, jobs: list[int], since: datetime) -> bool:
    first = await dialing_since(conn, jobs, since)
    return all(v is not None for v in first.values())
