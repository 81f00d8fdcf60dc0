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
