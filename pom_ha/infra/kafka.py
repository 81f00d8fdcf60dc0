"""Kafka broker of one POM server, in ZooKeeper mode (Kafka 3.9, the last line that has it).

``broker.id`` is the server's 1-based position in the topology (its ZooKeeper ``myid`` too). Durability
settings follow DESIGN §4: replication factor 3 (fewer when the lab has fewer brokers),
``min.insync.replicas=2``, no unclean leader election; producers use acks=all and idempotence.
With ``[kafka] ssl = true`` the one listener is SSL with client authentication required; the key and trust
stores come from ``pom_ha.pki`` and readiness is probed over mutual TLS.
"""

from __future__ import annotations

import asyncio
import shutil
from typing import TYPE_CHECKING, ClassVar

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from pom_ha.config import Topology
from pom_ha.config.addresses import bootstrap_servers as bootstrap_servers  # its home; here for old callers
from pom_ha.infra.base import Launcher, java_bin, jvm_classpath, render_template
from pom_ha.infra.process import ProcessRecord
from pom_ha.infra.zookeeper import jvm_server_opts, wait_exec_settled, zookeeper_connect
from pom_ha.kafka.tls import broker_ssl_properties, security_config
from pom_ha.pki import ensure_pki, lab_pki

if TYPE_CHECKING:
    from confluent_kafka.admin._metadata import ClusterMetadata

#: how long one readiness probe waits for a metadata answer
PROBE_TIMEOUT_S = 2.0


def broker_ids(topo: Topology) -> set[int]:
    """The ``broker.id`` of every broker of the topology."""
    return {topo.server_index(s.name) for s in topo.servers_running("kafka")}


def _fetch_metadata(bootstrap: str, timeout_s: float, security: dict[str, str]) -> ClusterMetadata | None:
    admin = AdminClient(
        {
            **security,
            "bootstrap.servers": bootstrap,
            "socket.timeout.ms": int(timeout_s * 1000),
            # a broker that is still starting refuses connections: that is an answer, not log noise
            "log_level": 0,
        },
        error_cb=lambda _err: None,
    )
    try:
        return admin.list_topics(timeout=timeout_s)
    except KafkaException:
        return None


class KafkaLauncher(Launcher):
    kind = "kafka"
    config_name = "server.properties"
    # a JVM broker on a busy 2-core machine can take 20-40 s, and it needs every peer registered
    start_timeout_s: ClassVar[float] = 120.0

    @property
    def broker_id(self) -> int:
        return self.topo.server_index(self.server.name)

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.topo.ports.kafka}"

    def listen_ports(self) -> list[tuple[str, int]]:
        return [(self.address, self.topo.ports.kafka)]

    @property
    def protocol(self) -> str:
        """Security protocol of the broker's one listener (``[kafka] ssl`` in the topology)."""
        return "SSL" if self.topo.kafka.ssl else "PLAINTEXT"

    def security(self) -> dict[str, str]:
        """Client security settings that reach this broker (empty for plaintext)."""
        return security_config(self.topo, lab_pki(self.topo, self.lab_dir))

    def _prepare_tls(self) -> str:
        """Make sure the lab CA and this broker's stores exist; copy them into conf/ (readable only by the
        broker's uid once the home is chowned) and return the SSL block of server.properties."""
        pki = lab_pki(self.topo, self.lab_dir)
        ensure_pki(pki, [(s.name, s.address) for s in self.topo.servers_running("kafka")])
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self.conf_dir.chmod(0o700)
        keystore, truststore = self.conf_dir / "keystore.p12", self.conf_dir / "truststore.p12"
        for src, dest in ((pki.keystore(self.server.name), keystore), (pki.truststore, truststore)):
            shutil.copyfile(src, dest)
            dest.chmod(0o600)
        return broker_ssl_properties(keystore, truststore, pki.password())

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.home / "tmp").mkdir(exist_ok=True)
        brokers = len(self.topo.servers_running("kafka"))
        replication = min(3, brokers)
        ssl_settings = self._prepare_tls() if self.topo.kafka.ssl else ""
        render_template(
            "kafka-server.properties",
            self.config_path,
            broker_id=self.broker_id,
            protocol=self.protocol,
            ssl_settings=ssl_settings,
            address=self.address,
            port=self.topo.ports.kafka,
            log_dirs=self.data_dir,
            zookeeper_connect=zookeeper_connect(self.topo),
            replication_factor=replication,
            # a single-broker lab could never satisfy 2 in-sync replicas
            min_insync=min(2, replication),
        )
        render_template("jvm-log4j.properties", self.conf_dir / "log4j.properties", root_level="INFO")

    def start(self) -> ProcessRecord:
        rec = super().start()
        wait_exec_settled(rec)
        return rec

    def argv(self) -> list[str]:
        return [
            java_bin(),
            *jvm_server_opts(self.home, self.conf_dir / "log4j.properties", 128, 384),
            "-cp",
            jvm_classpath("kafka"),
            "kafka.Kafka",
            str(self.config_path),
        ]

    async def metadata(self) -> ClusterMetadata | None:
        """Cluster metadata through THIS broker, or None when it does not answer in time."""
        # librdkafka may send list_topics to a peer it has learned of, but it can only have learned
        # of peers from this broker's own metadata answer: any answer at all means this broker serves
        return await asyncio.to_thread(_fetch_metadata, self.endpoint, PROBE_TIMEOUT_S, self.security())

    async def probe(self) -> bool:
        md = await self.metadata()
        if md is None:
            return False
        listed = set(md.brokers)
        return self.broker_id in listed and broker_ids(self.topo) <= listed

    async def role(self) -> str:
        md = await self.metadata()
        if md is None or self.broker_id not in md.brokers:
            return "not ready"
        return "controller" if md.controller_id == self.broker_id else "broker"
