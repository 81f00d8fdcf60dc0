"""ActiveMQ Classic brokers of the lab: JDBC master/slave on the lab's PostgreSQL.

Every broker stores messages in PostgreSQL and competes for one lease row (``activemq_lock``) with
the lease-database-locker. The master holds the lease and opens its connectors; the slave blocks in
the locker and binds nothing until the master's lease runs out. Readiness therefore has two shapes:
the master answers STOMP CONNECT, the slave is alive, has said in its log that it waits for the lease,
and the lease row shows another broker holding it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar
from xml.sax.saxutils import escape

import asyncpg

from pom_ha.config.addresses import stomp_addresses as stomp_addresses  # its home; here for old callers
from pom_ha.infra.base import Launcher, java_bin, jvm_classpath, render_template, tcp_exchange
from pom_ha.infra.process import InfraError, ProcessRecord

#: Debian's package (apt ``activemq``); the launcher uses only its jars, never its init script
AMQ_HOME = Path("/usr/share/activemq")
#: lease duration (ms) and how often the master renews it. The lease-database-locker uses one value,
#: lockAcquireSleepInterval, both as the lease duration and as the slave's retry period, so after a
#: SIGKILL the slave holds the lease 0.4-1.0 s later (the lease left: 400-500 ms, plus up to one retry
#: period). Renewing every 100 ms keeps 400 ms of slack (a renewal may come that late) before a slow
#: master loses its lease. See docs/activemq.md "Failover time".
LEASE_MS = 500
KEEPALIVE_MS = 100

# The module flags of Debian's /usr/bin/activemq for Java > 8 (ActiveMQ's own tested list).
_JAVA_MODULE_FLAGS = [
    "--add-reads=java.xml=java.logging",
    "--add-opens=java.base/java.security=ALL-UNNAMED",
    "--add-opens=java.base/java.net=ALL-UNNAMED",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
    "--add-opens=java.naming/javax.naming.spi=ALL-UNNAMED",
    "--add-opens=java.rmi/sun.rmi.transport.tcp=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED",
    "--add-exports=java.base/sun.net.www.protocol.http=ALL-UNNAMED",
    "--add-exports=java.base/sun.net.www.protocol.https=ALL-UNNAMED",
    "--add-exports=java.base/sun.net.www.protocol.jar=ALL-UNNAMED",
    "--add-exports=jdk.xml.dom/org.w3c.dom.html=ALL-UNNAMED",
    "--add-exports=jdk.naming.rmi/com.sun.jndi.url.rmi=ALL-UNNAMED",
]

_WAITING = b"attempting to acquire exclusive lease to become the master"
_BECAME_MASTER = b"becoming master with lease expiry"

MASTER = "master"
SLAVE = "slave (waiting for lock)"
NOT_READY = "not ready"


def broker_name(server_name: str) -> str:
    return f"pomha-{server_name}"


class ActiveMQLauncher(Launcher):
    kind = "activemq"
    config_name = "activemq.xml"
    start_timeout_s: ClassVar[float] = 120.0

    @property
    def broker_name(self) -> str:
        return broker_name(self.server.name)

    @property
    def stomp_port(self) -> int:
        return self.topo.ports.activemq_stomp

    @property
    def _log_offset_file(self) -> Path:
        return self.home / "log-offset"

    def listen_ports(self) -> list[tuple[str, int]]:
        return [(self.address, self.stomp_port), (self.address, self.topo.ports.activemq_openwire)]

    def prepare(self) -> None:
        if not (AMQ_HOME / "bin" / "activemq.jar").exists():
            raise InfraError(f"ActiveMQ not found in {AMQ_HOME}: run scripts/install (apt package activemq)")
        jvm_classpath("activemq")  # fail here, with the install hint, when the JDBC driver is missing
        for d in (self.conf_dir, self.data_dir / "tmp", self.home / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
        pg = self.topo.postgres
        # the password exists only in this file (mode 0600, owned by the broker's uid after start)
        render_template(
            "activemq.xml",
            self.config_path,
            broker_name=self.broker_name,
            address=self.address,
            openwire_port=self.topo.ports.activemq_openwire,
            stomp_port=self.stomp_port,
            data_dir=escape(str(self.data_dir)),
            jdbc_url=escape(self._jdbc_url()),
            pg_user=escape(pg.user, {'"': "&quot;"}),
            pg_password=escape(pg.password.get_secret_value(), {'"': "&quot;"}),
            lease_ms=LEASE_MS,
            keepalive_ms=KEEPALIVE_MS,
        )
        self.config_path.chmod(0o600)
        render_template("activemq-log4j.properties", self.conf_dir / "log4j.properties")

    def _jdbc_url(self) -> str:
        pg = self.topo.postgres
        # socketTimeout bounds a lease renewal against an unreachable database, so a cut-off
        # master fails its keep-alive and stops instead of hanging while the slave takes over
        return (
            f"jdbc:postgresql://{pg.address}:{pg.port}/{pg.database}"
            f"?ApplicationName={self.broker_name}&connectTimeout=5&socketTimeout=10&tcpKeepAlive=true"
        )

    def argv(self) -> list[str]:
        conf = str(self.conf_dir)
        # Debian's Main puts activemq.classpath entries on the class path as given (directories are
        # not scanned for jars), so the JDBC driver jars are listed one by one after the conf folder
        classpath = f"{conf}:{jvm_classpath('activemq')}"
        return [
            java_bin(),
            "-Xms64m",
            "-Xmx256m",
            "-XX:+UseSerialGC",
            # C1 only: the new master's start after taking the lease (connectors, STOMP classes) runs
            # cold code; on a busy 2-core host C2 compiler threads competed with it (docs/activemq.md)
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Djava.io.tmpdir={self.home / 'tmp'}",
            *_JAVA_MODULE_FLAGS,
            f"-Dlog4j.configuration=file:{conf}/log4j.properties",
            f"-Dactivemq.classpath={classpath}",
            f"-Dactivemq.home={AMQ_HOME}",
            f"-Dactivemq.base={self.home}",
            f"-Dactivemq.conf={conf}",
            f"-Dactivemq.data={self.data_dir}",
            "-jar",
            str(AMQ_HOME / "bin" / "activemq.jar"),
            "start",
            f"xbean:file:{self.config_path}",
        ]

    def start(self) -> ProcessRecord:
        if not self.running():
            # the lab log is appended across restarts: role() must read only this run's lines
            self.home.mkdir(parents=True, exist_ok=True)
            size = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._log_offset_file.write_text(str(size))
        return super().start()

    def _log_since_start(self) -> bytes:
        try:
            offset = int(self._log_offset_file.read_text())
            with open(self.log_path, "rb") as f:
                if offset > f.seek(0, 2):
                    offset = 0  # the log was truncated or replaced
                f.seek(offset)
                return f.read()
        except (OSError, ValueError):
            return b""

    async def is_master(self) -> bool:
        """True when this broker answers a STOMP CONNECT: only the lease holder opens its connectors."""
        frames = (
            f"CONNECT\naccept-version:1.2\nhost:{self.broker_name}\n\n\0"
            # a clean DISCONNECT keeps every probe from logging a broken-transport warning
            "DISCONNECT\n\n\0"
        ).encode()
        reply = await tcp_exchange(self.address, self.stomp_port, frames, timeout_s=3.0)
        return reply.startswith(b"CONNECTED")

    async def _lease_held_by_other(self) -> bool:
        try:
            conn = await asyncpg.connect(self.topo.postgres.dsn(), timeout=3)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False
        try:
            row = await conn.fetchrow("SELECT broker_name, time FROM activemq_lock WHERE id = 1")
        except asyncpg.PostgresError:
            return False  # table not created yet: no broker got that far
        finally:
            await conn.close()
        if row is None or row["broker_name"] in (None, self.broker_name):
            return False
        # one lease of slack: a renewal a little late under load does not make the slave "not ready"
        return int(row["time"]) > time.time() * 1000 - LEASE_MS

    async def role(self) -> str:
        if not self.running():
            return NOT_READY
        if await self.is_master():
            return MASTER
        log = self._log_since_start()
        waiting = log.rfind(_WAITING)
        if waiting >= 0 and log.find(_BECAME_MASTER, waiting) < 0 and await self._lease_held_by_other():
            return SLAVE
        return NOT_READY

    async def probe(self) -> bool:
        return await self.role() != NOT_READY
