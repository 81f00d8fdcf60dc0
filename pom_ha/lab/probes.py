"""A cluster of ha-probe daemons on real PostgreSQL, and the history checks run over what they wrote.

Used by the HA integration tests and by ``pom-ha bench failover``. Every probe runs as its POM
server's uid (so the lab firewall can cut it off) and is found and stopped by PID.

History checks read only the database: ``ha_probe_write`` rows are fenced writes that PostgreSQL
accepted, so "two masters acted at once" is exactly "a row of a lower epoch written after the first
row of a higher epoch".
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import asyncpg

from pom_ha.config import Topology
from pom_ha.infra.process import ProcessRecord, kill_process, signal_process, stop_process
from pom_ha.lab.daemons import start_daemon


@dataclass(frozen=True)
class Holder:
    server: str
    instance: str
    epoch: int


@dataclass
class ProbeCluster:
    topo: Topology
    topology_file: Path
    service: str
    servers: list[str]
    zones: list[str] = field(default_factory=list)
    extra_args: tuple[str, ...] = ()
    procs: dict[str, ProcessRecord] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.topo.lab_dir() / "run"

    def start(self, server: str) -> ProcessRecord:
        args = ["--role", self.service, *[a for z in self.zones for a in ("--zone", z)], *self.extra_args]
        rec = start_daemon(self.topo, self.topology_file, server, "ha-probe", *args,
                           name=f"ha-probe-{self.service}-{server}")
        self.procs[server] = rec
        return rec

    def start_all(self) -> None:
        for server in self.servers:
            self.start(server)

    def kill(self, server: str) -> None:
        kill_process(self.procs[server])

    def terminate(self, server: str) -> None:
        """SIGTERM and wait for a graceful exit."""
        stop_process(self.procs[server], self.run_dir, timeout_s=15)

    def send(self, server: str, sig: signal.Signals) -> bool:
        return signal_process(self.procs[server], sig)

    def stop_all(self) -> None:
        for rec in self.procs.values():
            signal_process(rec, signal.SIGCONT)  # a paused probe cannot handle SIGTERM
            stop_process(rec, self.run_dir, timeout_s=10)

    def log(self, server: str) -> str:
        try:
            return Path(self.procs[server].log).read_text(errors="replace")
        except OSError:
            return ""


async def current_holder(conn: asyncpg.Connection, service: str, scope: str = "") -> Holder | None:
    """The unexpired lease holder on the database clock, or None."""
    row = await conn.fetchrow(
        "SELECT holder_server, holder_instance, epoch FROM ha_lease "
        "WHERE service = $1 AND scope = $2 AND expires_at > now()",
        service, scope,
    )
    return Holder(row["holder_server"], row["holder_instance"], row["epoch"]) if row else None


async def wait_holder(
    conn: asyncpg.Connection,
    service: str,
    scope: str = "",
    *,
    timeout_s: float = 30.0,
    newer_than: int = 0,
    not_server: str | None = None,
) -> Holder:
    """Poll until a holder with an epoch above ``newer_than`` (and not on ``not_server``) exists."""
    deadline = time.monotonic() + timeout_s
    while True:
        h = await current_holder(conn, service, scope)
        if h and h.epoch > newer_than and h.server != not_server:
            return h
        if time.monotonic() > deadline:
            raise TimeoutError(f"no new holder of {service}/{scope} within {timeout_s} s (last: {h})")
        await asyncio.sleep(0.02)


async def wait_first_write(
    conn: asyncpg.Connection, service: str, epoch: int, scope: str = "", timeout_s: float = 30.0
) -> datetime:
    """Database time of the first accepted fenced write of ``epoch``."""
    deadline = time.monotonic() + timeout_s
    while True:
        at = await conn.fetchval(
            "SELECT min(written_at) FROM ha_probe_write WHERE service = $1 AND scope = $2 AND epoch = $3",
            service, scope, epoch,
        )
        if at is not None:
            return at  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no fenced write of {service}/{scope} epoch {epoch} within {timeout_s} s")
        await asyncio.sleep(0.02)


async def overlapping_writes(conn: asyncpg.Connection, services: Iterable[str]) -> int:
    """Fenced writes of an older epoch accepted after the first write of a newer one (must be 0)."""
    return int(
        await conn.fetchval(
            """
            WITH firsts AS (
                SELECT service, scope, epoch, min(written_at) AS first_at
                FROM ha_probe_write WHERE service = ANY($1::text[]) GROUP BY 1, 2, 3
            )
            SELECT count(*) FROM ha_probe_write w
            JOIN firsts f ON f.service = w.service AND f.scope = w.scope AND f.epoch > w.epoch
            WHERE w.service = ANY($1::text[]) AND w.written_at > f.first_at
            """,
            list(services),
        )
    )


async def db_now(conn: asyncpg.Connection) -> datetime:
    at: datetime = await conn.fetchval("SELECT clock_timestamp()")
    return at


async def events(conn: asyncpg.Connection, service: str, scope: str = "") -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT at, server, kind, epoch, decision FROM ha_event WHERE service = $1 AND scope = $2 ORDER BY at",
            service, scope,
        )
    )
