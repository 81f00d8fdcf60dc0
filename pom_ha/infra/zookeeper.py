"""ZooKeeper ensemble member of one POM server (the Kafka brokers' metadata store).

Every server that runs ``zookeeper`` in the topology is one voting member; ``myid`` is the server's
1-based position in the topology file, the same number as its Kafka ``broker.id``. The JVM runs from
the Kafka classpath (it bundles ZooKeeper 3.8) and logs through reload4j to stdout.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar

from pom_ha.config import Topology
from pom_ha.infra.base import Launcher, java_bin, jvm_classpath, render_template, tcp_exchange
from pom_ha.infra.process import ProcessRecord

#: the znode under which the Kafka brokers keep their metadata
KAFKA_CHROOT = "/pomha-kafka"
#: ZooKeeper modes in which a member serves reads and writes
SERVING_MODES = frozenset({"leader", "follower", "observer", "standalone"})
#: ZooKeeper timing: one tick is the unit of every other ZooKeeper timeout
TICK_TIME_MS = 500
INIT_LIMIT_TICKS = 10
SYNC_LIMIT_TICKS = 4


def zookeeper_connect(topo: Topology, chroot: bool = True) -> str:
    """Connect string over every ensemble member, with Kafka's chroot unless ``chroot`` is False."""
    hosts = ",".join(f"{s.address}:{topo.ports.zookeeper_client}" for s in topo.servers_running("zookeeper"))
    return hosts + (KAFKA_CHROOT if chroot else "")


def jvm_server_opts(home: Path, log4j: Path, heap_min_mb: int, heap_max_mb: int) -> list[str]:
    """JVM options shared by the lab's reload4j servers: small heap, nothing written outside ``home``."""
    return [
        f"-Xms{heap_min_mb}m",
        f"-Xmx{heap_max_mb}m",
        # serial GC: the lowest footprint and thread count for heaps this small on a 2-core machine
        "-XX:+UseSerialGC",
        "-XX:+ExitOnOutOfMemoryError",
        # the JVM would otherwise write /tmp/hsperfdata_<uid> and crash reports into the cwd's parent
        "-XX:+PerfDisableSharedMem",
        f"-XX:ErrorFile={home}/hs_err_%p.log",
        f"-Djava.io.tmpdir={home}/tmp",
        "-Djava.awt.headless=true",
        f"-Dlog4j.configuration=file:{log4j}",
    ]


def wait_exec_settled(rec: ProcessRecord, timeout_s: float = 5.0) -> None:
    """Return once the started process runs java itself, or has exited.

    The JVM is reached through ``setpriv``'s exec; while an exec is in flight ``/proc/<pid>/cmdline``
    reads empty (measured: 5-25 ms here, longer under load), and ``Launcher.wait_ready`` would take that
    for a process that exited during start.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{rec.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            argv0 = Path(f"/proc/{rec.pid}/cmdline").read_bytes().split(b"\0", 1)[0]
        except (OSError, IndexError):
            return
        if state == "Z" or argv0.endswith(b"/java"):
            return
        time.sleep(0.005)


def parse_srvr_mode(reply: bytes) -> str | None:
    """The ``Mode:`` of a ``srvr`` reply, or None when the member is not serving."""
    for line in reply.decode(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "Mode":
            return value.strip()
    return None


class ZooKeeperLauncher(Launcher):
    kind = "zookeeper"
    config_name = "zoo.cfg"
    start_timeout_s: ClassVar[float] = 90.0

    @property
    def myid(self) -> int:
        return self.topo.server_index(self.server.name)

    def listen_ports(self) -> list[tuple[str, int]]:
        p = self.topo.ports
        return [
            (self.address, p.zookeeper_client),
            (self.address, p.zookeeper_peer),
            (self.address, p.zookeeper_election),
        ]

    def prepare(self) -> None:
        p = self.topo.ports
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.home / "tmp").mkdir(exist_ok=True)
        (self.data_dir / "myid").write_text(f"{self.myid}\n")
        members = [
            f"server.{self.topo.server_index(s.name)}={s.address}:{p.zookeeper_peer}:{p.zookeeper_election}"
            for s in self.topo.servers_running("zookeeper")
        ]
        render_template(
            "zookeeper.cfg",
            self.config_path,
            myid=self.myid,
            tick_time_ms=TICK_TIME_MS,
            init_limit=INIT_LIMIT_TICKS,
            sync_limit=SYNC_LIMIT_TICKS,
            data_dir=self.data_dir,
            client_port=p.zookeeper_client,
            address=self.address,
            servers="\n".join(members),
        )
        render_template("jvm-log4j.properties", self.conf_dir / "log4j.properties", root_level="INFO")

    def start(self) -> ProcessRecord:
        rec = super().start()
        wait_exec_settled(rec)
        return rec

    def argv(self) -> list[str]:
        return [
            java_bin(),
            *jvm_server_opts(self.home, self.conf_dir / "log4j.properties", 64, 192),
            "-cp",
            jvm_classpath("kafka"),
            "org.apache.zookeeper.server.quorum.QuorumPeerMain",
            str(self.config_path),
        ]

    async def mode(self) -> str | None:
        """leader/follower/standalone, or None when down or without quorum."""
        reply = await tcp_exchange(self.address, self.topo.ports.zookeeper_client, b"srvr")
        return parse_srvr_mode(reply)

    async def probe(self) -> bool:
        return await self.mode() in SERVING_MODES

    async def role(self) -> str:
        mode = await self.mode()
        return mode if mode is not None and mode in SERVING_MODES else "not serving"
