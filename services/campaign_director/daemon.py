"""The Campaign Director daemon: Common CD (``SingletonRole("campaign_director")``) + Zone Directors
(``ZoneRole("zone_director", zone)`` per zone) in one process.

While master of the singleton it runs the Common CD's duties, each fenced by the lease epoch:

======================  ==========================================================================
duty                    module
======================  ==========================================================================
first fenced action     an ``ha_event`` row ``first_fenced_action`` (the failover benchmark reads it)
allocation              :mod:`.jobs` — least busy RUNNING CM, reallocation of dead CMs' jobs, unassign
operator commands       :mod:`.jobs` — pause / resume / stop requested while up or down
finish criteria         :mod:`.jobs` — end time / goals / all contacts done -> Stopping (Completed)
schedules and purges    :mod:`.schedules` — missed schedules fire once, late; cut-off purges abandoned
data imports            :mod:`.schedules` + :mod:`pom_ha.campaign.imports` — resumed from the checkpoint
exports                 :mod:`.exporter` — resumed from the last chunk on disk
nuisance rate, alarms   :mod:`.nuisance`
trend samples           :mod:`.trends` — progress of active jobs for the monitor's charts
post-processing         :mod:`.postprocess` — one result summary per ended job, resumed after failover
======================  ==========================================================================

Zone leases: see :mod:`.zones` (allocation to the least busy CD, taking zones back after a failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from pom_ha.config import Topology
from pom_ha.domain.attempts import SYSTEM_CODES
from pom_ha.events import EventPublisher
from pom_ha.ha.daemon import DaemonConfig, HADaemon
from pom_ha.ha.election import Elector
from pom_ha.ha.roles import RoleState, ZoneRole
from pom_ha.ha.store import StatusStoreError
from pom_ha.ha.term import MasterTerm
from services.campaign_director.context import DB_ERRORS, TermContext
from services.campaign_director.exporter import ExportDuties
from services.campaign_director.jobs import JobDuties
from services.campaign_director.nuisance import NuisanceDuties
from services.campaign_director.postprocess import PostProcessing
from services.campaign_director.schedules import ScheduleDuties
from services.campaign_director.settings import CDSettings
from services.campaign_director.trends import TrendDuties
from services.campaign_director.zones import ZONE_SERVICE, run_zone_director

if TYPE_CHECKING:
    from pom_ha.cache.client import OperationalCache

SERVICE = "campaign_director"


class CampaignDirectorDaemon(HADaemon):
    def __init__(self, config: DaemonConfig, *, settings: CDSettings | None = None,
                 topology: Topology | None = None, cache: OperationalCache | None = None) -> None:
        super().__init__(config)
        #: the cache service's client; None: job starts are not gated by the cache (``--cache off``)
        self.cache = cache
        self.settings = settings or CDSettings()
        self.zone_homes: dict[str, str] = {}
        self.topology = topology  # for the Event SDK brokers; None: no events

    # the term's sinks (pom_ha.ha.ports): the duties read them from their context, the daemon fills them
    @property
    def cache(self) -> OperationalCache | None:
        cache: OperationalCache | None = self.sinks.cache
        return cache

    @cache.setter
    def cache(self, value: OperationalCache | None) -> None:
        self.sinks.cache = value

    @property
    def events(self) -> EventPublisher | None:
        events: EventPublisher | None = self.sinks.events
        return events

    @events.setter
    def events(self, value: EventPublisher | None) -> None:
        self.sinks.events = value

    @property
    def events_failed(self) -> int:
        return self.sinks.events_failed

    @property
    def log(self) -> Any:
        return self._log

    async def setup(self) -> None:
        # open the app pool now: a new master's first fenced action must not wait for a connection
        with contextlib.suppress(*DB_ERRORS):
            await (await self.app_db()).fetchval("SELECT 1")
        self.store.subscribe(self._claim_home_zone_now)
        self.spawn(self._refresh_zone_homes(), name="zone-homes")
        if self.topology is not None and self.topology.servers_running("kafka"):
            self.spawn(self._open_events(), name="cd-events")

    async def _open_events(self) -> None:
        from pom_ha.events.daemon_publisher import open_event_publisher

        try:
            self.events = await open_event_publisher(self.topology, await self.app_db(), service=SERVICE,
                                                     server=self.config.server, instance=self.config.instance_id,
                                                     log=self._log) if self.topology is not None else None
        except Exception:  # events are optional: never stop the director for them
            self._log.exception("event publisher not started; JOB events are not published")

    async def teardown(self) -> None:
        if self.events is not None:
            with contextlib.suppress(Exception):
                await self.events.stop(3.0)
        if self.cache is not None:
            with contextlib.suppress(Exception):
                await self.cache.close()
        await super().teardown()

    async def run_master(self, elector: Elector, term: MasterTerm) -> None:
        ctx = TermContext(term, self.ports, self.settings)
        if term.service == SERVICE:
            await run_common_director(ctx)
        else:
            zone = term.scope
            await run_zone_director(ctx, self.zone_homes, lambda home: self.spawn(
                self.hand_back(elector, zone, home), name=f"zone-handback-{zone}"))

    def member_load(self, service: str) -> int:
        if service == ZONE_SERVICE:
            return sum(1 for e in self.electors if e.service == ZONE_SERVICE and e.is_master)
        return 0

    async def pause_elector(self, elector: Elector) -> None:
        """Stop ``elector``'s cycle task so the caller may drive it (release, stop) without two flushers of its
        event outbox; the task is taken out of supervision first, so its cancellation is not a crash."""
        for task in list(self._tasks):
            if task.get_name() == f"elector-{elector.role.label}" and not task.done():
                self._tasks.discard(task)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def hand_back(self, elector: Elector, zone: str, home: str) -> None:
        """Release the zone and keep this elector out until ``home`` holds it (or the hand-back times out)."""
        settings = self.settings
        await self.pause_elector(elector)
        await elector.stop(f"handing zone {zone} back to its home {home}")
        deadline = time.monotonic() + settings.zone_handback_timeout_ms / 1000
        outcome = "timed out, competing for the zone again"
        while time.monotonic() < deadline:
            try:
                lease = await self.store.read(ZONE_SERVICE, zone, timeout_s=self.timings.store_timeout_s)
            except StatusStoreError:
                lease = None
            if lease is not None and not lease.expired and lease.holder_server == home:
                outcome = f"{home} holds it (epoch {lease.epoch})"
                break
            await asyncio.sleep(settings.zone_check_interval_ms / 1000)
        self.log.info("zone hand-back finished", zone=zone, home=home, outcome=outcome)
        if self.state != "running":
            return
        elector.state = RoleState.DORMANT  # rejoin as a dormant for the zone (e.g. if its home fails again)
        self.spawn(elector.run(), name=f"elector-{elector.role.label}")

    # ---- home zones are claimed without the spread delay ------------------------------------------------
    def _claim_home_zone_now(self, service: str, scope: str) -> None:
        """Lease watcher: a zone whose home is this server became free (e.g. handed back): claim it at once
        instead of leaving it to less busy daemons (the spread would make a busy home wait)."""
        if service not in (ZONE_SERVICE, "*"):
            return
        for e in self.electors:
            if (isinstance(e.role, ZoneRole) and (scope in ("*", e.scope)) and e.state is RoleState.DORMANT
                    and self.zone_homes.get(e.scope) == self.config.server):
                e.claim_now()

    async def _refresh_zone_homes(self) -> None:
        while True:
            with contextlib.suppress(*DB_ERRORS):
                pool = await self.app_db()
                rows = await pool.fetch("SELECT zone, home_server FROM cd_zone_home")
                self.zone_homes.update({r["zone"]: r["home_server"] for r in rows})
            await asyncio.sleep(1.0)


async def run_common_director(ctx: TermContext) -> None:
    """The Common CD's work for one term: its first fenced action, then every duty on its own period."""
    s = ctx.settings
    while True:
        try:
            decision = f"Common CD active on {ctx.server} (epoch {ctx.epoch}): first fenced action"
            started_ms = round((time.monotonic() - ctx.started_mono) * 1000, 1)
            if not await ctx.event("first_fenced_action", decision, {"after_master_work_started_ms": started_ms}):
                ctx.log.warning("first fenced action refused: the lease moved on")
                await ctx.term.ended.wait()
                return
            ctx.started_db = await ctx.db_now()
            ctx.log.info("first fenced action accepted",
                         after_master_work_started_ms=round((time.monotonic() - ctx.started_mono) * 1000, 1))
            break
        except DB_ERRORS as exc:
            ctx.log.warning("first fenced action failed, retrying", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.05)
    jobs = JobDuties(ctx)
    schedules = ScheduleDuties(ctx)
    exports = ExportDuties(ctx)
    nuisance = NuisanceDuties(ctx, jobs)
    post = PostProcessing(ctx)
    trends = TrendDuties(ctx, [name for name, code in SYSTEM_CODES.items() if code.is_live_answer])

    async def job_round() -> None:
        await jobs.apply_commands()
        await jobs.allocate_round()

    abandoned = False

    async def purge_round() -> None:
        nonlocal abandoned
        if not abandoned:  # before any purge fires: a purge cut off by the previous master is not resumed
            await schedules.abandon_cut_off_purges()
            abandoned = True
        await schedules.fire_due("purge")

    ctx.every("jobs", s.allocation_interval_ms / 1000, job_round)
    ctx.every("campaign-starts", s.schedule_interval_ms / 1000, lambda: schedules.fire_due("campaign_start"))
    ctx.every("purges", s.schedule_interval_ms / 1000, purge_round)
    ctx.every("finish-criteria", s.finish_check_interval_ms / 1000, jobs.check_finish)
    ctx.every("nuisance", s.nuisance_interval_ms / 1000, nuisance.compute)
    ctx.every("trends", s.trend_interval_ms / 1000, trends.sample)
    ctx.every("post-processing", s.finish_check_interval_ms / 1000, post.run)
    ctx.every("imports", s.schedule_interval_ms / 1000, schedules.run_imports)
    ctx.every("exports", s.schedule_interval_ms / 1000, exports.run_exports)
    await ctx.term.ended.wait()
