"""`pom-ha bench failover`: fault → the new master's first fenced write, over N trials.

Self-contained: a private PostgreSQL on an isolated copy of the topology and three ha-probe daemons
(one per POM server, each under its own uid); everything is stopped at the end. The fault time is
read on the database clock just before the fault, the first fenced write is stamped by the database,
so both ends of every measurement are on one clock.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import asyncpg

from pom_ha.bench.isolated import isolated_topology
from pom_ha.config import Topology, dump_topology
from pom_ha.infra.postgres import PostgresLauncher
from pom_ha.lab.faults import Firewall
from pom_ha.lab.probes import ProbeCluster, db_now, overlapping_writes, wait_first_write, wait_holder

Mode = Literal["kill", "stop", "graceful", "partition"]
MODES: tuple[Mode, ...] = ("kill", "stop", "graceful", "partition")
# the vendor's documented ungraceful failover times (HA guide), for the ratio column
POM_FAILOVER_S = {"agent_manager": 40.0, "rule_engine": 45.0, "campaign_director": 140.0}
SERVICE = "bench_failover"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


async def poll(check: Callable[[], Awaitable[Any]], timeout_s: float, what: str, *, every_s: float = 0.1,
               error: type[Exception] = TimeoutError) -> Any:
    """Await ``check()`` every ``every_s`` until it is truthy (and return that value); ``error`` naming ``what``
    once ``timeout_s`` has passed. The benches' one polling loop."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(f"not within {timeout_s:.0f} s: {what}")
        await asyncio.sleep(every_s)


def latency_summary(samples_ms: list[float]) -> dict[str, float]:
    """The keys every latency bench prints: p50 / p95 / p99 / max / mean, in ms, one decimal."""
    return {
        "p50_ms": round(percentile(samples_ms, 50), 1),
        "p95_ms": round(percentile(samples_ms, 95), 1),
        "p99_ms": round(percentile(samples_ms, 99), 1),
        "max_ms": round(max(samples_ms), 1),
        "mean_ms": round(statistics.fmean(samples_ms), 1),
    }


async def _wait_dormant(conn: asyncpg.Connection, server: str, since: float, timeout_s: float = 30) -> None:
    """Until ``server``'s probe (started after ``since``, monotonic) shows up as DORMANT."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = await conn.fetchval(
            "SELECT state FROM ha_member WHERE service = $1 AND server = $2 AND seen_at > now() - interval '5 s'",
            SERVICE, server,
        )
        if state == "DORMANT":
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"probe on {server} did not come back as DORMANT within {timeout_s} s")


async def _trial(
    mode: Mode, cluster: ProbeCluster, conn: asyncpg.Connection, topo: Topology
) -> float:
    old = await wait_holder(conn, SERVICE)
    await wait_first_write(conn, SERVICE, old.epoch)
    fault_at = await db_now(conn)
    if mode == "kill":
        cluster.kill(old.server)
    elif mode == "graceful":
        asyncio.get_running_loop().run_in_executor(None, cluster.terminate, old.server)
    elif mode == "stop":
        cluster.send(old.server, signal.SIGSTOP)
    firewall = None
    if mode == "partition":
        firewall = Firewall(chain="POMHA-BENCH")  # its own chain: a test session may use the default one
        firewall.install()
        firewall.drop_from_uid(topo.server_uid(old.server), topo.postgres.address)
    try:
        new = await wait_holder(conn, SERVICE, newer_than=old.epoch, timeout_s=30)
        first = await wait_first_write(conn, SERVICE, new.epoch, timeout_s=30)
    finally:
        if mode == "stop":
            cluster.send(old.server, signal.SIGCONT)
        if firewall is not None:
            firewall.remove()
    # bring the old server's probe back as a dormant for the next trial
    since = time.monotonic()
    if mode in ("kill", "graceful"):
        await asyncio.to_thread(cluster.terminate, old.server)
        cluster.start(old.server)
    await _wait_dormant(conn, old.server, since)
    return (first - fault_at).total_seconds() * 1000


async def run_bench(
    base: Topology, mode: Mode, trials: int, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    topo = isolated_topology(base, block=12)
    lab = topo.lab_dir()
    topology_file = dump_topology(topo, lab / "topology.toml")
    pg = PostgresLauncher(topo)
    cluster = ProbeCluster(topo, topology_file, SERVICE, [s.name for s in topo.servers])
    samples: list[float] = []
    try:
        pg.start()
        await pg.wait_ready()
        await pg.bootstrap()
        conn = await asyncpg.connect(topo.postgres.dsn())
        try:
            cluster.start_all()
            for server in cluster.servers:
                await _wait_dormant_or_master(conn, server)
            for i in range(trials):
                ms = await _trial(mode, cluster, conn, topo)
                samples.append(ms)
                echo(f"  trial {i + 1}/{trials}: {ms:.0f} ms")
            overlaps = await overlapping_writes(conn, [SERVICE])
        finally:
            await conn.close()
    finally:
        cluster.stop_all()
        pg.stop()
        if not os.environ.get("POM_KEEP_LAB"):
            shutil.rmtree(lab, ignore_errors=True)
    p99 = percentile(samples, 99)
    return {
        "mode": mode,
        "trials": trials,
        **latency_summary(samples),
        "overlaps": overlaps,
        "pom_ratio_p99": {k: round(v * 1000 / p99, 1) for k, v in POM_FAILOVER_S.items()},
    }


async def _wait_dormant_or_master(conn: asyncpg.Connection, server: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = await conn.fetchval(
            "SELECT state FROM ha_member WHERE service = $1 AND server = $2", SERVICE, server
        )
        if state in ("DORMANT", "MASTER"):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"probe on {server} never registered")
