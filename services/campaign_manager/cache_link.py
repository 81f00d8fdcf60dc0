"""The Campaign Manager's side of the cache service (docs/cache-service.md): best-effort, never in the dial path.

- **Statistics.** A runner calls :meth:`CacheLink.touch` after each progress poll (``_watch_progress``) and
  after each state change it made. One background task per CM publishes the touched jobs, coalesced: one
  read of their counters from PostgreSQL (:func:`pom_ha.cache.load_jobs`, the query the rebuild uses, so
  the cache shows exactly what the tables hold) and one ``put_job`` per job, at most every
  ``publish_interval_s`` (and the database read never takes more than a third of the time: the pause after a
  round is at least twice what the read took). A :class:`StatisticsFrozen` is logged once per outage
  ("statistics frozen") and once when publishing works again; the jobs stay marked and are published at the
  next round. Dialing never waits for any of it.
- **Whole cache lost.** The same task reads ``cache.generation()`` every ``generation_poll_s``. When it
  changes (or a first generation appears that was written after this CM started: the cache was rebuilt while
  it ran), every job this CM runs takes ``JobEvent.CACHE_REBUILT`` in PostgreSQL, through its runner's
  fenced compare-and-set: a Running job goes Running -> Filter in Progress, and the runner takes it back to
  Running at once on the takeover's fast path (stuck contacts put back, the list re-read beside the dial
  loop); a Paused job keeps ``refilter`` (the runner's flag) and is not published while it stays Paused (the
  cache keeps the rebuild's entry: Paused, ``refilter``, no statistics); on resume it passes through Filter in
  Progress and its first publication (a fresh read of its counters, ``refresh_job``'s query) brings its
  statistics back. Other states do not change (the domain's table).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

from pom_ha.cache import CacheUnavailable, OperationalCache, StatisticsFrozen, load_jobs
from pom_ha.domain.jobs import InvalidTransition, JobEvent, JobState, JobStatus, transition
from services.campaign_manager.completions import DB_ERRORS
from services.campaign_manager.job_store import FenceLost, JobStore


class JobRunner(Protocol):
    """What the link needs of a job's runner (services/campaign_manager/job_runner.py)."""

    job_id: int
    store: JobStore

    @property
    def active(self) -> bool: ...

    def mark_refilter(self, cause: str | None, *, running: bool = False) -> None: ...

    async def set_state(self, from_state: Any, to_state: Any, *, reason: str | None = None) -> bool: ...

REBUILT_REASON = "cache rebuilt"


