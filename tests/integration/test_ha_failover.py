"""HA core on real PostgreSQL with three real ha-probe processes (one per POM server).

Each test uses its own service name, so leases and fenced-write histories never mix. The history
check is the database's: fenced writes of an older epoch accepted after the first write of a newer
epoch would mean two masters acted at once — there must be none.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pom_ha.infra.stack import Stack
from pom_ha.lab.faults import Firewall
from pom_ha.lab.probes import (
    ProbeCluster,
    current_holder,
    events,
    overlapping_writes,
    wait_first_write,
    wait_holder,
)

pytestmark = pytest.mark.integration
SERVERS = ["pom1", "pom2", "pom3"]


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_dsn)
    yield conn
    await conn.close()


@pytest.fixture
def probes(stack: Stack, topology_file: Path) -> AsyncIterator[Callable[..., ProbeCluster]]:
    made: list[ProbeCluster] = []

    def make(service: str, zones: list[str] | None = None) -> ProbeCluster:
        cluster = ProbeCluster(stack.topo, topology_file, service, SERVERS, zones or [])
        made.append(cluster)
        cluster.start_all()
        return cluster

    yield make  # type: ignore[misc]
    for cluster in made:
        cluster.stop_all()


def _uid(stack: Stack, server: str) -> int:
    return stack.topo.server_uid(server)


async def test_one_master_then_graceful_handover(db: asyncpg.Connection, probes: Callable[..., ProbeCluster]) -> None:
    cluster = probes("t_graceful")
    first = await wait_holder(db, "t_graceful")
    await wait_first_write(db, "t_graceful", first.epoch)
    cluster.terminate(first.server)
    second = await wait_holder(db, "t_graceful", newer_than=first.epoch, timeout_s=10)
    assert second.server != first.server
    await wait_first_write(db, "t_graceful", second.epoch)
    kinds = [(e["server"], e["kind"]) for e in await events(db, "t_graceful")]
    assert (first.server, "released") in kinds
    state = await db.fetchval(
        "SELECT state FROM ha_member WHERE service = 't_graceful' AND server = $1", first.server
    )
    assert state == "STOPPED"
    assert await overlapping_writes(db, ["t_graceful"]) == 0


async def test_sigkill_of_the_master_hands_over(db: asyncpg.Connection, probes: Callable[..., ProbeCluster]) -> None:
    cluster = probes("t_kill")
    first = await wait_holder(db, "t_kill")
    await wait_first_write(db, "t_kill", first.epoch)
    cluster.kill(first.server)
    second = await wait_holder(db, "t_kill", newer_than=first.epoch, timeout_s=15)
    assert second.server != first.server
    await wait_first_write(db, "t_kill", second.epoch)
    took = [e for e in await events(db, "t_kill") if e["epoch"] == second.epoch and e["server"] == second.server]
    assert took and took[0]["kind"] in ("took_over", "acquired"), took
    assert first.server in took[0]["decision"], took[0]["decision"]
    assert await overlapping_writes(db, ["t_kill"]) == 0


async def test_paused_master_is_fenced_after_takeover(
    db: asyncpg.Connection, probes: Callable[..., ProbeCluster]
) -> None:
    cluster = probes("t_pause")
    first = await wait_holder(db, "t_pause")
    await wait_first_write(db, "t_pause", first.epoch)
    cluster.send(first.server, signal.SIGSTOP)
    try:
        second = await wait_holder(db, "t_pause", newer_than=first.epoch, timeout_s=15)
        await wait_first_write(db, "t_pause", second.epoch)
    finally:
        cluster.send(first.server, signal.SIGCONT)
    # the woken ex-master demotes itself; nothing it tried after the takeover got in
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        kinds = {e["kind"] for e in await events(db, "t_pause") if e["server"] == first.server}
        if kinds & {"demoted", "lost", "expired"}:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"old master {first.server} never recorded its demotion")
    late = await db.fetchval(
        "SELECT count(*) FROM ha_probe_write WHERE service = 't_pause' AND epoch = $1 AND written_at > "
        "(SELECT min(written_at) FROM ha_probe_write WHERE service = 't_pause' AND epoch = $2)",
        first.epoch, second.epoch,
    )
    assert late == 0
    assert await overlapping_writes(db, ["t_pause"]) == 0
    holder = await current_holder(db, "t_pause")
    assert holder is not None and holder.epoch == second.epoch


async def test_master_cut_from_postgres_demotes_before_the_takeover(
    stack: Stack, db: asyncpg.Connection, probes: Callable[..., ProbeCluster]
) -> None:
    probes("t_part_db")
    first = await wait_holder(db, "t_part_db")
    await wait_first_write(db, "t_part_db", first.epoch)
    with Firewall() as fw:
        fw.drop_from_uid(_uid(stack, first.server), stack.topo.postgres.address)
        second = await wait_holder(db, "t_part_db", newer_than=first.epoch, timeout_s=20)
        await wait_first_write(db, "t_part_db", second.epoch)
    # healed: the old master writes its (back-dated) demotion; it must precede the new acquisition
    deadline = time.monotonic() + 20
    demoted_at = None
    while time.monotonic() < deadline and demoted_at is None:
        for e in await events(db, "t_part_db"):
            if e["server"] == first.server and e["epoch"] == first.epoch and e["kind"] in ("demoted", "lost"):
                demoted_at = e["at"]
        await asyncio.sleep(0.05)
    assert demoted_at is not None, "old master never recorded its demotion"
    acquired_at = min(
        e["at"] for e in await events(db, "t_part_db") if e["epoch"] == second.epoch and e["server"] == second.server
    )
    assert demoted_at < acquired_at
    assert await overlapping_writes(db, ["t_part_db"]) == 0


async def test_peer_only_partition_changes_nothing(
    stack: Stack, db: asyncpg.Connection, probes: Callable[..., ProbeCluster]
) -> None:
    cluster = probes("t_part_peer")
    first = await wait_holder(db, "t_part_peer")
    await wait_first_write(db, "t_part_peer", first.epoch)
    others = [s for s in SERVERS if s != first.server]
    with Firewall() as fw:
        for other in others:
            fw.drop_from_uid(_uid(stack, first.server), stack.topo.server(other).address)
            fw.drop_from_uid(_uid(stack, other), stack.topo.server(first.server).address)
        # hold the cut for several lease TTLs: the dormants see the heartbeat gone, but the
        # master keeps renewing in PostgreSQL, so the takeover is never corroborated
        deadline = time.monotonic() + 9
        while time.monotonic() < deadline:
            h = await current_holder(db, "t_part_peer")
            assert h == first, f"master changed during a peer-only partition: {h}"
            await asyncio.sleep(0.1)
    assert cluster.procs[first.server].alive()
    assert await overlapping_writes(db, ["t_part_peer"]) == 0


async def test_postgres_restart_never_two_masters(
    stack: Stack, db: asyncpg.Connection, probes: Callable[..., ProbeCluster], pg_dsn: str
) -> None:
    probes("t_pg_restart")
    first = await wait_holder(db, "t_pg_restart")
    await wait_first_write(db, "t_pg_restart", first.epoch)
    await db.close()
    pg = stack.postgres
    pg.stop()
    pg.start()
    await pg.wait_ready()
    conn = await asyncpg.connect(pg_dsn)
    try:
        after = await wait_holder(conn, "t_pg_restart", newer_than=0, timeout_s=30)
        await wait_first_write(conn, "t_pg_restart", after.epoch, timeout_s=30)
        assert await overlapping_writes(conn, ["t_pg_restart"]) == 0
    finally:
        await conn.close()


async def test_zone_roles_spread_over_servers(db: asyncpg.Connection, probes: Callable[..., ProbeCluster]) -> None:
    zones = ["Z1", "Z2", "Z3"]
    probes("t_zones", zones=zones)
    holders = {z: await wait_holder(db, "t_zones", z) for z in zones}
    for z, h in holders.items():
        await wait_first_write(db, "t_zones", h.epoch, scope=z)
    assert await overlapping_writes(db, ["t_zones"]) == 0
    assert len({h.server for h in holders.values()}) >= 2, holders


async def test_postgres_unreachable_at_start_retries_and_never_claims(
    stack: Stack, db: asyncpg.Connection, topology_file: Path
) -> None:
    cluster = ProbeCluster(stack.topo, topology_file, "t_db_down_start", ["pom1"])
    try:
        with Firewall() as fw:
            fw.drop_from_uid(_uid(stack, "pom1"), stack.topo.postgres.address)
            cluster.start_all()
            for _ in range(200):  # 20 s deadline
                if "unreachable" in cluster.log("pom1"):
                    break
                await asyncio.sleep(0.1)
            assert "unreachable" in cluster.log("pom1"), cluster.log("pom1")[-2000:]
            assert cluster.procs["pom1"].alive(), "the daemon gave up instead of retrying"
            assert await current_holder(db, "t_db_down_start") is None
        holder = await wait_holder(db, "t_db_down_start", timeout_s=20)
        assert holder.server == "pom1"
        await wait_first_write(db, "t_db_down_start", holder.epoch)
    finally:
        cluster.stop_all()


def _status_json(topology_file: Path, *extra: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "pom_ha.cli", "status", "--topology", str(topology_file), "--json", *extra],
        capture_output=True, text=True, timeout=30, check=True,
    )
    doc: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return doc


async def test_status_table_shows_masters_zones_and_a_killed_member(
    db: asyncpg.Connection, topology_file: Path, probes: Callable[..., ProbeCluster]
) -> None:
    cluster = probes("t_status", zones=["ZA", "ZB"])
    holders = {z: await wait_holder(db, "t_status", z) for z in ("ZA", "ZB")}
    doc = _status_json(topology_file)
    cells = doc["components"]["t_status"]
    assert doc["servers"][:3] == SERVERS
    shown = {z for c in cells.values() if c["state"] == "MASTER" for z in c["scopes"]}
    assert shown == {"ZA", "ZB"}
    for z, h in holders.items():
        assert z in cells[h.server]["scopes"]
    victim = holders["ZA"].server
    cluster.kill(victim)
    for _ in range(100):  # 10 s deadline
        cell = _status_json(topology_file, "--stale-after", "1")["components"]["t_status"][victim]
        if cell["stale"]:
            break
        await asyncio.sleep(0.1)
    assert cell["stale"] and cell["state"] == "MASTER", cell
