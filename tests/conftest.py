"""Session fixtures: one real-server stack per test session, started only if a test asks for it.

The stack runs on its own addresses (127.0.20.N, PostgreSQL on 127.0.21.1) and its own lab folder,
so a lab an engineer has running is never disturbed; it is always torn down at the end.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pom_ha.bench.isolated import isolated_topology
from pom_ha.config import dump_topology, load_topology
from pom_ha.infra.stack import Stack


@pytest.fixture(scope="session")
async def stack() -> AsyncIterator[Stack]:
    """The session's servers. Two sessions at once need different blocks: ``POM_TEST_BLOCK`` (default 20;
    even numbers, block+1 holds PostgreSQL). ``POM_TEST_SERVERS=postgres`` (comma list of kinds) starts only
    those kinds for a quick development loop; the full suite starts everything."""
    block = int(os.environ.get("POM_TEST_BLOCK", "20"))
    only = [k for k in os.environ.get("POM_TEST_SERVERS", "").split(",") if k.strip()] or None
    topo = isolated_topology(load_topology(), block=block)
    s = Stack(topo)
    lab = topo.lab_dir()
    try:
        await s.up(only=only)
        s.topology_file = dump_topology(topo, lab / "topology.toml")  # type: ignore[attr-defined]
        os.environ["POM_TEST_PG_DSN"] = topo.postgres.dsn()
        yield s
    finally:
        await s.down()
        if not os.environ.get("POM_KEEP_LAB"):
            shutil.rmtree(lab, ignore_errors=True)


@pytest.fixture(scope="session")
def topology_file(stack: Stack) -> Path:
    path: Path = stack.topology_file  # type: ignore[attr-defined]
    return path


@pytest.fixture(scope="session")
def pg_dsn(stack: Stack) -> str:
    return stack.pg_dsn()
