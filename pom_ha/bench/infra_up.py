"""`pom-ha bench infra-up`: nothing → every server ready, with the peak RSS of each server kind."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from typing import Any

import psutil

from pom_ha.bench.isolated import isolated_topology
from pom_ha.config import Topology
from pom_ha.infra.stack import Stack


def _tree_rss_mb(pid: int) -> float:
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
        return float(sum(p.memory_info().rss for p in procs)) / 2**20
    except psutil.Error:
        return 0.0


async def run_bench(topo: Topology, echo: Callable[[str], None] = print) -> dict[str, Any]:
    topo = isolated_topology(topo)
    stack = Stack(topo)
    peak: dict[str, float] = {}
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            per_kind: dict[str, float] = {}
            for launcher in stack.launchers():
                rec = launcher.record()
                if rec and rec.alive():
                    per_kind[launcher.kind] = per_kind.get(launcher.kind, 0.0) + _tree_rss_mb(rec.pid)
            for kind, mb in per_kind.items():
                peak[kind] = max(peak.get(kind, 0.0), mb)
            try:
                await asyncio.wait_for(done.wait(), 0.5)
            except TimeoutError:
                pass

    sampler = asyncio.create_task(sample())
    try:
        seconds = await stack.up(progress=lambda m: echo(f"  {m}"))
        # let the JVMs settle a moment under the sampler so steady-state RSS is counted too
        await asyncio.sleep(3)
    finally:
        done.set()
        await sampler
        await stack.down()
        shutil.rmtree(topo.lab_dir(), ignore_errors=True)
    return {
        "seconds": round(seconds, 2),
        "rss_mb": {k: round(v, 1) for k, v in sorted(peak.items())},
        "total_rss_mb": round(sum(peak.values()), 1),
    }
