"""Stack start-up failures leave nothing behind: a taken port, a server that cannot start."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pom_ha.bench.isolated import isolated_topology
from pom_ha.config import DEFAULT_TOPOLOGY, load_topology
from pom_ha.infra.process import InfraError, records
from pom_ha.infra.stack import Stack

pytestmark = pytest.mark.integration


@pytest.fixture
def lab_dirs() -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def _stack(lab_dirs: list[Path], block: int) -> Stack:
    # not under pytest's tmp_path: that is private to root, and the servers run under their own uids
    stack = Stack(isolated_topology(load_topology(DEFAULT_TOPOLOGY), block=block))
    lab_dirs.append(stack.topo.lab_dir())
    return stack


async def test_port_already_taken_names_it_and_starts_nothing(lab_dirs: list[Path]) -> None:
    stack = _stack(lab_dirs, 50)
    pg = stack.topo.postgres
    with socket.socket() as s:
        s.bind((pg.address, pg.port))
        s.listen()
        with pytest.raises(InfraError, match=f"{pg.address}:{pg.port} \\(postgres\\)"):
            await stack.up()
    assert records(stack.run_dir) == []


async def test_a_server_that_cannot_start_stops_everything_already_started(
    tmp_path: Path, lab_dirs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = _stack(lab_dirs, 52)
    empty = tmp_path / "no-jars"
    (empty / "kafka").mkdir(parents=True)
    monkeypatch.setenv("POM_JVM_DIR", str(empty))
    started = []
    with pytest.raises(InfraError, match=r"no jars in .*no-jars/(kafka|ignite)"):
        await stack.up(progress=started.append)
    # PostgreSQL starts beside ZooKeeper; the failed ZooKeeper start must have taken it down again
    assert [r for r in records(stack.run_dir) if r.alive()] == []
    assert not stack.postgres.running()
    assert await stack.down() == []  # and down after that is a clean no-op
