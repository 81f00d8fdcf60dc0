"""`pom-ha infra serve --server pomN` — one POM server's share of the real servers per process, as on separate
hosts or in docker-compose.yml: three serve processes form the ZooKeeper ensemble, the Kafka and Ignite
clusters and the ActiveMQ pair together; a killed server is restarted by its serve process; SIGTERM stops
that server's share and leaves nothing listening."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from pom_ha.bench.isolated import isolated_topology
from pom_ha.config import REPO_ROOT, Topology, dump_topology, load_topology
from pom_ha.infra.base import port_in_use
from pom_ha.infra.postgres import PostgresLauncher
from pom_ha.infra.process import ProcessRecord, log_tail, signal_process, start_process, stop_process
from pom_ha.infra.serve import server_launchers
from pom_ha.infra.stack import Stack

pytestmark = pytest.mark.integration
BLOCK = 24  # 127.0.24.N, PostgreSQL 127.0.25.1: beside the session's stack


def _text(rec: ProcessRecord) -> str:
    return Path(rec.log).read_text(errors="replace")


async def poll(check: Callable[[], Awaitable[Any]], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        await asyncio.sleep(0.5)


@pytest.fixture
async def hosts() -> AsyncIterator[tuple[Topology, dict[str, ProcessRecord]]]:
    topo = isolated_topology(load_topology(), block=BLOCK)
    lab = topo.lab_dir()
    topology_file = dump_topology(topo, lab / "topology.toml")
    pg = PostgresLauncher(topo)
    procs: dict[str, ProcessRecord] = {}
    try:
        pg.start()
        await pg.wait_ready()
        await pg.bootstrap()
        for server in topo.servers:
            name = f"serve-{server.name}"
            procs[server.name] = start_process(
                name, [sys.executable, "-m", "pom_ha.cli", "infra", "serve", "--server", server.name,
                       "--topology", str(topology_file)],
                run_dir=lab / "serve-run", log_path=lab / "logs" / f"{name}.log", marker=str(topology_file),
                env={"PYTHONUNBUFFERED": "1"}, cwd=REPO_ROOT,
            )
        yield topo, procs
    finally:
        for rec in procs.values():
            await asyncio.to_thread(stop_process, rec, lab / "serve-run", 60)
        await Stack(topo).down()
        shutil.rmtree(lab, ignore_errors=True)


async def test_three_serve_processes_form_the_clusters_restart_a_killed_server_and_stop_cleanly(
    hosts: tuple[Topology, dict[str, ProcessRecord]],
) -> None:
    topo, procs = hosts
    every = [launcher for s in topo.servers for launcher in server_launchers(topo, s.name)]
    assert {lc.kind for lc in every} == {"zookeeper", "kafka", "ignite", "activemq"}

    async def all_ready() -> bool:
        for name, rec in procs.items():
            assert rec.alive(), f"serve {name} exited:\n{log_tail(rec.log, 30)}"
        probes = await asyncio.gather(*(lc.probe() for lc in every if lc.kind != "activemq"))
        return all(probes) and all("up:" in _text(rec) for rec in procs.values())

    await poll(all_ready, 300, "every server of every POM server ready")

    victim = next(lc for lc in every if lc.kind == "zookeeper" and lc.server.name == "pom2")
    before = victim.record()
    assert before is not None
    await asyncio.to_thread(victim.kill)

    async def restarted() -> bool:
        rec = victim.record()
        return rec is not None and rec.pid != before.pid and rec.alive() and await victim.probe()

    await poll(restarted, 120, "the killed ZooKeeper node started again by its serve process")
    assert "is not running: starting it again" in _text(procs["pom2"])

    assert signal_process(procs["pom3"], signal.SIGTERM)

    async def pom3_stopped() -> bool:
        mine = server_launchers(topo, "pom3")
        return not procs["pom3"].alive() and not any(
            port_in_use(host, port) for lc in mine for host, port in lc.listen_ports())

    await poll(pom3_stopped, 120, "pom3's share stopped by SIGTERM, nothing of it listening")
    assert "pom3: stopped" in _text(procs["pom3"])
