"""The launcher contract on a tiny fake server process: readiness errors carry the log tail,
ports already taken are refused, stop only touches the recorded PID."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from pom_ha.bench.isolated import isolated_topology
from pom_ha.config import DEFAULT_TOPOLOGY, load_topology
from pom_ha.infra.base import Launcher
from pom_ha.infra.process import InfraError, pid_matches


class ScriptLauncher(Launcher):
    """A 'server' that is a Python one-liner; ready when a file exists."""

    kind = "script"
    runs_as_server_uid = False
    start_timeout_s = 10.0
    script = "import time; print('booting'); time.sleep(60)"
    port = 0

    def listen_ports(self) -> list[tuple[str, int]]:
        return [(self.address, self.port)] if self.port else []

    def prepare(self) -> None:
        (self.home / "conf").mkdir(parents=True, exist_ok=True)

    def argv(self) -> list[str]:
        return [sys.executable, "-c", self.script, str(self.home)]

    async def probe(self) -> bool:
        return (self.home / "ready").exists()


@pytest.fixture
def topo(tmp_path: Path):  # type: ignore[no-untyped-def]
    return isolated_topology(load_topology(DEFAULT_TOPOLOGY), block=40, lab_dir=str(tmp_path))


async def test_a_server_that_dies_during_start_reports_its_log_tail(topo) -> None:  # type: ignore[no-untyped-def]
    launcher = ScriptLauncher(topo, topo.servers[0])
    launcher.script = "import sys; print('bad config: listeners'); sys.exit(3)"
    launcher.start()
    with pytest.raises(InfraError, match=r"(?s)exited during start.*bad config: listeners"):
        await launcher.wait_ready()


async def test_not_ready_in_time_reports_timeout_and_stop_kills_only_that_pid(topo) -> None:  # type: ignore[no-untyped-def]
    launcher = ScriptLauncher(topo, topo.servers[0])
    rec = launcher.start()
    try:
        with pytest.raises(InfraError, match=r"(?s)not ready after 1 s.*booting"):
            await launcher.wait_ready(timeout_s=1)
        assert launcher.running()
        (launcher.home / "ready").touch()
        assert await launcher.wait_ready() >= 0
        assert launcher.start().pid == rec.pid  # starting a running server is a no-op
    finally:
        launcher.stop()
    assert not pid_matches(rec.pid, rec.marker)
    assert launcher.record() is None
    launcher.stop()  # stopping twice is a no-op


def test_port_in_use_is_refused_naming_address_and_port(topo) -> None:  # type: ignore[no-untyped-def]
    launcher = ScriptLauncher(topo, topo.servers[0])
    with socket.socket() as s:
        s.bind((launcher.address, 0))
        s.listen()
        launcher.port = s.getsockname()[1]
        with pytest.raises(InfraError, match=f"{launcher.address}:{launcher.port} is already in use"):
            launcher.start()
    assert launcher.record() is None
