"""The whole real-server stack of one lab: start in dependency order, check readiness, stop, report.

Order: PostgreSQL, ZooKeeper and Ignite start together; ActiveMQ follows PostgreSQL (its lock and
store live there) and Kafka follows a ZooKeeper quorum. A failure anywhere stops everything already
started and reports the failing server's log tail.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pom_ha.config import ServerKind, Topology
from pom_ha.infra.base import Launcher, port_in_use
from pom_ha.infra.postgres import PostgresLauncher
from pom_ha.infra.process import InfraError, records, stop_process

_LAUNCHER_CLASSES: dict[str, str] = {
    "zookeeper": "pom_ha.infra.zookeeper:ZooKeeperLauncher",
    "kafka": "pom_ha.infra.kafka:KafkaLauncher",
    "ignite": "pom_ha.infra.ignite:IgniteLauncher",
    "activemq": "pom_ha.infra.activemq:ActiveMQLauncher",
}
#: start/stop order of the JVM servers (stop runs it backwards)
KIND_ORDER: tuple[ServerKind, ...] = ("zookeeper", "ignite", "kafka", "activemq")


def launcher_class(kind: str) -> type[Launcher]:
    module, _, cls = _LAUNCHER_CLASSES[kind].partition(":")
    found: type[Launcher] = getattr(importlib.import_module(module), cls)
    return found


@dataclass(frozen=True)
class StatusRow:
    pom_server: str
    kind: str
    endpoint: str
    pid: int | None
    state: str


class Stack:
    """Every server process of one topology."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.postgres = PostgresLauncher(topo)
        self._jvm: dict[tuple[str, str], Launcher] = {}
        for kind in KIND_ORDER:
            for server in topo.servers_running(kind):
                self._jvm[(kind, server.name)] = launcher_class(kind)(topo, server)

    @property
    def run_dir(self) -> Path:
        return self.topo.lab_dir() / "run"

    def launchers(self, kind: str | None = None) -> list[Launcher]:
        if kind == "postgres":
            return [self.postgres]
        every = [self.postgres, *self._jvm.values()]
        return [launcher for launcher in every if kind is None or launcher.kind == kind]

    def launcher(self, kind: str, server: str) -> Launcher:
        if kind == "postgres":
            return self.postgres
        try:
            return self._jvm[(kind, server)]
        except KeyError:
            raise InfraError(f"no {kind} server on {server!r} in {self.topo.source}") from None

    def pg_dsn(self) -> str:
        return self.topo.postgres.dsn()

    # ---- up ----------------------------------------------------------------------------------------
    def check_ports(self) -> None:
        """Refuse to start anything when an address:port we need is taken by a process we don't own."""
        taken = []
        for launcher in self.launchers():
            if launcher.running():
                continue
            for host, port in launcher.listen_ports():
                if port_in_use(host, port):
                    taken.append(f"{host}:{port} ({launcher.name})")
        if taken:
            raise InfraError("address already in use, nothing was started: " + ", ".join(taken))

    async def _start_group(self, group: Iterable[Launcher]) -> None:
        group = list(group)
        for launcher in group:
            launcher.start()
        await asyncio.gather(*(launcher.wait_ready() for launcher in group))

    async def up(self, progress: Callable[[str], None] = lambda _m: None,
                 only: Iterable[str] | None = None) -> float:
        """Start every server (or only the kinds in ``only``; PostgreSQL always) and wait until each is
        ready; returns the seconds it took."""
        t0 = time.monotonic()
        self.check_ports()
        kinds = None if only is None else set(only)

        def wanted(kind: str) -> bool:
            return kinds is None or kind in kinds

        try:

            async def pg_then_activemq() -> None:
                await self._start_group([self.postgres])
                applied = await self.postgres.bootstrap()
                progress(f"postgres ready ({len(applied)} migrations applied)")
                if wanted("activemq"):
                    await self._start_activemq()
                    if self.launchers("activemq"):
                        progress("activemq ready (one master, one slave)")

            async def zk_then_kafka() -> None:
                if wanted("zookeeper") or wanted("kafka"):
                    await self._start_group(self.launchers("zookeeper"))
                    progress("zookeeper quorum ready")
                if wanted("kafka"):
                    await self._start_group(self.launchers("kafka"))
                    progress("kafka brokers ready")

            async def ignite() -> None:
                if wanted("ignite"):
                    await self._start_group(self.launchers("ignite"))
                    await self._wait_ignite_joined()
                    progress("ignite cluster ready (every node in one topology)")

            await _gather_all(pg_then_activemq(), zk_then_kafka(), ignite())
        except BaseException:
            await self.down()
            raise
        return time.monotonic() - t0

    async def _wait_ignite_joined(self, timeout_s: float = 90.0) -> None:
        """Every Ignite node sees every other one: a node that formed a cluster of its own (a slow join on a
        loaded machine) is caught here, not later as a cache that is not replicated where it should be."""
        nodes = self.launchers("ignite")
        deadline = time.monotonic() + timeout_s
        while True:
            seen = {n.name: n.topology_servers() for n in nodes}  # type: ignore[attr-defined]
            if all(count == len(nodes) for count in seen.values()):
                return
            if time.monotonic() > deadline:
                raise InfraError(
                    f"ignite nodes did not form one cluster of {len(nodes)} within {timeout_s:.0f} s: "
                    + ", ".join(f"{name} sees {count}" for name, count in seen.items())
                )
            await asyncio.sleep(0.2)

    async def heal_ignite(self, settle_s: float = 60.0) -> list[str]:
        """Bring the Ignite cluster back to one topology of every node after faults (kills, SIGSTOPs that got a
        node segmented and halted): start every node that is not running, give the cluster ``settle_s`` to
        merge, then restart the nodes whose view is still short. Returns the names started or restarted."""
        nodes = self.launchers("ignite")
        acted: list[str] = []
        dead = [n for n in nodes if not n.running()]
        for n in dead:
            n.start()
        await asyncio.gather(*(n.wait_ready() for n in dead))
        acted.extend(n.name for n in dead)
        try:
            await self._wait_ignite_joined(timeout_s=settle_s)
            return acted
        except InfraError:
            pass
        short = [n for n in nodes if n.topology_servers() != len(nodes)]  # type: ignore[attr-defined]
        await asyncio.gather(*(asyncio.to_thread(n.stop) for n in short))
        for n in short:
            n.start()
        await asyncio.gather(*(n.wait_ready() for n in short))
        acted.extend(n.name for n in short)
        await self._wait_ignite_joined(timeout_s=settle_s)
        return acted

    async def _start_activemq(self) -> None:
        brokers = self.launchers("activemq")
        if not brokers:
            return
        # the first broker takes the JDBC lease lock alone, so "master" is deterministic at start
        await self._start_group(brokers[:1])
        await self._start_group(brokers[1:])

    # ---- down / status -----------------------------------------------------------------------------
    async def down(self) -> list[str]:
        """Stop every process this lab started (by PID); returns the names stopped. Safe to repeat."""
        stopped: list[str] = []
        known = {launcher.name for launcher in self.launchers()}

        async def stop_all(group: list[Launcher]) -> None:
            running = [launcher for launcher in group if launcher.running()]
            await asyncio.gather(*(asyncio.to_thread(launcher.stop) for launcher in running))
            stopped.extend(launcher.name for launcher in running)

        # daemons and anything else recorded in the run folder go first (they use the servers)
        others = [r for r in records(self.run_dir) if r.name not in known]
        await asyncio.gather(*(asyncio.to_thread(stop_process, r, self.run_dir) for r in others if r.alive()))
        stopped.extend(r.name for r in others if not r.alive())
        for r in others:
            (self.run_dir / f"{r.name}.pid").unlink(missing_ok=True)
        await stop_all(self.launchers("activemq") + self.launchers("kafka"))
        await stop_all(self.launchers("ignite") + self.launchers("zookeeper") + [self.postgres])
        for launcher in self.launchers():
            (self.run_dir / f"{launcher.name}.pid").unlink(missing_ok=True)
        return stopped

    async def status(self) -> list[StatusRow]:
        async def row(launcher: Launcher) -> StatusRow:
            rec = launcher.record()
            alive = rec is not None and rec.alive()
            host, port = launcher.listen_ports()[0]
            state = await launcher.role() if alive else "stopped"
            pom = launcher.server.name if launcher.kind != "postgres" else "(external)"
            return StatusRow(pom, launcher.kind, f"{host}:{port}", rec.pid if rec and alive else None, state)

        return list(await asyncio.gather(*(row(launcher) for launcher in self.launchers())))


async def _gather_all(*aws: Awaitable[None]) -> None:
    """Like gather, but when one fails the others are cancelled before the error propagates."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
