"""The Rule Engine daemon: an HADaemon holding ``SingletonRole("rule_engine")`` that serves while master."""

from __future__ import annotations

import asyncio

from pom_ha.ha.daemon import DaemonConfig, HADaemon
from pom_ha.ha.election import Elector
from pom_ha.ha.term import MasterTerm
from services.rule_engine.rules_source import RuleConfigSource
from services.rule_engine.server import RuleServer, ServeCounts

SERVICE = "rule_engine"


class RuleEngineDaemon(HADaemon):
    def __init__(
        self, config: DaemonConfig, *, port: int, source: RuleConfigSource | None = None,
        summary_interval_s: float = 10.0,
    ) -> None:
        super().__init__(config)
        self.port = port
        self.source = source or RuleConfigSource(config.dsn, timeout_s=config.timings.store_timeout_s)
        self.counts = ServeCounts()
        self.summary_interval_s = summary_interval_s
        self._server: RuleServer | None = None

    async def setup(self) -> None:
        # dormants keep the rules loaded too, so a new master answers at once
        self.spawn(self.source.run(), name="rule-config")
        self.spawn(self._summaries(), name="rule-engine-summaries")

    async def run_master(self, elector: Elector, term: MasterTerm) -> None:
        term_log = self._log.bind(service=term.service, epoch=term.epoch)
        book = await self.source.wait_loaded()
        server = RuleServer(term, self.source.rules, is_master=lambda: elector.is_master,
                            wait_master=elector.wait_master, counts=self.counts, rules_for=self.source.rules_for)
        self._server = server
        try:
            port = await server.start(self.config.address, self.port)
            term_log.info("rule engine serving", address=f"{self.config.address}:{port}", rules_version=book.version)
            await term.ended.wait()
        finally:
            server.close()  # runs in the same loop step as the term's end: listener and clients gone at once
            self._server = None
            term_log.info("rule engine stopped serving", reason=term.end_reason)

    def member_load(self, service: str) -> int:
        return self._server.connections if self._server is not None else 0

    async def teardown(self) -> None:
        self._log_counts()

    async def _summaries(self) -> None:
        last = ServeCounts()
        while True:
            await asyncio.sleep(self.summary_interval_s)
            if self.counts != last:
                self._log_counts()
                last = ServeCounts(**vars(self.counts))

    def _log_counts(self) -> None:
        c = self.counts
        self._log.info("rule engine requests", connections=c.connections, evaluations=c.evaluations,
                       allowed=c.allowed, refused=c.refused, errors=c.errors)
