"""The Campaign Manager daemon: a RUNNING pool member that runs the jobs assigned to its instance.

Jobs are ``ha_assignment`` rows of service ``campaign_manager``, item ``job:<id>``, owned by this
instance id (a new id per process start: a recovered CM never owns its old jobs again). The daemon learns
of changes by ``NOTIFY ha_assignment`` (migration 0006) and re-reads its assignments on each push, on
every LISTEN reconnect and every ``reconcile_interval_s`` as a safety net. Each (job, epoch) gets a
:class:`JobRunner`; a runner whose job moved or was removed is cancelled. One Rule Engine client and one
media client are shared by the runners; outcomes are routed to the runner of their job only when their
epoch is the one the job is held under — anything else is dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg

from pom_ha.clients.rule_engine import RuleEngineClient
from pom_ha.config import Topology
from pom_ha.ha.assignments import Assignment, assignments
from pom_ha.ha.daemon import DaemonConfig, HADaemon
from pom_ha.media.client import Address, MediaClient
from pom_ha.media.protocol import Outcome
from pom_ha.messaging.runtime import RESULTS_TOPIC
from pom_ha.messaging.stomp import StompClient
from services.campaign_manager.cache_link import CacheLink
from services.campaign_manager.completions import DB_ERRORS
from services.campaign_manager.decisions import classify_outcome, job_of_item
from services.campaign_manager.dial_loop import RunnerOptions
from services.campaign_manager.job_runner import JobRunner
from services.campaign_manager.job_store import JobStore
from services.campaign_manager.listen import AssignmentListener
from services.campaign_manager.metrics import CMMetrics
from services.campaign_manager.outbound import Outbound
from services.campaign_manager.runtime_control import RuntimeControl

if TYPE_CHECKING:
    from pom_ha.cache.client import OperationalCache

SERVICE = "campaign_manager"


@dataclass(frozen=True)
class CMOptions:
    reconcile_interval_s: float = 5.0  # safety net behind NOTIFY ha_assignment
    db_pool_size: int = 10
    # bound of one job-table statement (a hung connection is abandoned after it); batches of a busy job
    # need more than the lease-timed store calls, and the fence is checked in the statement anyway
    db_timeout_s: float = 5.0
    runner: RunnerOptions = field(default_factory=RunnerOptions)
    activemq: bool = True  # runtime changes and published results over ActiveMQ (when the topology has brokers)
    results_destination: str = RESULTS_TOPIC
    cache_publish_interval_s: float = 1.0  # job statistics to the cache service at most this often


@dataclass
class _Held:
    assignment: Assignment
    runner: JobRunner
    task: asyncio.Task[str]


class CampaignManagerDaemon(HADaemon):
    def __init__(self, config: DaemonConfig, *, topology: Topology, media: list[Address],
                 options: CMOptions | None = None, cache: OperationalCache | None = None) -> None:
        super().__init__(config)
        #: the cache service's client (``--cache``); None: no statistics published, no CACHE_REBUILT
        self.cache = cache
        self.cache_link: CacheLink | None = None
        self.topology = topology
        self.media_addresses = media
        self.options = options or CMOptions()
        self.cm_metrics = CMMetrics(self.metrics.registry)
        self.jobs: dict[int, _Held] = {}
        self.ended: dict[int, tuple[int, str]] = {}  # job -> (epoch, why its runner stopped)
        self.drops: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._pool: Any = None
        self.re: RuleEngineClient | None = None
        self.media: MediaClient | None = None
        self.listener: AssignmentListener | None = None
        self.stomp: StompClient | None = None
        self.runtime: RuntimeControl | None = None
        self.outbound: Outbound | None = None
        self._cm_log = self._log.bind(service=SERVICE)

    # ---- lifecycle ---------------------------------------------------------------------------------------
    async def setup(self) -> None:
        t = self.timings.store_timeout_s
        # min_size=0: creating the pool never connects, so a CM starts while PostgreSQL is down and its
        # loops retry; _warm_pool opens a few connections ahead so a takeover does not pay for them
        self._pool = await asyncpg.create_pool(
            self.config.dsn, min_size=0, max_size=self.options.db_pool_size, timeout=t,
            max_inactive_connection_lifetime=60.0,
            server_settings={"application_name": f"pom-ha:{self.config.server}:cm"},
        )
        self.re = RuleEngineClient(self.config.dsn, self.topology, timeout_s=self.options.runner.re_timeout_s)
        await self.re.start()
        self.media = MediaClient(self.media_addresses, on_outcome=self._on_outcome)
        await self.media.start()
        self.listener = AssignmentListener(self.config.dsn, self._on_assignment, self._poke, timeout_s=t)
        self.listener.start()
        await self._start_messaging()
        self.spawn(self._warm_pool(), name="cm-warm-pool")
        self.spawn(self._reconcile(), name="cm-assignments")
        self.spawn(self._observe(), name="cm-observe")
        if self.cache is not None:  # best-effort, beside everything: services/campaign_manager/cache_link.py
            self.cache_link = CacheLink(self.cache, self._pool, self._active_runners, self._cm_log,
                                        publish_interval_s=self.options.cache_publish_interval_s,
                                        db_timeout_s=self.options.db_timeout_s)
            self.spawn(self.cache_link.run(), name="cm-cache")

    def _active_runners(self) -> list[JobRunner]:
        return [h.runner for h in self.jobs.values() if not h.task.done()]

    async def _start_messaging(self) -> None:
        """ActiveMQ (runtime changes in, results out) and the Event SDK publisher: both optional, neither
        ever in the dial path; a CM whose brokers are all down dials as usual."""
        from pom_ha.config.addresses import stomp_addresses

        brokers = stomp_addresses(self.topology) if self.options.activemq else []
        if brokers:
            self.stomp = StompClient(brokers, name=f"cm-{self.config.server}-{self.config.instance_id}")
            self.runtime = RuntimeControl(self.stomp, server=self.config.server, instance=self.config.instance_id,
                                          runner_of=self._runner_of, log=self._cm_log)
            await self.runtime.start()
            await self.stomp.start()
        self.outbound = Outbound(topology=self.topology, server=self.config.server, instance=self.config.instance_id,
                                 pool=self._pool, log=self._cm_log, stomp=self.stomp,
                                 results_destination=self.options.results_destination)
        self.outbound.start()

    def _runner_of(self, job: int) -> JobRunner | None:
        held = self.jobs.get(job)
        return held.runner if held is not None and not held.task.done() and held.runner.active else None

    async def teardown(self) -> None:
        if self.listener is not None:
            await self.listener.close()
        if self.outbound is not None:
            with contextlib.suppress(Exception):
                await self.outbound.stop()
        if self.stomp is not None:
            with contextlib.suppress(Exception):
                await self.stomp.close()
        for client in (self.re, self.media, self.cache):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()
        if self._pool is not None:
            self._pool.terminate()
        self._cm_log.info("campaign manager counters", **dict(self.cm_metrics.tally), drops=dict(self.drops))

    def member_load(self, service: str) -> int:
        return sum(1 for h in self.jobs.values() if h.runner.active)

    # ---- assignments -------------------------------------------------------------------------------------
    def _poke(self) -> None:
        self._wake.set()

    def _on_assignment(self, payload: dict[str, Any]) -> None:
        me = self.config.instance_id
        if payload.get("service") == SERVICE and me in (payload.get("owner"), payload.get("previous")):
            self._wake.set()

    async def _reconcile(self) -> None:
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.options.reconcile_interval_s):
                        await self._wake.wait()
                self._wake.clear()
                try:
                    async with asyncio.timeout(self.options.db_timeout_s), self._pool.acquire() as conn:
                        mine = await assignments(conn, SERVICE, self.config.instance_id)
                except DB_ERRORS as exc:
                    self._cm_log.warning("cannot read job assignments", error=f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.5)
                    self._wake.set()
                    continue
                await self._apply(mine)
        finally:
            held = list(self.jobs.values())
            for h in held:
                h.task.cancel()
            await asyncio.gather(*(h.task for h in held), return_exceptions=True)

    async def _apply(self, mine: list[Assignment]) -> None:
        wanted = {job: a for a in mine if (job := job_of_item(a.item)) is not None}
        for job, held in list(self.jobs.items()):
            a = wanted.get(job)
            if a is None or a.epoch != held.assignment.epoch or held.task.done():
                if not held.task.done():
                    held.task.cancel()
                    self._cm_log.info("job moved away, runner stopped", job=job, epoch=held.assignment.epoch,
                                      now=None if a is None else a.epoch)
                why = await self._reap(job, held)
                if why is not None:
                    self.ended[job] = (held.assignment.epoch, why)
                del self.jobs[job]
        self.ended = {job: e for job, e in self.ended.items() if job in wanted}
        for job, a in wanted.items():
            if job in self.jobs or self.ended.get(job, (0, ""))[0] == a.epoch:
                continue
            self._start_runner(job, a)
        self._members_dirty.set()

    async def _reap(self, job: int, held: _Held) -> str | None:
        """Wait for a runner that ended or was cancelled; its reason, or None if it must be started again."""
        try:
            why = await held.task
        except asyncio.CancelledError:
            return None
        except Exception:
            self._cm_log.exception("job runner crashed, starting it again", job=job, epoch=held.assignment.epoch)
            await asyncio.sleep(0.5)
            return None
        self._cm_log.info("job runner stopped", job=job, epoch=held.assignment.epoch, reason=why)
        return why

    def _start_runner(self, job: int, a: Assignment) -> None:
        assert self.re is not None and self.media is not None
        store = JobStore(self._pool, a, job, self.config.server, timeout_s=self.options.db_timeout_s)
        runner = JobRunner(store, rule_engine=self.re, media=self.media, metrics=self.cm_metrics,
                           log=self._cm_log, options=self.options.runner, outbound=self.outbound)
        runner.cache_link = self.cache_link
        task = asyncio.create_task(runner.run(), name=f"job-{job}")
        task.add_done_callback(lambda _t: self._wake.set())
        self.jobs[job] = _Held(a, runner, task)
        self._cm_log.info("job assigned, runner started", job=job, epoch=a.epoch)

    # ---- outcomes ----------------------------------------------------------------------------------------
    async def _on_outcome(self, outcome: Outcome) -> None:
        held = {job: h.assignment.epoch for job, h in self.jobs.items() if not h.task.done()}
        kind = classify_outcome(outcome.job, outcome.epoch, held)
        if kind == "deliver":
            self.jobs[int(outcome.job)].runner.offer(outcome)
            return
        self.drops[kind] += 1
        self.cm_metrics.outcomes.labels(kind).inc()
        self.cm_metrics.count(f"outcomes_{kind}")
        if self.drops[kind] <= 5 or self.drops[kind] % 1000 == 0:
            self._cm_log.info("media outcome dropped", reason=kind, job=outcome.job, epoch=outcome.epoch,
                              held_epoch=held.get(int(outcome.job)) if outcome.job.isdigit() else None,
                              attempt=outcome.attempt_id, dropped=self.drops[kind])

    async def _warm_pool(self) -> None:
        n = min(4, self.options.db_pool_size)
        results = await asyncio.gather(*(self._pool.fetchval("SELECT pg_sleep(0.05)") for _ in range(n)),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            self._cm_log.warning("cannot open database connections yet", error=str(failed[0]))

    async def _observe(self) -> None:
        """Gauges that mirror the clients' own counters; a stale Rule Engine reply is logged when seen."""
        seen = 0
        while True:
            await asyncio.sleep(0.5)
            self.cm_metrics.jobs_active.set(self.member_load(SERVICE))
            stale = self.re.stale_replies if self.re is not None else 0
            self.cm_metrics.re_stale_replies.set(stale)
            if stale > seen:
                self._cm_log.warning("stale Rule Engine replies dropped", count=stale - seen, total=stale)
                seen = stale

    # ---- /health -----------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        body = super().health()
        body[SERVICE] = {
            "jobs": {str(job): {"epoch": h.assignment.epoch, "state": h.runner.state.value if h.runner.state else "?",
                                "in_flight": len(h.runner.in_flight), **h.runner.agent_info()}
                     for job, h in self.jobs.items()},
            "counters": dict(self.cm_metrics.tally),
            "rule_engine": {
                "master": self.re.master.server if self.re is not None and self.re.master else None,
                "connected": self.re is not None and self.re.connected.is_set(),
                "stale_replies": self.re.stale_replies if self.re is not None else 0,
                "reconnects": self.re.reconnects if self.re is not None else 0,
            },
            "media": {"connected": self.media is not None and self.media.connected_to is not None,
                      "in_flight": self.media.in_flight if self.media is not None else 0},
            "outbound": self.outbound.info() if self.outbound is not None else None,
            "cache": self.cache_link.info() if self.cache_link is not None else None,
            "runtime_changes": None if self.runtime is None else {
                "applied": self.runtime.applied, "refused": self.runtime.refused,
                "duplicates": self.runtime.duplicates},
        }
        return body
