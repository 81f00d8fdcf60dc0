"""The AM failover bench's PostgreSQL CPU accounting (pom_ha/bench/agents.py)."""

from __future__ import annotations

import os

import pytest

from pom_ha.bench.agents import CpuSampler, pg_cpu_seconds
from pom_ha.infra.process import InfraError


def test_cpu_sampler_interpolates_windows() -> None:
    s = CpuSampler(postmaster=1, samples=[(10.0, 1.0), (11.0, 1.5), (12.0, 3.5)])
    assert s.at(9.0) == 1.0 and s.at(13.0) == 3.5
    assert s.at(11.5) == pytest.approx(2.5)
    assert s.window(10.0, 12.0) == pytest.approx(2.5)
    assert s.window(10.5, 11.0) == pytest.approx(0.25)


def test_pg_cpu_seconds_reads_proc() -> None:
    assert pg_cpu_seconds(os.getpid()) > 0  # this process: its own CPU plus its reaped children's
    with pytest.raises(InfraError):
        pg_cpu_seconds(2**22 + 12345)


def test_desktop_worker_count() -> None:
    from pom_ha.bench.agents import worker_count

    assert worker_count(1000, cpus=2) == 2 and worker_count(1000, cpus=1) == 2
    assert worker_count(1000, cpus=3) == 3 and worker_count(1000, cpus=16) == 4
    assert worker_count(1, cpus=16) == 1


async def test_worker_wait_back_reports_the_last_pom_available() -> None:
    """A worker's ``wait``: every desktop available with a POM_AVAILABLE after ``since`` from ``master``; the
    reply carries the latest stamp, or the counts at the timeout."""
    from pom_ha.bench.agents_worker import BenchDesk, wait_back

    desks = [BenchDesk([("127.0.0.1", 9)], f"a{i}", "Default") for i in range(3)]
    for i, d in enumerate(desks):
        d.available_at, d.master = 10.0 + i, "pom2"
        d.client.available.set()
    assert await wait_back(desks, 9.5, "pom2", 1) == {"ok": True, "max_at": 12.0, "masters": ["pom2"]}
    assert (await wait_back(desks, 9.5, None, 1))["ok"]
    late = await wait_back(desks, 10.5, "pom2", 0.05)  # the first desktop's POM_AVAILABLE is older
    assert late == {"ok": False, "back": 2, "n": 3, "masters": ["pom2"]}
    desks[2].client.available.clear()  # lost its manager again
    assert (await wait_back(desks, 0.0, "pom2", 0.05))["back"] == 2
