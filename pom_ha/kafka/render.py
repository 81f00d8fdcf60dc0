"""``kafka enable-ha``: the guide's manual Kafka HA procedure as one rendering step.

From a topology and a choice of servers it plans an HA cluster — one ZooKeeper ensemble member and one
broker co-resident on each chosen server, plus at most one external server — and renders every file
with the lab's own launchers and templates: ``myid``, ``zoo.cfg`` with its ``server.N`` lines,
``server.properties`` with ``broker.id``, listeners, replication factor 3 for default and internal
topics and ``min.insync.replicas=2``; with ``ssl`` also the CA and PKCS12 stores (``pom_ha.pki``).
The plan is validated completely before anything is written, so refused input writes nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from pom_ha.config import KafkaSection, ServerKind, ServerSection, Topology, dump_topology
from pom_ha.infra.kafka import KafkaLauncher
from pom_ha.infra.zookeeper import ZooKeeperLauncher
from pom_ha.pki import ensure_pki, lab_pki

#: the guide's recommendation: fewer brokers cannot hold three replicas
MIN_BROKERS = 3
#: the guide supports one external (non-POM) Kafka/ZooKeeper server
MAX_EXTERNAL = 1
HA_KINDS: tuple[ServerKind, ...] = ("zookeeper", "kafka")


class RenderError(ValueError):
    """The requested HA cluster is not valid; the message says why. Nothing was written."""


@dataclass(frozen=True)
class ExternalServer:
    """A Kafka/ZooKeeper host where POM is not installed (``--external NAME=ADDRESS``)."""

    name: str
    address: str

    @classmethod
    def parse(cls, spec: str) -> ExternalServer:
        name, sep, address = spec.partition("=")
        if not sep or not name or not address:
            raise RenderError(f"--external {spec!r}: expected NAME=ADDRESS, e.g. kafka-ext=127.0.1.9")
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise RenderError(f"--external {spec!r}: {address!r} is not an IP address") from None
        return cls(name, address)


@dataclass(frozen=True)
class RenderedFile:
    server: str
    what: str
    path: Path


def plan_cluster(
    topo: Topology,
    servers: Sequence[str] = (),
    externals: Sequence[ExternalServer] = (),
    brokers: int | None = None,
    ssl: bool = False,
) -> Topology:
    """The topology of the HA cluster: ``servers`` (default: every server that runs kafka) get ZooKeeper
    and Kafka, the others lose them, ``externals`` are appended (so existing servers keep their
    ``broker.id``/``myid``). Raises :class:`RenderError` with the reason for any bad input."""
    known = [s.name for s in topo.servers]
    unknown = [n for n in servers if n not in known]
    if unknown:
        raise RenderError(f"unknown server(s) {', '.join(unknown)}; the topology has {', '.join(known)}")
    if len(set(servers)) != len(servers):
        raise RenderError(f"a server is named twice: {', '.join(servers)}")
    chosen = list(servers) or [s.name for s in topo.servers_running("kafka")]
    clash = [e.name for e in externals if e.name in known]
    if clash:
        raise RenderError(f"external server(s) {', '.join(clash)} already in the topology: use --server instead")
    taken = {s.address for s in topo.servers} | {topo.postgres.address}
    clash = [f"{e.name}={e.address}" for e in externals if e.address in taken]
    if clash:
        raise RenderError(f"external server address already used in the topology: {', '.join(clash)}")
    if len({e.name for e in externals}) != len(externals) or len({e.address for e in externals}) != len(externals):
        raise RenderError("external servers need distinct names and addresses")
    ext_names = [s for s in chosen if topo.server(s).external] + [e.name for e in externals]
    if len(ext_names) > MAX_EXTERNAL:
        raise RenderError(
            f"at most {MAX_EXTERNAL} external server is supported, got {len(ext_names)}: {', '.join(ext_names)}"
        )
    count = len(chosen) + len(externals)
    if brokers is not None and brokers != count:
        raise RenderError(
            f"--brokers {brokers} does not match the {count} server(s) chosen: {', '.join(chosen + ext_names)}"
        )
    if count < MIN_BROKERS:
        raise RenderError(
            f"Kafka HA needs at least {MIN_BROKERS} brokers (replication factor 3, one replica per broker); "
            f"got {count}"
        )
    if count % 2 == 0:
        raise RenderError(
            f"Kafka HA needs an odd number of brokers: each runs a ZooKeeper member and an ensemble of {count} "
            f"tolerates no more failures than one of {count - 1}; got {count}"
        )
    planned: list[ServerSection] = []
    for s in topo.servers:
        runs = [k for k in s.runs if k not in HA_KINDS]
        if s.name in chosen:
            runs = [*HA_KINDS, *runs]
        planned.append(s.model_copy(update={"runs": runs}))
    planned += [ServerSection(name=e.name, address=e.address, runs=list(HA_KINDS), external=True) for e in externals]
    try:
        return Topology.model_validate(
            {
                **{f: getattr(topo, f) for f in ("lab", "postgres", "ports", "zones", "source")},
                "servers": planned,
                "kafka": KafkaSection(ssl=ssl),
            }
        )
    except ValidationError as exc:
        raise RenderError("; ".join(str(e["msg"]) for e in exc.errors())) from None


class _ZooKeeperAt(ZooKeeperLauncher):
    """The lab launcher, rendering into ``out`` instead of the topology's lab folder."""

    def __init__(self, topo: Topology, server: ServerSection, out: Path) -> None:
        super().__init__(topo, server)
        self._out = out

    @property
    def lab_dir(self) -> Path:
        return self._out


class _KafkaAt(KafkaLauncher):
    def __init__(self, topo: Topology, server: ServerSection, out: Path) -> None:
        super().__init__(topo, server)
        self._out = out

    @property
    def lab_dir(self) -> Path:
        return self._out


def render_cluster(plan: Topology, out: Path) -> list[RenderedFile]:
    """Write every file of the planned cluster under ``out`` (``<out>/<server>/{zookeeper,kafka}/...``,
    the lab's layout) plus ``<out>/topology.toml``; returns what was written."""
    out = out.resolve()
    files: list[RenderedFile] = []
    if plan.kafka.ssl:
        pki = lab_pki(plan, out)
        for path in ensure_pki(pki, [(s.name, s.address) for s in plan.servers_running("kafka")]):
            files.append(RenderedFile("(all)", "TLS material", path))
    for s in plan.servers_running("zookeeper"):
        zk = _ZooKeeperAt(plan, s, out)
        zk.prepare()
        files.append(RenderedFile(s.name, f"ZooKeeper myid {zk.myid}", zk.data_dir / "myid"))
        files.append(RenderedFile(s.name, "ZooKeeper config (server.N lines)", zk.config_path))
    for s in plan.servers_running("kafka"):
        broker = _KafkaAt(plan, s, out)
        broker.prepare()
        files.append(RenderedFile(s.name, f"broker.id {broker.broker_id}, {broker.protocol} listener",
                                  broker.config_path))
        if plan.kafka.ssl:
            files.append(RenderedFile(s.name, "broker keystore + truststore (PKCS12)", broker.conf_dir))
    topo_file = dump_topology(plan.model_copy(update={"lab": plan.lab.model_copy(update={"dir": str(out)})}),
                              out / "topology.toml")
    files.append(RenderedFile("(all)", "topology of the rendered cluster", topo_file))
    return files


def read_properties(path: Path) -> dict[str, str]:
    """``key=value`` lines of a Java properties / zoo.cfg file (comments and blanks skipped)."""
    props: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, _, value = line.partition("=")
        props[key.strip()] = value.strip()
    return props
