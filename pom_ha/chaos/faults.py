"""The chaos fault library: small fault objects with ``inject()`` and ``heal()`` on a lab backend.

A :class:`Fault` never touches a process itself: it asks a :class:`LabControl` backend for a primitive
(kill a daemon, pause it, kill one server process, cut a server off, restart PostgreSQL). Two backends:

* :class:`ProcessLab` — the process lab (``pom-ha lab up``, the test stack): signals by PID through the
  lab's pid records, uid-owner DROP rules in the chain of ``POM_FIREWALL_CHAIN`` for partitions, the
  launchers of :mod:`pom_ha.infra` for the real servers;
* :class:`DockerLab` — the container lab (``docker compose``): ``docker kill / start / pause / unpause /
  network disconnect / connect`` on the compose project's containers, through the docker CLI.

``heal()`` is idempotent and safe to call on a fault that was never (fully) injected; every fault says which
parts of the deployment it takes away (:attr:`Fault.down`), which is what the runner's survivability plan
(:mod:`pom_ha.chaos.plan`) counts.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from pom_ha.config import Topology

PartitionScope = Literal["postgres", "peers", "both"]
#: infra kinds a fault can kill one node of
INFRA_KINDS = ("zookeeper", "kafka", "ignite", "activemq")
#: the daemons of a POM server, in the order they are (re)started
DAEMONS = ("cache-service", "media-simulator", "rule-engine", "campaign-director", "campaign-manager",
           "agent-manager", "event-aggregator", "rest-api")
#: daemon -> its HA service name in ha_member / ha_lease
SERVICE_OF = {"cache-service": "cache_service", "rule-engine": "rule_engine",
              "campaign-director": "campaign_director", "campaign-manager": "campaign_manager",
              "agent-manager": "agent_manager", "event-aggregator": "event_aggregator"}
DAEMON_OF = {v: k for k, v in SERVICE_OF.items()}


class FaultError(Exception):
    """A fault could not be injected or healed; the message names the fault and the reason."""


class FaultImpossible(FaultError):
    """The topology or backend cannot have this fault (no second AM, no such server process ...)."""


# ---- backends ------------------------------------------------------------------------------------------------
class LabControl(ABC):
    """What a fault may do to a lab. Every method is idempotent where that makes sense (heal paths)."""

    backend: ClassVar[str]

    def __init__(self, topo: Topology) -> None:
        self.topo = topo

    @property
    def servers(self) -> list[str]:
        return [s.name for s in self.topo.servers]

    @abstractmethod
    def daemons_on(self, server: str) -> list[str]:
        """The platform daemons the lab runs on ``server`` (whether alive now or not)."""

    @abstractmethod
    def daemon_alive(self, daemon: str, server: str) -> bool: ...

    @abstractmethod
    def kill_daemon(self, daemon: str, server: str) -> None: ...

    @abstractmethod
    async def start_daemon(self, daemon: str, server: str) -> None: ...

    @abstractmethod
    def pause_daemon(self, daemon: str, server: str) -> None: ...

    @abstractmethod
    def resume_daemon(self, daemon: str, server: str) -> None: ...

    @abstractmethod
    def infra_on(self, kind: str) -> list[str]:
        """The servers running one node of ``kind`` (zookeeper, kafka, ignite, activemq)."""

    @abstractmethod
    def kill_infra(self, kind: str, server: str) -> None: ...

    @abstractmethod
    async def start_infra(self, kind: str, server: str) -> None: ...

    @abstractmethod
    def cut(self, server: str, scope: PartitionScope) -> None: ...

    @abstractmethod
    def uncut(self, server: str, scope: PartitionScope) -> None: ...

    @abstractmethod
    def stop_postgres(self) -> None: ...

    @abstractmethod
    async def start_postgres(self) -> None: ...

    @abstractmethod
    def leftovers(self) -> list[str]:
        """Rules, namespaces or paused processes a healed lab must not have (empty when clean)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Remove what the backend set up for faults (the firewall chain)."""

    async def infra_serving(self, kind: str, excluded: set[str]) -> bool:
        """Whether ``kind`` serves without the nodes of ``excluded`` (a majority, a controller, a master)."""
        return True

    async def infra_whole(self, kind: str) -> bool:
        """Whether every node of ``kind`` is back (in sync, joined): the next fault may take another."""
        return True


def proc_state(pid: int) -> str:
    """One-letter state of ``pid`` from /proc (``T`` stopped, ``Z`` zombie, ``?`` gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"
    return stat.rsplit(")", 1)[1].split()[0]


class ProcessLab(LabControl):
    """The process lab: pid records under ``<lab>/run``, launchers of the real servers, iptables."""

    backend = "process"

    def __init__(self, topo: Topology, topology_file: Path, *, chain: str | None = None) -> None:
        super().__init__(topo)
        from pom_ha.infra.stack import Stack
        from pom_ha.lab.faults import CHAIN, Firewall

        self.topology_file = topology_file
        self.stack = Stack(topo)
        self.firewall = Firewall(chain or CHAIN)
        self._firewall_ready = False
        self._rules: dict[tuple[str, str], list[list[str]]] = {}

    @property
    def run_dir(self) -> Path:
        return self.topo.lab_dir() / "run"

    def _record(self, daemon: str, server: str):  # type: ignore[no-untyped-def]
        from pom_ha.infra.process import read_record

        return read_record(self.run_dir, f"{daemon}-{server}")

    def daemons_on(self, server: str) -> list[str]:
        return [d for d in DAEMONS if self._record(d, server) is not None]

    def daemon_alive(self, daemon: str, server: str) -> bool:
        rec = self._record(daemon, server)
        return rec is not None and rec.alive()

    def kill_daemon(self, daemon: str, server: str) -> None:
        import signal

        from pom_ha.infra.process import kill_process, signal_process

        rec = self._record(daemon, server)
        if rec is None:
            raise FaultImpossible(f"no {daemon} on {server} in {self.run_dir}")
        signal_process(rec, signal.SIGCONT)  # a paused process dies as well, but never stays T
        kill_process(rec)

    async def start_daemon(self, daemon: str, server: str) -> None:
        from pom_ha.lab.daemons import start_daemon
        from pom_ha.lab.platform import AS_OPERATOR, server_daemon_args

        if self.daemon_alive(daemon, server):
            return
        start_daemon(self.topo, self.topology_file, server, daemon, *server_daemon_args(self.topo, daemon, server),
                     name=f"{daemon}-{server}", as_server_uid=daemon not in AS_OPERATOR)

    def pause_daemon(self, daemon: str, server: str) -> None:
        import signal

        from pom_ha.infra.process import signal_process

        rec = self._record(daemon, server)
        if rec is None or not signal_process(rec, signal.SIGSTOP):
            raise FaultError(f"{daemon} on {server} is not running: cannot pause it")

    def resume_daemon(self, daemon: str, server: str) -> None:
        import signal

        from pom_ha.infra.process import signal_process

        rec = self._record(daemon, server)
        if rec is not None:
            signal_process(rec, signal.SIGCONT)

    def infra_on(self, kind: str) -> list[str]:
        return [s.name for s in self.topo.servers_running(kind)]  # type: ignore[arg-type]

    def kill_infra(self, kind: str, server: str) -> None:
        launcher = self.stack.launcher(kind, server)
        rec = launcher.record()
        if rec is not None:
            import signal

            from pom_ha.infra.process import signal_process

            signal_process(rec, signal.SIGCONT)
        launcher.kill()

    async def start_infra(self, kind: str, server: str) -> None:
        from pom_ha.infra.process import InfraError

        launcher = self.stack.launcher(kind, server)
        if not launcher.running():
            try:
                launcher.start()
            except InfraError:
                # the cache service's supervisor restarts its Ignite node itself: it may have won the race
                if not launcher.running():
                    raise
        await launcher.wait_ready(timeout_s=120)

    # partitions: uid-owner DROP rules, one list per (server, scope) so each heals alone
    def _ensure_firewall(self) -> None:
        if not self._firewall_ready:
            self.firewall.install()
            self._firewall_ready = True

    def cut(self, server: str, scope: PartitionScope) -> None:
        self._ensure_firewall()
        uid = self.topo.server_uid(server)
        me = self.topo.server(server).address
        rules: list[list[str]] = self._rules.setdefault((server, scope), [])
        if scope in ("postgres", "both"):
            rules.append(self.firewall.drop_from_uid(uid, self.topo.postgres.address))
        if scope in ("peers", "both"):
            for other in self.topo.servers:
                if other.name == server:
                    continue
                rules.append(self.firewall.drop_from_uid(uid, other.address))
                rules.append(self.firewall.drop_from_uid(self.topo.server_uid(other.name), me))

    def uncut(self, server: str, scope: PartitionScope) -> None:
        for rule in self._rules.pop((server, scope), []):
            self.firewall.delete(rule)

    def stop_postgres(self) -> None:
        self.stack.postgres.kill()

    async def start_postgres(self) -> None:
        pg = self.stack.postgres
        if not pg.running():
            pg.start()
        await pg.wait_ready(timeout_s=120)

    def paused_processes(self) -> list[str]:
        from pom_ha.infra.process import records

        return [f"paused process {r.name} (pid {r.pid})" for r in records(self.run_dir)
                if r.alive() and proc_state(r.pid) == "T"]

    def leftovers(self) -> list[str]:
        out = [f"iptables rule in {self.firewall.chain}: {rule}" for rule in self.firewall.rules()]
        out += self.paused_processes()
        out += [f"network namespace {ns}" for ns in network_namespaces() if ns.startswith("pomha")]
        return out

    async def infra_serving(self, kind: str, excluded: set[str]) -> bool:
        nodes = [self.stack.launcher(kind, s) for s in self.infra_on(kind) if s not in excluded]
        if not nodes:
            return False
        if kind == "zookeeper":
            roles = await asyncio.gather(*(n.role() for n in nodes))
            serving = [r for r in roles if r in ("leader", "follower", "standalone")]
            return len(serving) > len(self.infra_on(kind)) // 2 and "leader" in roles
        if kind == "kafka":
            roles = await asyncio.gather(*(n.role() for n in nodes))
            return "controller" in roles
        if kind == "activemq":
            return any(await asyncio.gather(*(n.is_master() for n in nodes)))  # type: ignore[attr-defined]
        return any(await asyncio.gather(*(n.probe() for n in nodes)))

    async def infra_whole(self, kind: str) -> bool:
        nodes = [self.stack.launcher(kind, s) for s in self.infra_on(kind)]
        if not all(n.running() for n in nodes):
            return False
        if kind == "kafka":
            return await asyncio.to_thread(self._kafka_in_sync, len(nodes))
        if kind == "ignite":
            counts = [await asyncio.to_thread(n.topology_servers) for n in nodes]  # type: ignore[attr-defined]
            return all(c == len(nodes) for c in counts)
        return all(await asyncio.gather(*(n.probe() for n in nodes)))

    def _kafka_in_sync(self, brokers: int) -> bool:
        from pom_ha.infra.kafka import _fetch_metadata, bootstrap_servers
        from pom_ha.kafka.tls import security_config

        md = _fetch_metadata(bootstrap_servers(self.topo), 3.0, security_config(self.topo))
        if md is None or len(md.brokers) < brokers:
            return False
        for name, topic in md.topics.items():
            if name.startswith("POM."):
                for part in topic.partitions.values():
                    if len(part.isrs) < len(part.replicas):
                        return False
        return True

    def close(self) -> None:
        if self._firewall_ready:
            self.firewall.remove()
            self._firewall_ready = False


def network_namespaces() -> list[str]:
    ip = shutil.which("ip")
    if ip is None:
        return []
    res = subprocess.run([ip, "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


class DockerLab(LabControl):
    """The container lab of ``docker-compose.yml``: one container per daemon (``<server>-<daemon>``), one
    ``<server>-infra`` container with the server's JVM servers, one ``postgres``. Partitions disconnect a
    server's containers from the compose network (``both``; the container lab has no finer cut)."""

    backend = "docker"

    def __init__(self, topo: Topology, project: str, network: str, *, docker: str = "docker") -> None:
        super().__init__(topo)
        self.project = project
        self.network = network
        self.docker = docker
        self._cut: set[str] = set()

    def _run(self, *args: str, check: bool = True) -> str:
        res = subprocess.run([self.docker, *args], capture_output=True, text=True)
        if check and res.returncode != 0:
            raise FaultError(f"docker {' '.join(args)} failed: {res.stderr.strip()}")
        return res.stdout

    def container(self, service: str) -> str:
        out = self._run("ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={self.project}",
                        "--filter", f"label=com.docker.compose.service={service}").split()
        if not out:
            raise FaultImpossible(f"no container of service {service!r} in compose project {self.project!r}")
        return out[0]

    def _state(self, service: str) -> str:
        return self._run("inspect", "-f", "{{.State.Status}}", self.container(service)).strip()

    def daemons_on(self, server: str) -> list[str]:
        out = []
        for d in DAEMONS:
            try:
                self.container(f"{server}-{d}")
            except FaultImpossible:
                continue
            out.append(d)
        return out

    def daemon_alive(self, daemon: str, server: str) -> bool:
        return self._state(f"{server}-{daemon}") == "running"

    def kill_daemon(self, daemon: str, server: str) -> None:
        self._run("kill", self.container(f"{server}-{daemon}"), check=False)

    async def start_daemon(self, daemon: str, server: str) -> None:
        await asyncio.to_thread(self._run, "start", self.container(f"{server}-{daemon}"))

    def pause_daemon(self, daemon: str, server: str) -> None:
        self._run("pause", self.container(f"{server}-{daemon}"))

    def resume_daemon(self, daemon: str, server: str) -> None:
        self._run("unpause", self.container(f"{server}-{daemon}"), check=False)

    def infra_on(self, kind: str) -> list[str]:
        return []  # one infra container holds every JVM server of a POM server: no single-node kill

    def kill_infra(self, kind: str, server: str) -> None:
        raise FaultImpossible(f"the container lab runs {kind} inside {server}-infra with the other servers")

    async def start_infra(self, kind: str, server: str) -> None:
        raise FaultImpossible(f"the container lab runs {kind} inside {server}-infra with the other servers")

    def _server_containers(self, server: str) -> list[str]:
        return [self.container(f"{server}-{d}") for d in self.daemons_on(server)] + [self.container(f"{server}-infra")]

    def cut(self, server: str, scope: PartitionScope) -> None:
        if scope != "both":
            raise FaultImpossible("the container lab only cuts a server from everything (network disconnect)")
        for c in self._server_containers(server):
            self._run("network", "disconnect", self.network, c)
        self._cut.add(server)

    def uncut(self, server: str, scope: PartitionScope) -> None:
        for c in self._server_containers(server):
            self._run("network", "connect", self.network, c, check=False)
        self._cut.discard(server)

    def stop_postgres(self) -> None:
        self._run("kill", self.container("postgres"), check=False)

    async def start_postgres(self) -> None:
        await asyncio.to_thread(self._run, "start", self.container("postgres"))

    def leftovers(self) -> list[str]:
        out = [f"network cut of {s} (containers disconnected)" for s in sorted(self._cut)]
        ids = self._run("ps", "-q", "--filter", f"label=com.docker.compose.project={self.project}",
                        "--filter", "status=paused").split()
        out += [f"paused container {c}" for c in ids]
        return out


# ---- faults ---------------------------------------------------------------------------------------------------
@dataclass
class Fault(ABC):
    """One fault. ``down`` maps a resource (``zookeeper``, ``kafka``, ``ignite``, ``activemq``, ``postgres``,
    ``daemon:<daemon>``) to the servers whose instance of it the fault takes away."""

    kind: ClassVar[str]
    injected: bool = field(default=False, init=False)

    @property
    @abstractmethod
    def target(self) -> str: ...

    @abstractmethod
    def down(self, lab: LabControl) -> dict[str, set[str]]: ...

    @abstractmethod
    async def _inject(self, lab: LabControl) -> None: ...

    @abstractmethod
    async def _heal(self, lab: LabControl) -> None: ...

    def check(self, lab: LabControl) -> None:  # noqa: B027 - optional hook
        """Raise :class:`FaultImpossible` when the lab cannot have this fault."""

    async def inject(self, lab: LabControl) -> None:
        self.check(lab)
        self.injected = True  # set first: a half-done inject is healed too
        await self._inject(lab)

    async def heal(self, lab: LabControl) -> None:
        await self._heal(lab)
        self.injected = False

    def describe(self) -> str:
        return f"{self.kind} {self.target}"

    def as_json(self) -> dict[str, str]:
        return {"kind": self.kind, "target": self.target}


def _daemons_down(daemons: Iterable[str], server: str) -> dict[str, set[str]]:
    return {f"daemon:{d}": {server} for d in daemons}


@dataclass
class _DaemonFault(Fault):
    """A fault of one daemon on one server: what it targets, whether it runs there, what it takes down."""

    daemon: str = ""
    server: str = ""

    @property
    def target(self) -> str:
        return f"{self.daemon}@{self.server}"

    def check(self, lab: LabControl) -> None:
        if self.daemon not in lab.daemons_on(self.server):
            raise FaultImpossible(f"{self.daemon} does not run on {self.server}")

    def down(self, lab: LabControl) -> dict[str, set[str]]:
        return _daemons_down([self.daemon], self.server)


@dataclass
class DaemonKill(_DaemonFault):
    """SIGKILL of one pom-ha daemon; heal starts it again (the lab's own start command)."""

    kind: ClassVar[str] = "daemon-kill"

    async def _inject(self, lab: LabControl) -> None:
        await asyncio.to_thread(lab.kill_daemon, self.daemon, self.server)

    async def _heal(self, lab: LabControl) -> None:
        await lab.start_daemon(self.daemon, self.server)


@dataclass
class MasterPause(_DaemonFault):
    """SIGSTOP of a master daemon (a long GC pause, a stalled VM); heal is SIGCONT."""

    kind: ClassVar[str] = "master-pause"

    async def _inject(self, lab: LabControl) -> None:
        lab.pause_daemon(self.daemon, self.server)

    async def _heal(self, lab: LabControl) -> None:
        lab.resume_daemon(self.daemon, self.server)


@dataclass
class ServerKill(Fault):
    """A whole POM server dies (every daemon and every real server process on it); heal restarts it all."""

    server: str = ""
    kind: ClassVar[str] = "server-kill"

    @property
    def target(self) -> str:
        return self.server

    def down(self, lab: LabControl) -> dict[str, set[str]]:
        out = _daemons_down(lab.daemons_on(self.server), self.server)
        for k in INFRA_KINDS:
            if self.server in lab.infra_on(k):
                out[k] = {self.server}
        return out

    async def _inject(self, lab: LabControl) -> None:
        for d in lab.daemons_on(self.server):
            await asyncio.to_thread(lab.kill_daemon, d, self.server)
        for k in reversed(INFRA_KINDS):
            if self.server in lab.infra_on(k):
                await asyncio.to_thread(lab.kill_infra, k, self.server)

    async def _heal(self, lab: LabControl) -> None:
        # every part is started even when another fails to start; the failures are raised together after
        errors: list[str] = []
        for k in ("zookeeper", "kafka", "activemq", "ignite"):
            if self.server in lab.infra_on(k):
                try:
                    await lab.start_infra(k, self.server)
                except Exception as exc:
                    errors.append(f"{k}: {type(exc).__name__}: {str(exc)[:200]}")
        for d in lab.daemons_on(self.server):
            try:
                await lab.start_daemon(d, self.server)
            except Exception as exc:
                errors.append(f"{d}: {type(exc).__name__}: {str(exc)[:200]}")
        if errors:
            raise FaultError(f"restart of {self.server} incomplete: " + "; ".join(errors))


@dataclass
class Partition(Fault):
    """One server cut from PostgreSQL, from its peers, or from both."""

    server: str = ""
    scope: PartitionScope = "both"
    kind: ClassVar[str] = "partition"

    @property
    def target(self) -> str:
        return f"{self.server}/{self.scope}"

    def describe(self) -> str:
        return f"partition {self.server} from {self.scope}"

    def down(self, lab: LabControl) -> dict[str, set[str]]:
        out = _daemons_down(lab.daemons_on(self.server), self.server)
        kinds = INFRA_KINDS if self.scope != "postgres" else ("activemq",)  # ActiveMQ's lock lives in PostgreSQL
        for k in kinds:
            if self.server in lab.infra_on(k):
                out[k] = {self.server}
        return out

    # on the loop's thread (a few iptables calls): a cancelled run must not leave a thread adding rules after
    # the heal removed them
    async def _inject(self, lab: LabControl) -> None:
        lab.cut(self.server, self.scope)

    async def _heal(self, lab: LabControl) -> None:
        lab.uncut(self.server, self.scope)


@dataclass
class InfraKill(Fault):
    """SIGKILL of one Kafka broker, ZooKeeper node, Ignite node or ActiveMQ broker; heal starts it again."""

    infra: str = ""
    server: str = ""
    kind: ClassVar[str] = "infra-kill"

    @property
    def target(self) -> str:
        return f"{self.infra}@{self.server}"

    def describe(self) -> str:
        return f"{self.infra}-kill {self.server}"

    def check(self, lab: LabControl) -> None:
        if self.server not in lab.infra_on(self.infra):
            raise FaultImpossible(f"no {self.infra} node on {self.server}")

    def down(self, lab: LabControl) -> dict[str, set[str]]:
        return {self.infra: {self.server}}

    async def _inject(self, lab: LabControl) -> None:
        await asyncio.to_thread(lab.kill_infra, self.infra, self.server)

    async def _heal(self, lab: LabControl) -> None:
        await lab.start_infra(self.infra, self.server)


@dataclass
class PostgresRestart(Fault):
    """PostgreSQL dies (SIGKILL of the postmaster: crash recovery on start) and is started again."""

    kind: ClassVar[str] = "postgres-restart"

    @property
    def target(self) -> str:
        return "postgres"

    def down(self, lab: LabControl) -> dict[str, set[str]]:
        return {"postgres": {"postgres"}}

    async def _inject(self, lab: LabControl) -> None:
        await asyncio.to_thread(lab.stop_postgres)

    async def _heal(self, lab: LabControl) -> None:
        await lab.start_postgres()


FAULT_KINDS = ("daemon-kill", "master-pause", "server-kill", "partition", "infra-kill", "postgres-restart")


def fault_from_json(obj: dict[str, str]) -> Fault:
    """The fault a history line names (``kind``, ``target``)."""
    kind, target = obj.get("kind"), obj.get("target", "")
    if kind == "daemon-kill":
        d, _, s = target.partition("@")
        return DaemonKill(daemon=d, server=s)
    if kind == "master-pause":
        d, _, s = target.partition("@")
        return MasterPause(daemon=d, server=s)
    if kind == "server-kill":
        return ServerKill(server=target)
    if kind == "partition":
        s, _, scope = target.partition("/")
        if scope not in ("postgres", "peers", "both"):
            raise ValueError(f"partition scope {scope!r}")
        return Partition(server=s, scope=scope)  # type: ignore[arg-type]
    if kind == "infra-kill":
        k, _, s = target.partition("@")
        return InfraKill(infra=k, server=s)
    if kind == "postgres-restart":
        return PostgresRestart()
    raise ValueError(f"unknown fault kind {kind!r}")


def dumps(fault: Fault) -> str:
    return json.dumps(fault.as_json())
