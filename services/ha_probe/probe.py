"""The probe daemon: while master of a role scope it inserts one fenced row every ``write_interval_ms``."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import asyncpg

from pom_ha.ha.daemon import DaemonConfig, HADaemon
from pom_ha.ha.election import Elector
from pom_ha.ha.term import MasterTerm

SQL_PROBE_WRITE = (
    "INSERT INTO ha_probe_write (service, scope, server, instance_id, epoch) "
    "SELECT $1, $2, $3, $4, $5 WHERE {fence}"
)


@dataclass
class WriteCounts:
    accepted: int = 0
    rejected: int = 0
    errors: int = 0


class ProbeDaemon(HADaemon):
    def __init__(self, config: DaemonConfig, *, write_interval_ms: int = 20, summary_interval_s: float = 5.0) -> None:
        super().__init__(config)
        self.write_interval_s = write_interval_ms / 1000
        self.summary_interval_s = summary_interval_s
        self.counts = WriteCounts()

    async def setup(self) -> None:
        self.spawn(self._summaries(), name="probe-summaries")

    async def run_master(self, elector: Elector, term: MasterTerm) -> None:
        first_at: float | None = None
        t0 = time.monotonic()
        term_log = self._log.bind(service=term.service, scope=term.scope, epoch=term.epoch)
        while True:
            try:
                result = await self.fenced_execute(
                    term, SQL_PROBE_WRITE, term.service, term.scope, self.config.server, self.config.instance_id,
                    term.epoch,
                )
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self.counts.errors += 1
                if self.counts.errors == 1 or self.counts.errors % 100 == 0:
                    term_log.warning("probe write failed", error=f"{type(exc).__name__}: {exc}",
                                     errors=self.counts.errors)
            else:
                if result.fence_held:
                    self.counts.accepted += 1
                    if first_at is None:
                        first_at = time.monotonic()
                        term_log.info("first fenced write accepted",
                                      after_promotion_ms=round((first_at - t0) * 1000, 1))
                else:
                    self.counts.rejected += 1
                    term_log.warning("fenced write rejected", rejected=self.counts.rejected)
            await asyncio.sleep(self.write_interval_s)

    async def teardown(self) -> None:
        self._log.info("probe writes", accepted=self.counts.accepted, rejected=self.counts.rejected,
                       errors=self.counts.errors)

    async def _summaries(self) -> None:
        last = WriteCounts()
        while True:
            await asyncio.sleep(self.summary_interval_s)
            now = WriteCounts(self.counts.accepted, self.counts.rejected, self.counts.errors)
            if now != last:
                self._log.info("probe writes", accepted=now.accepted, rejected=now.rejected, errors=now.errors)
            last = now
