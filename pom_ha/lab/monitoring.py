"""The process lab's monitoring: an ``infra observe`` exporter per POM server (the servers' /metrics, at
``ports.metrics_infra``) and a real Prometheus (Debian's package) scraping them and every daemon with
``deploy/prometheus``'s config and rules. Started by ``pom-ha lab up`` after the daemons, stopped by
``pom-ha lab down`` (by PID, like every lab process)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from pom_ha.config import REPO_ROOT, Topology
from pom_ha.infra.process import ProcessRecord, records, start_process
from pom_ha.infra.prometheus import PrometheusLauncher


def start_observers(topo: Topology, topology_file: Path) -> list[ProcessRecord]:
    """``pom-ha infra observe --server pomN`` for every server that is not observed yet."""
    run_dir = topo.lab_dir() / "run"
    running = {r.name for r in records(run_dir) if r.alive()}
    started = []
    for server in topo.servers:
        name = f"infra-observe-{server.name}"
        if name in running:
            continue
        started.append(start_process(
            name, [sys.executable, "-m", "pom_ha.cli", "infra", "observe", "--server", server.name,
                   "--topology", str(topology_file)],
            run_dir=run_dir, log_path=topo.lab_dir() / "logs" / f"{name}.log", marker=str(topology_file),
            env={"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}, cwd=REPO_ROOT,
        ))
    return started


async def start_monitoring(topo: Topology, topology_file: Path, echo: Callable[[str], None] = print) -> str:
    """Exporters and Prometheus (idempotent); returns Prometheus' URL once it is ready."""
    start_observers(topo, topology_file)
    prom = PrometheusLauncher(topo)
    prom.start()
    seconds = await prom.wait_ready()
    echo(f"  prometheus: {prom.url} ready in {seconds:.1f} s, {len(prom.targets)} targets")
    return prom.url