class CacheLink:
    """One per Campaign Manager: publishes its jobs' statistics and watches the cache generation."""

    def __init__(self, cache: OperationalCache, pool: Any, runners: Callable[[], Sequence[JobRunner]], log: Any, *,
                 publish_interval_s: float = 1.0, generation_poll_s: float = 1.0, db_timeout_s: float = 5.0) -> None:
        self.cache = cache
        self.pool = pool
        self.runners = runners
        self.log = log.bind(component="cache-link")
        self.publish_interval_s = publish_interval_s
        self.generation_poll_s = generation_poll_s
        self.db_timeout_s = db_timeout_s
        self.started_ms = int(time.time() * 1000)
        self._dirty: set[int] = set()
        self._held: set[int] = set()  # Paused jobs after a rebuild: no statistics until they resume
        self._wake = asyncio.Event()
        # what /health shows
        self.published = 0  # job entries written
        self.refused = 0  # job entries the cache refused (StatisticsFrozen)
        self.outages = 0  # times publication went from working to frozen
        self.frozen_since: float | None = None  # wall clock of the first refusal of the current outage
        self.last_error: str | None = None
        self.generation: int | None = None
        self.rebuilds_seen = 0
        self.rebuilt_applied: list[dict[str, Any]] = []  # the last few CACHE_REBUILT applications

    # ---- called by the runners (never waits) ----------------------------------------------------------------
    def touch(self, job_id: int) -> None:
        self._dirty.add(job_id)
        self._wake.set()

    # ---- the background task -------------------------------------------------------------------------------
    async def run(self) -> None:
        await asyncio.gather(self._publish_loop(), self._generation_loop())

    async def _publish_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            read_s = await self.publish_once()
            # the database read is what costs (a scan of the jobs' contacts and attempts): at most a third of the
            # time goes to it; a slow cache (a node starting) does not slow the next round down
            await asyncio.sleep(max(self.publish_interval_s, 2 * read_s))

    async def publish_once(self) -> float:
        """Publish every touched job: counters read from PostgreSQL, one ``put_job`` each. Returns the
        seconds the database read took."""
        ids = sorted(self._dirty)
        self._dirty.clear()
        if not ids:
            return 0.0
        t0 = time.monotonic()
        try:
            entries = await load_jobs(self.pool, ids, timeout_s=self.db_timeout_s)
        except DB_ERRORS as exc:
            self._dirty.update(ids)  # next round
            self.log.debug("cannot read job counters for the cache", error=f"{type(exc).__name__}: {exc}")
            return time.monotonic() - t0
        read_s = time.monotonic() - t0
        for i, entry in enumerate(entries):
            if entry.job_id in self._held:
                if entry.state == JobState.PAUSED.value:
                    continue  # the rebuild's entry (Paused, refilter, no statistics) stays until the resume
                self._held.discard(entry.job_id)
            try:
                await self.cache.put_job(replace(entry, source="live"))
            except StatisticsFrozen as exc:
                self.refused += 1
                self._dirty.update(e.job_id for e in entries[i:])  # tried again at the next round
                self._frozen(exc)
                return read_s
            self.published += 1
        self._works()
        return read_s

    def _frozen(self, exc: StatisticsFrozen) -> None:
        self.last_error = str(exc)
        if self.frozen_since is None:
            self.frozen_since = time.time()
            self.outages += 1
            self.log.warning("statistics frozen: the cache service does not take job statistics; dialing goes on",
                             error=str(exc), rebuilding=exc.rebuilding)

    def _works(self) -> None:
        if self.frozen_since is not None:
            self.log.info("statistics publication works again", frozen_s=round(time.time() - self.frozen_since, 1),
                          refused=self.refused)
            self.frozen_since = None

    async def _generation_loop(self) -> None:
        while True:
            with contextlib.suppress(CacheUnavailable):  # down: the generation is read again next poll
                await self.check_generation()
            await asyncio.sleep(self.generation_poll_s)

    async def check_generation(self) -> bool:
        """Read the generation; True when it shows the whole cache was rebuilt (and CACHE_REBUILT was applied)."""
        gen = await self.cache.generation()
        if gen is None:  # lost and not rebuilt yet: the next generation is a rebuild
            return False
        known, self.generation = self.generation, gen
        if known == gen or (known is None and gen <= self.started_ms):
            return False
        self.rebuilds_seen += 1
        runners = [r for r in self.runners() if r.active]
        self.log.warning("the whole cache was rebuilt: jobs take CACHE_REBUILT", generation=gen, previous=known,
                         jobs=[r.job_id for r in runners])
        for runner in runners:
            try:
                done = await apply_cache_rebuilt(runner)
            except (FenceLost, *DB_ERRORS) as exc:
                done = f"not applied: {type(exc).__name__}: {exc}"
            if done.startswith("Paused"):
                self._held.add(runner.job_id)
            self.rebuilt_applied = [*self.rebuilt_applied[-9:], {"job": runner.job_id, "generation": gen,
                                                                 "result": done}]
            self.log.info("cache rebuilt: job re-filtered", job=runner.job_id, result=done)
        # a Running job's state changes publish it (the runner touches); a Paused one stays as the rebuild wrote
        # it until it resumes; jobs refused during the outage are still marked and go with the next round
        self._wake.set()
        return True

    def info(self) -> dict[str, Any]:
        return {
            "generation": self.generation, "frozen": self.frozen_since is not None, "published": self.published,
            "refused": self.refused, "outages": self.outages, "last_error": self.last_error,
            "rebuilds_seen": self.rebuilds_seen, "rebuilt_applied": self.rebuilt_applied,
            "pending": len(self._dirty), "client": vars(self.cache.stats).copy(),
        }


async def apply_cache_rebuilt(runner: JobRunner) -> str:
    """``JobEvent.CACHE_REBUILT`` on the runner's job in PostgreSQL, fenced by its assignment (the runner's
    compare-and-set). Returns what was done."""
    current = await runner.store.state()
    if current is None:
        return "job deleted"
    state, ending = current
    try:
        status = JobStatus(JobState(state), ending=JobState(ending or "Stopped")) if state == "Stopping" \
            else JobStatus(JobState(state))
        after = transition(status, JobEvent.CACHE_REBUILT)
    except (InvalidTransition, ValueError) as exc:
        return f"unchanged: {exc}"
    if status.state is JobState.PAUSED:
        # the job's view is rebuilt when it resumes: Running -> Filter in Progress -> Running (the runner's flag)
        runner.mark_refilter(REBUILT_REASON)
        return "Paused: filtered again on resume"
    if status.state is JobState.RUNNING and after.state is JobState.FILTER_IN_PROGRESS:
        runner.mark_refilter(REBUILT_REASON, running=True)
        if await runner.set_state("Running", "Filter in Progress", reason=f"{REBUILT_REASON}: filtering again"):
            return "Running -> Filter in Progress"
        runner.mark_refilter(None)
        return "unchanged: the job left Running meanwhile"
    return f"unchanged: {state}"
