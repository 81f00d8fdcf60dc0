"""`pom-ha bench failover --component am`: Agent Manager failover with N logged-in desktops, and PostgreSQL's CPU
during it.

Self-contained (``bench_lab``: a private PostgreSQL on an isolated copy of the topology, 127.0.16.N /
127.0.17.1, everything stopped at the end; ``POM_KEEP_LAB=1`` keeps the lab folder with its logs). Two real
Agent Manager processes compete for the zone ``Default`` (the guide's two servers in one zone: one MASTER, one
DORMANT). ``agents`` desktop clients (``pom_ha.desktop.client.DesktopClient``, every AM address) log in, attach
a job and go ready; ``on_call_share`` of them are offered a call (``agent_call_command``) and answer it
(Talking). The desktops run in 2-4 worker processes (``pom_ha.bench.agents_worker``, ``DeskWorkers``): one
bench process answering every desktop's STATE_QUERY and login on one event loop would be measuring itself.
Each trial SIGKILLs the zone's master and measures:

* ``detection``: the kill (database clock, read just before the signal) → the survivor's lease
  (``ha_lease.acquired_at`` of the new epoch);
* ``init``: the lease → the zone available (``agent_zone_status.since``, new epoch) **and** every desktop
  having received ``POM_AVAILABLE`` from the new master (stamped by the workers on ``time.monotonic()``:
  CLOCK_MONOTONIC is one clock for every process on Linux, the one that also stamped the kill);
* the sample (``p50_ms``/``p99_ms``): the kill → both of those.

Every trial checks that no agent got a Desktop Error and that every call survived (nailed, call kept: Table 9
keeps the state). The killed AM is restarted (it comes back DORMANT) before the next trial, which kills the
other one.

PostgreSQL CPU: the utime+stime of the postmaster and its live children plus what the postmaster has reaped
(``cutime``/``cstime``, so backends that exited during the window count), sampled every 20 ms from /proc.
The failover window is [kill, kill + sample]; the quiet window is the equal window just before the kill (at
most 5 s, the steady time the trial waits before it: 1000 desktops logged in and heartbeating, both AMs
renewing); both are read as CPU per second of window. ``pg_cpu_increase_pct`` is the difference in
percentage points of one CPU core (the strictest reading of the guide's "+30-40 %": on this machine one core
is 1/``cpus`` of the database server).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pom_ha.bench.campaigns import BenchLab, _alive_peers, _poll, bench_lab
from pom_ha.bench.failover import percentile
from pom_ha.config import Topology
from pom_ha.ha.logsetup import configure_logging
from pom_ha.infra.process import InfraError, kill_process

BLOCK = 16
ZONE = "Default"
JOB = "bench-am-job"
SERVICE = "agent_manager"
POM_DETECTION_S = 40.0  # the guide: 40 s, "not including the zone initialisation time"
POM_PG_CPU_INCREASE = "30-40 %"
QUIET_BEFORE_KILL_S = 5.0
CPU_SAMPLE_S = 0.02
LOGIN_BATCH = 50  # desktops logging in at once, over every worker
MAX_WORKERS = 4
# desktop heartbeats both ways every 2 s (dead after 4 missed): a SIGKILLed AM's desktops notice at once anyway
# (their sockets close), so the interval does not enter the figures; 500 ms x 1000 desktops is 4000 frames/s
DESKTOP_HEARTBEAT_MS = 2000
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- PostgreSQL CPU --------------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "; fields from state (3rd) on


def pg_cpu_seconds(postmaster: int) -> float:
    """CPU seconds of the postmaster, its live children, and the children it reaped."""
    own = _stat_fields(postmaster)
    if own is None:
        raise InfraError(f"postmaster {postmaster} is gone")
    # fields (0-based after the comm): 11 utime, 12 stime, 13 cutime, 14 cstime
    ticks = sum(int(own[i]) for i in (11, 12, 13, 14))
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
        for child in children:
            f = _stat_fields(int(child))
            if f is not None:
                ticks += int(f[11]) + int(f[12])
    return ticks / CLK_TCK


@dataclass
class CpuSampler:
    postmaster: int
    samples: list[tuple[float, float]] = field(default_factory=list)  # (monotonic, cpu seconds)

    async def run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), pg_cpu_seconds(self.postmaster)))
            await asyncio.sleep(CPU_SAMPLE_S)

    def at(self, t: float) -> float:
        """CPU seconds at monotonic ``t`` (linear between the two samples around it)."""
        prev = self.samples[0]
        for cur in self.samples:
            if cur[0] >= t:
                if cur[0] == prev[0]:
                    return cur[1]
                return prev[1] + (cur[1] - prev[1]) * (t - prev[0]) / (cur[0] - prev[0])
            prev = cur
        return prev[1]

    def window(self, start: float, end: float) -> float:
        return self.at(end) - self.at(start)


def postmaster_pid(lab_dir: Path) -> int:
    for pid_file in lab_dir.rglob("postmaster.pid"):
        return int(pid_file.read_text().split()[0])
    raise InfraError(f"no postmaster.pid below {lab_dir}")


# ---- desktops ----------------------------------------------------------------------------------------------
def worker_count(agents: int, cpus: int | None = None) -> int:
    """2-4 worker processes (one per CPU within that), never more than there are desktops."""
    return max(1, min(agents, MAX_WORKERS, max(2, cpus or os.cpu_count() or 2)))


class DeskWorkers:
    """The bench's desktops in ``pom_ha.bench.agents_worker`` processes (started here, ended here by PID)."""

    def __init__(self, count: int, log_dir: Path) -> None:
        self.count = count
        self.log_dir = log_dir
        self.procs: list[asyncio.subprocess.Process] = []
        self._readers: list[asyncio.Task[None]] = []
        self._replies: list[dict[int, asyncio.Future[dict[str, Any]]]] = []
        self._ready: list[asyncio.Future[dict[str, Any]]] = []
        self._ids = iter(range(1, 1 << 62))
        self._logs: list[Path] = []

    async def start(self, addresses: list[tuple[str, int]], agent_ids: list[str], batch: int) -> None:
        """Share ``agent_ids`` out over the workers; returns once every worker's desktops are logged in, ready
        and attached to the job."""
        loop = asyncio.get_running_loop()
        shares = [agent_ids[i::self.count] for i in range(self.count)]
        for i, share in enumerate(shares):
            log = self.log_dir / f"am-bench-desktops-{i}.log"
            self._logs.append(log)
            with log.open("ab") as err:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "pom_ha.bench.agents_worker", stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE, stderr=err, limit=2**20)
            self.procs.append(proc)
            self._replies.append({})
            self._ready.append(loop.create_future())
            self._readers.append(asyncio.create_task(self._read(i)))
            config = {"addresses": addresses, "agents": share, "zone": ZONE, "job": JOB,
                      "batch": max(1, batch // self.count), "reply_timeout_s": 10.0}
            assert proc.stdin is not None
            proc.stdin.write((json.dumps(config) + "\n").encode())
            await proc.stdin.drain()
        await asyncio.gather(*self._ready)

    async def _read(self, i: int) -> None:
        proc = self.procs[i]
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            msg = json.loads(line)
            if msg.get("ev") == "ready":
                if not self._ready[i].done():
                    self._ready[i].set_result(msg)
            elif msg.get("ev") == "failed":
                if not self._ready[i].done():
                    self._ready[i].set_exception(InfraError(f"desktop worker {i}: {msg.get('error')}"))
            elif (fut := self._replies[i].pop(msg.get("id"), None)) is not None and not fut.done():
                fut.set_result(msg)
        gone = InfraError(f"desktop worker {i} (pid {proc.pid}) ended: {self._tail(i)}")
        for fut in [self._ready[i], *self._replies[i].values()]:
            if not fut.done():
                fut.set_exception(gone)
        self._replies[i].clear()

    def _tail(self, i: int) -> str:
        with contextlib.suppress(OSError):
            return Path(self._logs[i]).read_text(errors="replace")[-2000:]
        return "(no log)"

    async def _ask(self, i: int, op: str, **fields: Any) -> dict[str, Any]:
        proc = self.procs[i]
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[i][rid] = fut
        assert proc.stdin is not None
        proc.stdin.write((json.dumps({"op": op, "id": rid, **fields}) + "\n").encode())
        await proc.stdin.drain()
        return await fut

    async def wait_back(self, since: float, master: str | None, timeout_s: float, what: str) -> float:
        """Until every desktop is available with its last POM_AVAILABLE after ``since`` from ``master``; the
        latest of those stamps (monotonic)."""
        replies = await asyncio.gather(*(self._ask(i, "wait", since=since, master=master, timeout_s=timeout_s)
                                         for i in range(self.count)))
        if not all(r.get("ok") for r in replies):
            raise InfraError(f"not within {timeout_s:.0f} s: {what} ({replies})")
        return max(float(r["max_at"]) for r in replies)

    async def close(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.returncode is None:
                with contextlib.suppress(InfraError, ConnectionError, OSError, TimeoutError):
                    async with asyncio.timeout(30):
                        await self._ask(i, "close")
        for proc in self.procs:
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, 9)  # our own child, by its pid
                await proc.wait()
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


# ---- the bench ---------------------------------------------------------------------------------------------
@dataclass
class Trial:
    total_ms: float
    detection_ms: float
    init_ms: float
    zone_available_ms: float
    desktops_back_ms: float
    pg_cpu_failover_s: float
    pg_cpu_quiet_s: float
    quiet_window_s: float
    takeover_write_ms: float | None
    load_avg_1m: float  # the machine's 1-minute load average at the kill (a shared machine: other work counts)


async def _lease(bench: BenchLab) -> tuple[str, int, str]:
    async def held() -> Any:
        return await bench.conn.fetchrow(
            "SELECT holder_server, epoch, holder_instance FROM ha_lease WHERE service = $1 AND scope = $2"
            " AND holder_server IS NOT NULL AND expires_at > now() AND released_at IS NULL", SERVICE, ZONE)

    row = await _poll(held, 60, f"an {SERVICE} master of {ZONE}")
    return str(row["holder_server"]), int(row["epoch"]), str(row["holder_instance"])


async def _wait_heartbeats(bench: BenchLab, timeout_s: float = 30) -> None:
    recs = [r for k, r in bench.procs.items() if k.startswith("agent-manager@") and r.alive()]

    async def seen() -> bool:
        peers = await asyncio.gather(*(asyncio.to_thread(_alive_peers, r, SERVICE) for r in recs))
        return all(n is not None and n >= len(recs) - 1 for n in peers)

    await _poll(seen, timeout_s, "the Agent Managers see each other on their heartbeat links")


async def _trial(bench: BenchLab, desks: DeskWorkers, sampler: CpuSampler, on_call: int,
                 am_args: tuple[str, ...]) -> Trial:
    server, epoch, instance = await _lease(bench)
    await _wait_heartbeats(bench)  # the dormant has seen the master: the steady state a failover starts from
    await desks.wait_back(0.0, server, 60, f"every desktop available at {server}")
    await asyncio.sleep(QUIET_BEFORE_KILL_S)  # the quiet window the CPU baseline is read from
    fault = await bench.db_now()
    load = os.getloadavg()[0]
    killed = time.monotonic()
    await asyncio.to_thread(kill_process, bench.procs[f"agent-manager@{server}"])

    async def new_lease() -> Any:
        return await bench.conn.fetchrow(
            "SELECT acquired_at, holder_server FROM ha_lease WHERE service = $1 AND scope = $2 AND epoch > $3"
            " AND holder_server IS NOT NULL", SERVICE, ZONE, epoch)

    lease = await _poll(new_lease, 60, f"a new {SERVICE} master of {ZONE}")

    async def zone_available() -> Any:
        return await bench.conn.fetchval(
            "SELECT since FROM agent_zone_status WHERE zone = $1 AND available AND epoch > $2", ZONE, epoch)

    since: datetime = await _poll(zone_available, 120, f"{ZONE} available again")

    last_available = await desks.wait_back(killed, str(lease["holder_server"]), 120,
                                           "every desktop received POM_AVAILABLE from the new master")
    desktops_back_s = last_available - killed
    zone_s = (since - fault).total_seconds()
    detection_s = (lease["acquired_at"] - fault).total_seconds()
    total_s = max(zone_s, desktops_back_s)
    # the CPU windows: [kill, kill + total] vs the equal window just before the kill
    await asyncio.sleep(CPU_SAMPLE_S * 3)
    quiet_s = min(total_s, QUIET_BEFORE_KILL_S)  # the quiet time there was before the kill
    failover_cpu = sampler.window(killed, killed + total_s)
    quiet_cpu = sampler.window(killed - quiet_s, killed)
    errors = await bench.conn.fetchval(
        "SELECT count(*) FROM agent_failover_log WHERE zone = $1 AND epoch > $2 AND (force_logout"
        " OR completion_code IS NOT NULL)", ZONE, epoch)
    talking = await bench.conn.fetchval(
        "SELECT count(*) FROM agents WHERE zone = $1 AND call_state = 'Talking' AND logged_in", ZONE)
    if errors or talking != on_call:
        raise InfraError(f"takeover changed agents: {errors} desktop errors / marks, {talking} of {on_call} talking")
    write_ms = _takeover_figure(bench, str(lease["holder_server"]), "write_ms")
    # the killed AM comes back DORMANT for the next trial (which kills the other one)
    bench.start("agent-manager", server, *am_args)
    await bench.wait_replaced(SERVICE, server, instance)
    return Trial(
        total_ms=total_s * 1000, detection_ms=detection_s * 1000, init_ms=(total_s - detection_s) * 1000,
        zone_available_ms=zone_s * 1000, desktops_back_ms=desktops_back_s * 1000,
        pg_cpu_failover_s=failover_cpu, pg_cpu_quiet_s=quiet_cpu, quiet_window_s=quiet_s,
        takeover_write_ms=None if write_ms is None else float(write_ms), load_avg_1m=load,
    )


def _takeover_figure(bench: BenchLab, server: str, key: str) -> float | None:
    """A figure of the new master's last "zone taken over" log line (its own account of the takeover)."""
    rec = bench.procs.get(f"agent-manager@{server}")
    if rec is None:
        return None
    for line in reversed(Path(rec.log).read_text(errors="replace").splitlines()):
        if '"zone taken over"' in line:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return float(json.loads(line)[key])
            return None
    return None


def _stats(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(values, 50), 1), "p99_ms": round(percentile(values, 99), 1),
            "max_ms": round(max(values), 1)}


async def run_am_failover(
    base: Topology, *, agents: int = 1000, trials: int = 5, on_call_share: float = 0.3,
    heartbeat_ms: int = DESKTOP_HEARTBEAT_MS, workers: int = 0, echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``workers``: desktop worker processes (0: ``worker_count``, 2-4)."""
    if agents < 1 or trials < 1 or not 0 <= on_call_share <= 1:
        raise ValueError("agents and trials must be >= 1, on_call_share within 0..1")
    results: list[Trial] = []
    desks: DeskWorkers | None = None
    configure_logging("WARNING")  # a thousand desktops' info lines would cost the bench's own loop
    async with bench_lab(base, block=BLOCK) as bench:
        await bench.conn.execute("UPDATE pim_config SET value = '30000' WHERE key = 'AppServerWaitTimeOut'")
        servers = [s.name for s in bench.topo.servers][:2]
        am_args = ("--zone", ZONE, "--desktop-heartbeat-ms", str(heartbeat_ms))
        for server in servers:
            bench.start("agent-manager", server, *am_args)
        await bench.wait_members(SERVICE, len(servers))
        master, _epoch, _ = await _lease(bench)

        async def zone_up() -> Any:
            return await bench.conn.fetchval("SELECT available FROM agent_zone_status WHERE zone = $1", ZONE)

        await _poll(zone_up, 60, f"{ZONE} available")
        addresses = [(bench.topo.server(s).address, bench.topo.ports.desktop) for s in servers]
        sampler = CpuSampler(postmaster_pid(bench.topo.lab_dir()))
        cpu_task = asyncio.create_task(sampler.run())
        try:
            tag = uuid.uuid4().hex[:4]
            agent_ids = [f"am-bench-{tag}-{i:05d}" for i in range(agents)]
            desks = DeskWorkers(workers or worker_count(agents), bench.topo.lab_dir())
            # a ramp of LOGIN_BATCH desktops at a time over all workers (a contact centre's agents do not all
            # log in at once)
            await desks.start(addresses, agent_ids, LOGIN_BATCH)
            on_call = int(agents * on_call_share)
            await bench.conn.execute(
                "INSERT INTO agent_call_command (zone, agent_id, event, call_id, job_id)"
                " SELECT $1, a, 'offered', 'bench-call-' || a, $2 FROM unnest($3::text[]) AS a",
                ZONE, JOB, agent_ids[:on_call])

            async def talking() -> bool:
                n = await bench.conn.fetchval(
                    "SELECT count(*) FROM agents WHERE zone = $1 AND call_state = 'Talking'", ZONE)
                return bool(n == on_call)

            await _poll(talking, 120, f"{on_call} agents talking")
            echo(f"  {agents} desktops ({desks.count} worker processes) logged in at {master}, {on_call} of them"
                 " talking")
            for i in range(trials):
                t = await _trial(bench, desks, sampler, on_call, am_args)
                results.append(t)
                echo(f"  trial {i + 1}/{trials}: kill -> zone available and every desktop back {t.total_ms:.0f} ms "
                     f"(detection {t.detection_ms:.0f} ms + init {t.init_ms:.0f} ms; zone row {t.zone_available_ms:.0f}"
                     f" ms, last desktop {t.desktops_back_ms:.0f} ms); PG CPU {t.pg_cpu_failover_s:.2f} s vs quiet "
                     f"{t.pg_cpu_quiet_s:.2f} s; load average {t.load_avg_1m:.2f}")
        finally:
            cpu_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, InfraError):
                await cpu_task
            if desks is not None:
                await desks.close()
    totals = [t.total_ms for t in results]
    failover_pct = sum(t.pg_cpu_failover_s for t in results) / (sum(totals) / 1000) * 100
    quiet_pct = sum(t.pg_cpu_quiet_s for t in results) / sum(t.quiet_window_s for t in results) * 100
    p99 = percentile(totals, 99)
    target_ms = 1000 + 1000 * agents / 1000
    return {
        "component": "am", "mode": "kill", "agents": agents, "desktop_heartbeat_ms": heartbeat_ms,
        "on_call": int(agents * on_call_share),
        "trials": trials, "desktop_workers": desks.count if desks is not None else 0,
        **_stats(totals), "mean_ms": round(statistics.fmean(totals), 1),
        "detection": _stats([t.detection_ms for t in results]),
        "init": _stats([t.init_ms for t in results]),
        "zone_available": _stats([t.zone_available_ms for t in results]),
        "desktops_back": _stats([t.desktops_back_ms for t in results]),
        "takeover_write_ms": [t.takeover_write_ms for t in results],
        "load_avg_1m": [round(t.load_avg_1m, 2) for t in results],
        "target_p99_ms": target_ms, "meets_target": p99 <= target_ms,
        "pom_detection_s": POM_DETECTION_S, "pom_ratio_p99": round(POM_DETECTION_S * 1000 / p99, 1),
        "pg_cpu_quiet_pct": round(quiet_pct, 2),
        "pg_cpu_failover_pct": round(failover_pct, 2),
        "pg_cpu_increase_pct": round(failover_pct - quiet_pct, 2),
        "pg_cpu_unit": "percent of one CPU core: PostgreSQL's CPU over the failover windows (kill -> zone available "
                       f"and every desktop back) vs equal quiet windows (at most {QUIET_BEFORE_KILL_S:g} s) just "
                       "before each kill",
        "cpus": os.cpu_count(), "pom_pg_cpu_increase": POM_PG_CPU_INCREASE,
    }
