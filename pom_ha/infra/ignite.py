"""One Apache Ignite 2.17 server node per POM server, all of them in one in-memory cluster.

The node is started with ``CommandLineStartup`` over a Spring XML rendered from
``config/templates/ignite.xml``; discovery, communication and the thin-client connector are bound to
the POM server's own address. Caches named ``pom-*`` are REPLICATED through a template in that XML,
so a cache a thin client creates by name survives the loss of any node but the last.
"""

from __future__ import annotations

import asyncio
import os
import re
import struct
from pathlib import Path
from typing import ClassVar

from pyignite import AioClient
from pyignite.datatypes import ClusterState

from pom_ha.config import Topology
from pom_ha.config.addresses import CLIENT_ERRORS as CLIENT_ERRORS  # its home; here for old callers
from pom_ha.config.addresses import thin_client_addresses as thin_client_addresses  # its home; here for old callers
from pom_ha.infra.base import JAVA17_OPENS, Launcher, java_bin, jvm_classpath, render_template

MAIN_CLASS = "org.apache.ignite.startup.cmdline.CommandLineStartup"
MIB = 1024 * 1024

# Ignite's jvmdefaults.sh adds these on Java 11+ besides the --add-opens list.
JAVA17_EXPORTS = [
    "--add-exports=java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-exports=java.management/com.sun.jmx.mbeanserver=ALL-UNNAMED",
    "--add-exports=jdk.internal.jvmstat/sun.jvmstat.monitor=ALL-UNNAMED",
    "--add-exports=java.base/sun.reflect.generics.reflectiveObjects=ALL-UNNAMED",
]

_TOPOLOGY_LINE = re.compile(rb"Topology snapshot \[ver=(\d+),.*?servers=(\d+)")
# printed once at each JVM start, before any topology snapshot of that run
_JVM_BANNER = b"VM information:"


# Thin-client handshake at protocol 1.0.0 (no feature negotiation): length, op 1, version, client type 2.
_HANDSHAKE_1_0_0 = struct.pack("<ibhhhb", 8, 1, 1, 0, 0, 2)


async def thin_handshake(host: str, port: int, timeout_s: float) -> bool:
    """True when the node accepts a thin client now; False while it is down, starting or recovering.

    Done by hand, not by pyignite: pyignite logs a traceback for every refused connection and retries
    a "Node in recovery mode" refusal in a tight loop, hammering a starting node with handshakes.
    """
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(_HANDSHAKE_1_0_0)
                (length,) = struct.unpack("<i", await reader.readexactly(4))
                reply = await reader.readexactly(length)
            finally:
                writer.close()
    except (OSError, EOFError, TimeoutError, struct.error):
        return False
    return reply[:1] == b"\x01"


def discovery_addresses(topo: Topology) -> list[str]:
    return [f"{s.address}:{topo.ports.ignite_discovery}" for s in topo.servers_running("ignite")]


class IgniteLauncher(Launcher):
    kind = "ignite"
    config_name = "ignite.xml"
    start_timeout_s: ClassVar[float] = 120.0
    # 3 s split a loaded 2-core lab machine's cluster into single-node "clusters" (a ring message late by
    # a few seconds reads as a dead neighbour, then SEGMENTATION halts); a killed node is still seen at once
    # (its sockets close), only a silent one waits this long
    failure_detection_ms: ClassVar[int] = 10000
    client_failure_detection_ms: ClassVar[int] = 5000
    probe_timeout_s: ClassVar[float] = 3.0

    @property
    def work_dir(self) -> Path:
        return self.home / "work"

    @property
    def tmp_dir(self) -> Path:
        return self.home / "tmp"

    @property
    def thin_client_port(self) -> int:
        return self.topo.ports.ignite_thin_client

    def listen_ports(self) -> list[tuple[str, int]]:
        ports = self.topo.ports
        return [
            (self.address, ports.ignite_thin_client),
            (self.address, ports.ignite_discovery),
            (self.address, ports.ignite_communication),
        ]

    def prepare(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        ports = self.topo.ports
        render_template(
            "ignite.xml",
            self.config_path,
            instance_name=self.name,
            address=self.address,
            work_dir=self.work_dir,
            failure_detection_ms=self.failure_detection_ms,
            client_failure_detection_ms=self.client_failure_detection_ms,
            thin_port=ports.ignite_thin_client,
            discovery_port=ports.ignite_discovery,
            communication_port=ports.ignite_communication,
            discovery_addresses="\n".join(
                f"                <value>{a}</value>" for a in discovery_addresses(self.topo)
            ),
            region_initial_bytes=32 * MIB,
            region_max_bytes=128 * MIB,
            # the default system region (40 MiB initial, 100 MiB max) is sized for large clusters
            system_region_initial_bytes=16 * MIB,
            system_region_max_bytes=64 * MIB,
        )

    def argv(self) -> list[str]:
        return [
            java_bin(),
            "-Xms128m",
            "-Xmx384m",
            # on a 2-core lab machine G1's concurrent threads compete with every other server
            "-XX:+UseSerialGC",
            # keep the JVM's perf counters out of /tmp (the node must write only under its home)
            "-XX:+PerfDisableSharedMem",
            # a node out of heap is worse than a dead one: its peers would wait on it
            "-XX:+ExitOnOutOfMemoryError",
            *JAVA17_OPENS,
            *JAVA17_EXPORTS,
            "-Djava.net.preferIPv4Stack=true",
            f"-DIGNITE_HOME={self.home}",
            # the node runs as the POM server's uid: nothing it writes may land outside its home
            f"-Djava.io.tmpdir={self.tmp_dir}",
            "-DIGNITE_QUIET=true",
            "-DIGNITE_NO_ASCII=true",
            "-DIGNITE_UPDATE_NOTIFIER=false",
            "-DIGNITE_PERFORMANCE_SUGGESTIONS_DISABLED=true",
            "-cp",
            jvm_classpath("ignite"),
            MAIN_CLASS,
            str(self.config_path),
        ]

    def env(self) -> dict[str, str]:
        return {**super().env(), "IGNITE_HOME": str(self.home)}

    async def probe(self) -> bool:
        """A thin-client handshake with this node succeeds and the cluster it is in is ACTIVE."""
        if not await thin_handshake(self.address, self.thin_client_port, self.probe_timeout_s):
            return False
        client = AioClient(partition_aware=False, handshake_timeout=self.probe_timeout_s)
        try:
            # longer than the handshake timeout: pyignite crashes on a reply to a handshake we cancelled
            async with asyncio.timeout(2 * self.probe_timeout_s):
                await client.connect([(self.address, self.thin_client_port)])
                state = await client.get_cluster().get_state()
            return bool(state == ClusterState.ACTIVE)
        except CLIENT_ERRORS:
            return False
        finally:
            await client.close()

    def topology_servers(self) -> int | None:
        """Server count in this node's newest topology snapshot, read from its console log.

        The thin-client protocol pyignite speaks has no node-listing call, and Ignite prints one
        ``Topology snapshot [ver=V, ... servers=N ...]`` line per topology change even in quiet mode,
        though not always in ``ver`` order: the highest ``ver`` since the last JVM start wins.
        """
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 256 * 1024))
                tail = f.read()
        except OSError:
            return None
        run = tail.rsplit(_JVM_BANNER, 1)[-1]
        snapshots = [(int(ver), int(servers)) for ver, servers in _TOPOLOGY_LINE.findall(run)]
        return max(snapshots)[1] if snapshots else None

    async def role(self) -> str:
        if not await self.probe():
            return "not ready"
        servers = self.topology_servers()
        return "server" if servers is None else f"server (topology {servers} nodes)"
