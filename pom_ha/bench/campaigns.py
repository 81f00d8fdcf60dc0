"""Campaign benchmarks on real daemons: throughput, CSV import, and component failover (CD, CM, RE).

Each run is self-contained: a private PostgreSQL on an isolated copy of the topology (127.0.14.N /
127.0.15.1), the daemons it needs started under the servers' uids, everything stopped at the end (set
``POM_KEEP_LAB=1`` to keep the lab folder with its logs). All times of a measurement are read on the
database clock, so the two ends of every sample are on one clock.

* ``throughput`` — agentless jobs (one per server) paced high, a media simulator 100x faster than real
  time; attempts written per hour over the measured window (after a warm-up).
* ``import`` — a generated CSV imported by the real Common CD (queued like an operator's import); records
  per hour from the import's start to its end as the CD recorded them.
* ``failover --component`` — a job dialing through a media simulator while the component's master (RE, CD)
  or the job's Campaign Manager is SIGKILLed; the time from the kill to dialing again (RE, CM: the first
  attempt written after the new master acquired / by another CM) or to the new Common CD's first fenced
  action (its ``first_fenced_action`` event, written fenced as its master work starts).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import asyncpg

from pom_ha.bench.failover import latency_summary, percentile, poll
from pom_ha.bench.isolated import isolated_topology
from pom_ha.config import Topology, dump_topology
from pom_ha.infra.postgres import PostgresLauncher
from pom_ha.infra.process import InfraError, ProcessRecord, kill_process, log_tail, stop_process
from pom_ha.lab.daemons import start_daemon

Component = Literal["cd", "cm", "re"]
COMPONENTS: tuple[Component, ...] = ("cd", "cm", "re")
# the vendor's documented failover times (HA guide) and its busy-hour / import figures
POM_FAILOVER_S = {"cd": 140.0, "cm": 300.0, "re": 45.0}
POM_ATTEMPTS_PER_HOUR = 500_000
POM_IMPORT_RECORDS_PER_HOUR = 500_000
BLOCK = 14
OUTCOMES = '{"ANSWER_HUMAN": 0.35, "ANSWER_MACHINE": 0.15, "BUSY": 0.2, "NO_ANSWER": 0.3}'


def noon_zone(now: datetime | None = None) -> str:
    """An ``Etc/GMT`` zone where it is about noon now, so the default calling window is open."""
    now = now or datetime.now(UTC)
    offset = (12 - now.hour) % 24
    offset = offset - 24 if offset > 12 else offset
    return f"Etc/GMT{-offset:+d}"


@dataclass
class BenchLab:
    topo: Topology
    topology_file: Path
    conn: asyncpg.Connection
    procs: dict[str, ProcessRecord] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.topo.lab_dir() / "run"

    def start(self, daemon: str, server: str, *args: str) -> ProcessRecord:
        name = f"{daemon}-{server}-{uuid.uuid4().hex[:4]}"
        rec = start_daemon(self.topo, self.topology_file, server, daemon, *args, name=name)
        self.procs[f"{daemon}@{server}"] = rec
        return rec

    def stop_all(self) -> None:
        for rec in self.procs.values():
            if rec.alive():
                stop_process(rec, self.run_dir, timeout_s=10)

    async def wait_members(self, service: str, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            n = await self.conn.fetchval(
                "SELECT count(*) FROM ha_member WHERE service = $1 AND state IN ('MASTER', 'DORMANT', 'RUNNING')"
                " AND seen_at > now() - interval '3 seconds'", service)
            if n >= count:
                return
            await asyncio.sleep(0.1)
        tails = "\n".join(f"--- {k}\n{log_tail(r.log, 15)}" for k, r in self.procs.items() if service[:4] in k)
        raise InfraError(f"{service}: fewer than {count} members up within {timeout_s:.0f} s\n{tails}")

    async def wait_replaced(self, service: str, server: str, old_instance: str, timeout_s: float = 90) -> None:
        """The daemon restarted on ``server`` is a member (``wait_members`` alone would count the killed
        instance's row, fresh for 3 s, and start the next trial while the new process is still starting)."""
        async def replaced() -> Any:
            return await self.conn.fetchval(
                "SELECT 1 FROM ha_member WHERE service = $1 AND server = $2 AND instance_id <> $3"
                " AND state IN ('MASTER', 'DORMANT', 'RUNNING') AND seen_at > now() - interval '3 seconds'",
                service, server, old_instance)

        await _poll(replaced, timeout_s, f"{service} on {server} restarted")

    async def wait_heartbeats(self, daemon: str, service: str, timeout_s: float = 30) -> None:
        """Every live ``daemon`` process sees all the others on its heartbeat links (its /health): the steady
        state a failover is measured from — a dormant takes over early only from a master it has seen."""
        recs = [r for k, r in self.procs.items() if k.startswith(f"{daemon}@") and r.alive()]
        deadline = time.monotonic() + timeout_s
        while True:
            peers = await asyncio.gather(*(asyncio.to_thread(_alive_peers, r, service) for r in recs))
            if all(n is not None and n >= len(recs) - 1 for n in peers):
                return
            if time.monotonic() > deadline:
                raise InfraError(f"{daemon}: heartbeat peers not all up within {timeout_s:.0f} s: {peers}")
            await asyncio.sleep(0.1)

    async def db_now(self) -> datetime:
        value: datetime = await self.conn.fetchval("SELECT clock_timestamp()")
        return value

    async def master(self, service: str) -> tuple[str, int]:
        row = await self.conn.fetchrow(
            "SELECT holder_server, epoch FROM ha_lease WHERE service = $1 AND scope = '' AND expires_at > now()",
            service)
        if row is None:
            raise InfraError(f"no {service} master")
        return str(row["holder_server"]), int(row["epoch"])


def _alive_peers(rec: ProcessRecord, service: str) -> int | None:
    """How many heartbeat peers the daemon sees alive (its /health, at the URL it logged), or None."""
    try:
        lines = Path(rec.log).read_text(errors="replace").splitlines()
        url = next(json.loads(line)["url"] for line in reversed(lines) if '"status endpoint listening"' in line)
        with urllib.request.urlopen(url, timeout=1.0) as reply:
            body = json.loads(reply.read())
        return len(body["heartbeat"][service]["alive_peers"])
    except (OSError, StopIteration, KeyError, ValueError):
        return None


@asynccontextmanager
async def bench_lab(base: Topology, *, block: int = BLOCK) -> AsyncIterator[BenchLab]:
    topo = isolated_topology(base, block=block)
    lab = topo.lab_dir()
    topology_file = dump_topology(topo, lab / "topology.toml")
    topology_file.chmod(0o644)
    pg = PostgresLauncher(topo)
    bench: BenchLab | None = None
    try:
        pg.start()
        await pg.wait_ready()
        await pg.bootstrap()
        conn = await asyncpg.connect(topo.postgres.dsn())
        bench = BenchLab(topo, topology_file, conn)
        # benchmarks retry at once: no minimum gap between attempts of one contact
        await conn.execute("UPDATE pim_config SET value = '0' WHERE key = 'RuleEngineMinGapBetweenAttemptsMs'")
        try:
            yield bench
        finally:
            await conn.close()
    finally:
        if bench is not None:
            await asyncio.to_thread(bench.stop_all)
        pg.stop()
        if not os.environ.get("POM_KEEP_LAB"):
            shutil.rmtree(lab, ignore_errors=True)


async def start_platform(bench: BenchLab, *, cd: bool = True, capacity: int = 20_000) -> None:
    servers = [s.name for s in bench.topo.servers]
    bench.start("media-simulator", servers[0], "--time-scale", "0.01", "--capacity", str(capacity),
                "--seed", "11", "--outcomes", OUTCOMES)
    for server in servers:
        bench.start("rule-engine", server)
    media = f"{bench.topo.servers[0].address}:{bench.topo.ports.media_simulator}"
    for server in servers:
        bench.start("campaign-manager", server, "--media", media)
    if cd:
        for server in servers:
            bench.start("campaign-director", server, "--cache", "off")
    await bench.wait_members("rule_engine", len(servers))
    await bench.wait_members("campaign_manager", len(servers))
    if cd:
        await bench.wait_members("campaign_director", len(servers))


async def create_campaign_job(
    conn: asyncpg.Connection, contacts: int, calls_per_second: float, *, queue: bool = True
) -> tuple[int, int]:
    """A campaign over a fresh list of ``contacts`` (noon time zone); returns (campaign id, job id or 0)."""
    from pom_ha.domain.campaigns import validate_campaign

    tag = uuid.uuid4().hex[:8]
    definition = validate_campaign({
        "name": f"bench-{tag}", "contact_list": f"bench-{tag}",
        "strategy": {"max_attempts": 3, "default_retry_interval_s": 0},
        "pacing": {"calls_per_second": calls_per_second},
    })
    list_id = await conn.fetchval("INSERT INTO contact_lists (name) VALUES ($1) RETURNING id", definition.contact_list)
    zone = noon_zone()
    prefix = int(tag[:4], 16) % 900 + 100
    await conn.copy_records_to_table("contacts", records=[
        (list_id, f"c{i:07d}", f"+1{prefix}{i:07d}", zone) for i in range(contacts)
    ], columns=["list_id", "contact_id", "phone", "timezone"])
    campaign = await conn.fetchval("INSERT INTO campaigns (name, definition) VALUES ($1, $2::jsonb) RETURNING id",
                                   definition.name, definition.model_dump_json())
    job = 0
    if queue:
        job = await conn.fetchval("INSERT INTO jobs (campaign_id, list_id) VALUES ($1, $2) RETURNING id",
                                  campaign, list_id)
    return int(campaign), int(job)


async def _poll(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    return await poll(check, timeout_s, what, every_s=0.02, error=InfraError)


# ---- throughput ----------------------------------------------------------------------------------------------
async def run_throughput(
    base: Topology, *, seconds: float = 60.0, warmup_s: float = 10.0, calls_per_second: float = 250.0,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    async with bench_lab(base) as bench:
        await start_platform(bench)
        servers = len(bench.topo.servers)
        per_job = int(calls_per_second * (seconds + warmup_s) * 1.5) + 100
        jobs = [(await create_campaign_job(bench.conn, per_job, calls_per_second))[1] for _ in range(servers)]
        echo(f"  {servers} jobs of {per_job} contacts, each paced at {calls_per_second:g} calls/s")

        async def dialing() -> bool:
            return bool(await bench.conn.fetchval("SELECT count(*) FROM attempts") > 0)

        await _poll(dialing, 90, "the first attempt")
        await asyncio.sleep(warmup_s)  # a fixed measurement window, not a wait for a condition
        t0, n0 = await bench.db_now(), await bench.conn.fetchval("SELECT count(*) FROM attempts")
        await asyncio.sleep(seconds)
        t1, n1 = await bench.db_now(), await bench.conn.fetchval("SELECT count(*) FROM attempts")
        owners = await bench.conn.fetchval(
            "SELECT count(DISTINCT owner_instance) FROM ha_assignment WHERE service = 'campaign_manager'")
        dup = await bench.conn.fetchval(
            "SELECT count(*) - count(DISTINCT (job_id, contact_id, attempt_no)) FROM attempts")
    elapsed = (t1 - t0).total_seconds()
    per_hour = (n1 - n0) / elapsed * 3600
    echo(f"  {n1 - n0} attempts in {elapsed:.1f} s over {owners} Campaign Managers")
    return {
        "attempts_per_hour": round(per_hour), "attempts": int(n1 - n0), "seconds": round(elapsed, 1),
        "jobs": len(jobs), "campaign_managers": int(owners), "duplicate_attempts": int(dup),
        "pom_ratio": round(per_hour / POM_ATTEMPTS_PER_HOUR, 2),
    }


# ---- import --------------------------------------------------------------------------------------------------
async def run_import(base: Topology, *, records: int = 200_000, echo: Callable[[str], None] = print) -> dict[str, Any]:
    from pom_ha.campaign import admin
    from pom_ha.lab.platform import write_demo_csv

    async with bench_lab(base, block=int(os.environ.get("POM_BENCH_BLOCK", BLOCK))) as bench:
        servers = [s.name for s in bench.topo.servers]
        for server in servers:
            bench.start("campaign-director", server, "--cache", "off")
        await bench.wait_members("campaign_director", len(servers))
        csv_path = bench.topo.lab_dir() / "bench" / "import.csv"
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        csv_path.parent.chmod(0o755)
        write_demo_csv(csv_path, records)
        await admin.create_list(bench.conn, "bench-import")
        cpu_before = _cpu_seconds(bench)
        imp = await admin.queue_import(bench.conn, "bench-import", csv_path=str(csv_path))
        echo(f"  import {imp.id} of {records} records queued")

        async def finished() -> Any:
            row = await bench.conn.fetchrow(
                "SELECT state, imported, rejected, started_at, finished_at FROM data_imports WHERE id = $1", imp.id)
            return row if row["state"] in ("completed", "failed") else None

        row = await _poll(finished, 1800, f"import {imp.id} finished")
        cpu_after = _cpu_seconds(bench)
        # the master imports; the dormants only heartbeat: the largest share is the importing director's
        cd_cpu_s = max((cpu_after[k] - cpu_before.get(k, 0.0) for k in cpu_after), default=0.0)
        stored = await bench.conn.fetchval(
            "SELECT count(*) FROM contacts c JOIN contact_lists l ON l.id = c.list_id WHERE l.name = 'bench-import'")
    if row["state"] != "completed":
        raise InfraError(f"import {imp.id} failed")
    elapsed = (row["finished_at"] - row["started_at"]).total_seconds()
    per_hour = records / elapsed * 3600
    return {
        "records_per_hour": round(per_hour), "records": records, "imported": int(row["imported"]),
        "rejected": int(row["rejected"]), "stored": int(stored), "seconds": round(elapsed, 2),
        "pom_ratio": round(per_hour / POM_IMPORT_RECORDS_PER_HOUR, 1),
        # the importing director's CPU time: records per CPU-hour of the Common CD master (one core's worth;
        # what the figure would be on a machine not shared with other work)
        "cd_cpu_seconds": round(cd_cpu_s, 2),
        "records_per_cpu_hour": round(records / cd_cpu_s * 3600) if cd_cpu_s > 0 else None,
    }


def _cpu_seconds(bench: BenchLab) -> dict[str, float]:
    """User + system CPU seconds used so far by each of the bench's campaign directors."""
    import psutil

    out: dict[str, float] = {}
    for name, rec in bench.procs.items():
        if not name.startswith("campaign-director@"):
            continue
        try:
            t = psutil.Process(rec.pid).cpu_times()
        except psutil.Error:
            continue
        out[name] = t.user + t.system
    return out


# ---- component failover --------------------------------------------------------------------------------------
async def _first_attempt_after(bench: BenchLab, job: int, after: datetime, *, other_than: str | None = None,
                               owned_by: str | None = None, timeout_s: float = 30) -> datetime:
    async def first() -> Any:
        return await bench.conn.fetchval(
            "SELECT min(created_at) FROM attempts WHERE job_id = $1 AND created_at > $2"
            " AND ($3::text IS NULL OR cm_instance <> $3) AND ($4::text IS NULL OR cm_instance = $4)",
            job, after, other_than, owned_by)

    value: datetime = await _poll(first, timeout_s, f"an attempt of job {job} after {after.isoformat()}")
    return value


async def _trial_re(bench: BenchLab, job: int) -> float:
    await bench.wait_heartbeats("rule-engine", "rule_engine")  # every dormant has seen the master
    server, epoch = await bench.master("rule_engine")
    instance = await bench.conn.fetchval(
        "SELECT holder_instance FROM ha_lease WHERE service = 'rule_engine' AND scope = '' AND epoch = $1", epoch)
    await _first_attempt_after(bench, job, await bench.db_now())  # dialing now
    rec = bench.procs[f"rule-engine@{server}"]
    fault = await bench.db_now()
    await asyncio.to_thread(kill_process, rec)

    async def new_master() -> Any:
        return await bench.conn.fetchval(
            "SELECT acquired_at FROM ha_lease WHERE service = 'rule_engine' AND scope = '' AND epoch > $1", epoch)

    acquired = await _poll(new_master, 30, "a new rule_engine master")
    resumed = await _first_attempt_after(bench, job, acquired)
    bench.start("rule-engine", server)
    await bench.wait_replaced("rule_engine", server, str(instance))
    return (resumed - fault).total_seconds() * 1000


async def _trial_cm(bench: BenchLab, job: int) -> float:
    async def owner() -> Any:  # the first trial starts right after the job is queued: wait for its allocation
        return await bench.conn.fetchrow(
            "SELECT owner_server, owner_instance FROM ha_assignment WHERE service = 'campaign_manager'"
            " AND item = $1", f"job:{job}")

    row = await _poll(owner, 60, f"job {job} allocated to a Campaign Manager")
    # dialing now, by that owner (its first filter of a big list takes seconds)
    await _first_attempt_after(bench, job, await bench.db_now(), owned_by=row["owner_instance"], timeout_s=60)
    rec = bench.procs[f"campaign-manager@{row['owner_server']}"]
    fault = await bench.db_now()
    await asyncio.to_thread(kill_process, rec)
    resumed = await _first_attempt_after(bench, job, fault, other_than=row["owner_instance"])
    media = f"{bench.topo.servers[0].address}:{bench.topo.ports.media_simulator}"
    bench.start("campaign-manager", row["owner_server"], "--media", media)
    await bench.wait_replaced("campaign_manager", row["owner_server"], row["owner_instance"])
    return (resumed - fault).total_seconds() * 1000


async def _trial_cd(bench: BenchLab) -> float:
    """Kill the Common CD master; the sample ends at the new master's ``first_fenced_action`` event (a fenced
    write the CD makes as soon as its master work starts, see services/campaign_director/daemon.py)."""
    await bench.wait_heartbeats("campaign-director", "campaign_director")  # every dormant has seen the master
    server, epoch = await bench.master("campaign_director")
    instance = await bench.conn.fetchval(
        "SELECT holder_instance FROM ha_lease WHERE service = 'campaign_director' AND scope = '' AND epoch = $1",
        epoch)
    rec = bench.procs[f"campaign-director@{server}"]
    fault = await bench.db_now()
    await asyncio.to_thread(kill_process, rec)

    async def first_action() -> Any:
        return await bench.conn.fetchval(
            "SELECT min(at) FROM ha_event WHERE service = 'campaign_director' AND scope = ''"
            " AND kind = 'first_fenced_action' AND epoch > $1", epoch)

    acted = await _poll(first_action, 30, "the new Common CD's first fenced action")
    bench.start("campaign-director", server, "--cache", "off")
    await bench.wait_replaced("campaign_director", server, str(instance))
    return float((acted - fault).total_seconds() * 1000)


async def run_component_failover(
    base: Topology, component: Component, trials: int, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    samples: list[float] = []
    async with bench_lab(base) as bench:
        await start_platform(bench)
        job = 0
        if component in ("re", "cm"):
            _, job = await create_campaign_job(bench.conn, 200_000, 50.0)
        for i in range(trials):
            ms = await (_trial_cd(bench) if component == "cd" else
                        _trial_re(bench, job) if component == "re" else _trial_cm(bench, job))
            samples.append(ms)
            echo(f"  trial {i + 1}/{trials}: {ms:.0f} ms")
        dup = await bench.conn.fetchval(
            "SELECT count(*) - count(DISTINCT (job_id, contact_id, attempt_no)) FROM attempts")
    p99 = percentile(samples, 99)
    return {
        "component": component, "mode": "kill", "trials": trials,
        **latency_summary(samples),
        "duplicate_attempts": int(dup), "pom_s": POM_FAILOVER_S[component],
        "pom_ratio_p99": round(POM_FAILOVER_S[component] * 1000 / p99, 1),
    }
