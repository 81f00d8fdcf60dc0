"""The dial loop of a Running job: one skeleton, two strategies (unattended here, agent-based in
:mod:`.agent_dialing`).

Every tick: sweep attempts written but never dialed, re-read the job's state, end the job once every contact is
done (:meth:`DialLoop.housekeeping`); then the strategy says whether it may dial now (:meth:`DialLoop.ready`) and
how many (:meth:`DialLoop.permits`); the due contacts are judged by the Rule Engine and the allowed ones get
their attempt row (fenced) before their DIAL leaves (:meth:`DialLoop.place`). While no Rule Engine master
answers, dialing pauses; while no media platform is connected (or it refused a DIAL as down), nothing new is
dialed.

A strategy sees its job through :class:`JobPorts` (built by the job's lifecycle, :mod:`.job_runner`), never the
runner itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pom_ha.clients.rule_engine import RuleEngineClient, RuleEngineRefused, RuleEngineUnavailable, Verdict
from pom_ha.domain.attempts import CompletionCode, ContactHistory
from pom_ha.domain.campaigns import CampaignDefinition
from pom_ha.domain.jobs import JobState
from pom_ha.domain.pacing import TimeBasedPacer
from pom_ha.domain.stats import JobStats
from pom_ha.ha.term import MasterTerm
from pom_ha.media.client import MediaClient, MediaUnavailable
from pom_ha.media.protocol import Accepted, Dial
from services.campaign_manager.completions import DB_ERRORS, Completion, CompletionWriter, InFlight
from services.campaign_manager.decisions import (
    ContactUpdate,
    attempt_id,
    media_scope,
    refused_dial_retry,
    verdict_update,
)
from services.campaign_manager.job_store import DueContact, JobStore, NewAttempt, Progress
from services.campaign_manager.metrics import CMMetrics
from services.campaign_manager.outbound import Outbound


@dataclass(frozen=True)
class RunnerOptions:
    state_poll_s: float = 0.25  # how often a running job's state is re-read (pause/stop by the Director)
    progress_poll_s: float = 1.0  # how often the job's contact counts are re-read
    re_timeout_s: float = 1.0  # one Rule Engine evaluation; past it dialing pauses
    attempt_timeout_s: float = 600.0  # an attempt without outcome this long is recorded NETWORK_FAILURE
    max_batch: int = 200
    sweep_s: float = 5.0  # how often attempts written but never dialed (commit not confirmed) are looked for


class JobPorts:
    """What a dial strategy may use of its job: the store (fenced by the assignment), the clients, the outcome
    writer, the attempts in flight, the job's task group, and the lifecycle's few hooks."""

    def __init__(self, store: JobStore, *, rule_engine: RuleEngineClient, media: MediaClient, metrics: CMMetrics,
                 log: Any, opts: RunnerOptions, outbound: Outbound | None, tasks: MasterTerm,
                 check: Callable[[], None], set_state: Callable[..., Awaitable[bool]],
                 list_read: Callable[[], bool]) -> None:
        self.store, self.re, self.media, self.metrics, self.log = store, rule_engine, media, metrics, log
        self.opts, self.outbound, self.tasks = opts, outbound, tasks
        self.job_id = store.job_id
        self.epoch = store.fence.epoch
        self.check = check  # raises FenceLost (the job moved) or RuntimeError (a task of the job crashed)
        self.set_state = set_state  # the lifecycle's compare-and-set (publishes the JOB event)
        self.list_read = list_read  # False while the takeover's re-read of the list still runs
        self.in_flight = InFlight()
        self.writer: CompletionWriter | None = None  # set by the lifecycle's takeover
        self.org = "Default"
        self.list_id = 0
        self.pacing_rate: float | None = None  # runtime override (calls per second), from jobs.pacing_rate
        self.cache_link: Any = None  # statistics to the cache service (.cache_link.CacheLink; never waited for)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        return self.tasks.create_task(coro, name=name)

    def idle(self) -> bool:
        """No outcome waits to be recorded and no re-read of the list is still running."""
        return self.list_read() and self.writer is not None and self.writer.idle

    def record(self, contact: str, attempt_no: int, code: CompletionCode, duration_ms: int | None = 0, *,
               retry_at: datetime | None = None) -> None:
        assert self.writer is not None
        self.writer.offer(Completion(contact, attempt_no, code, duration_ms, retry_at=retry_at))

    def not_dialed(self, a: NewAttempt) -> None:
        """``a`` was never dialed: recorded CANCELLED, its contact due again now."""
        self.record(a.contact_id, a.attempt_no, CompletionCode.CANCELLED, 0, retry_at=datetime.now(UTC))


@dataclass
class _LoopTimers:
    """When a dial loop next sweeps overdue attempts and next re-reads its job's state (monotonic seconds)."""

    next_state: float = 0.0
    next_sweep: float = 0.0


class DialLoop:
    """The skeleton every pacing kind shares (:meth:`run`), and the unattended (agentless) strategy."""

    tick_s = 0.1

    def __init__(self, job: JobPorts) -> None:
        self.job = job
        self.log = job.log
        self.progress: Progress | None = None  # the latest contact counts, read beside the dial loop
        self.re_paused = False
        self._media_wait_until = 0.0
        self._media_lost = False
        self._pacer: TimeBasedPacer | None = None
        self._definition: CampaignDefinition | None = None

    # ---- the strategy's part (unattended here) -------------------------------------------------------------
    async def prepare(self, definition: CampaignDefinition) -> None:
        self._definition = definition
        self._repace()

    def _repace(self) -> None:
        assert self._definition is not None
        rate = self.job.pacing_rate
        self._pacer = self._definition.time_pacer() if rate is None else TimeBasedPacer(
            calls_per_second=rate, max_in_flight=self._definition.pacing.max_in_flight)
        self.tick_s = min(0.1, max(0.01, self._pacer.burst / self._pacer.rate / 2))

    async def ready(self, now: float) -> bool:
        assert self._pacer is not None
        if self.job.pacing_rate is not None and self.job.pacing_rate != self._pacer.rate:
            self._repace()  # a runtime change: the new rate from this tick on
            self.log.info("pacing rate changed", calls_per_second=self._pacer.rate)
        return await self.media_ready(now)

    def permits(self, now: float, stats: JobStats) -> int:
        assert self._pacer is not None
        return self._pacer.permits(now, len(self.job.in_flight), stats)

    def refund(self, n: int) -> None:
        assert self._pacer is not None
        self._pacer.refund(n)

    async def started(self, a: NewAttempt) -> None:
        """An attempt row is written: its DIAL leaves now."""
        self.job.spawn(self.send(a), f"dial-{a.call_id}")

    def take_outcome(self, completion: Completion) -> bool:
        """True when the strategy keeps an outcome for itself (an agent must take it); else it goes to the writer."""
        return False

    def recorded(self, done: list[tuple[str, int, str, int | None]]) -> None:
        """Outcomes recorded by the writer (a strategy's pacer may learn from them)."""

    def info(self) -> dict[str, Any]:
        """For /health: what the strategy adds to the job's entry."""
        return {}

    def close(self) -> None:
        """The runner stops: undo this loop's gauges."""
        if self.re_paused:
            self.re_paused = False
            self.job.metrics.dialing_paused.dec()

    # ---- the skeleton ----------------------------------------------------------------------------------------
    async def run(self, definition: CampaignDefinition) -> None:
        """Dial while the job is Running (returns when it is not, or once every contact is done)."""
        await self.prepare(definition)
        timers = _LoopTimers()
        # the contact counts (a scan of every contact of the job: 100-200 ms at 200,000 contacts) are read
        # beside the dial loop, never in it, so a tick (and the first dial after a failover) never waits for them
        self.progress = None
        watcher = self.job.spawn(self._watch_progress(), f"job-{self.job.job_id}-progress")
        try:
            while True:
                self.job.check()
                now = time.monotonic()
                if (stats := await self.housekeeping(now, timers)) is None:
                    return
                if not await self.ready(now):
                    await asyncio.sleep(self.tick_s)
                    continue
                grant = self.permits(now, stats)
                if grant:
                    due = await self.job.store.due(self.job.list_id, min(grant, self.job.opts.max_batch))
                    self.refund(grant - len(due))
                    if due:
                        self.refund(await self.place(due))
                await asyncio.sleep(max(0.0, now + self.tick_s - time.monotonic()))  # a slow batch eats its tick
        finally:
            watcher.cancel()

    async def housekeeping(self, now: float, timers: _LoopTimers) -> JobStats | None:
        """Sweep overdue attempts, re-read the job's state, end the job once every contact is done. None: the
        loop ends (the job is no longer Running, or done)."""
        job = self.job
        if now >= timers.next_sweep:
            await self.sweep()
            timers.next_sweep = now + job.opts.sweep_s
        if now >= timers.next_state:
            current = await job.store.state()
            if current is None or current[0] != JobState.RUNNING.value:
                return None
            timers.next_state = now + job.opts.state_poll_s
        progress = self.progress
        if progress is not None and progress.pending == 0 and progress.dialing == 0 and job.idle():
            progress = await job.store.progress()  # confirmed on a fresh read, in this task
            if progress.pending == 0 and progress.dialing == 0 and job.idle():
                if await job.set_state(JobState.RUNNING, JobState.STOPPING, ending=JobState.COMPLETED,
                                       reason="all contacts done"):
                    self.log.info("all contacts done, job stopping", contacts=progress.total)
                return None
            self.progress = progress
        return JobStats() if progress is None else JobStats(progress.total, progress.finished)

    async def _watch_progress(self) -> None:
        """Keep ``progress`` (the job's contact counts) fresh for the dial loop: every ``progress_poll_s``,
        every ``state_poll_s`` once no contact is pending (the end is near)."""
        job, delay = self.job, 0.05
        while True:
            try:
                progress = await job.store.progress()
            except DB_ERRORS as exc:
                self.log.debug("cannot read job progress, retrying", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
                continue
            delay = 0.05
            self.progress = progress
            if job.cache_link is not None:
                job.cache_link.touch(job.job_id)  # published by the link's own task, coalesced
            await asyncio.sleep(job.opts.state_poll_s if progress.pending == 0 else job.opts.progress_poll_s)

    async def sweep(self) -> None:
        """Attempts written dialing under our epoch that this runner does not know (the commit of
        ``start_attempts`` failed to confirm, so their DIALs never left): send their DIALs now, with the
        same attempt ids — the platform refuses a second call for an id it already placed. Runs in the
        lifecycle task only, never while a placement is between its commit and its DIALs."""
        job = self.job
        job.in_flight.ended_since_sweep.clear()
        ours = await job.store.ours_dialing()
        unknown = set(job.in_flight.unknown([(a.contact_id, a.attempt_no) for a in ours]))
        sent: list[tuple[str, int, str]] = []
        for a in ours:
            if (a.contact_id, a.attempt_no) in unknown:
                self.log.warning("attempt written but its DIAL not sent: sending it", call=a.call_id)
                job.in_flight.add(a.contact_id, a.attempt_no)
                job.spawn(self.send(a), f"dial-{a.call_id}")
                sent.append((a.contact_id, a.attempt_no, a.call_id))
        if sent and job.outbound is not None:  # their DIALED events were not published with the lost commit
            await job.outbound.dialed(job.job_id, job.epoch, job.org, sent)

    async def media_ready(self, now: float) -> bool:
        """No new attempts while no media platform is connected or it just refused a DIAL as down: they
        would only pile up unsent (or be recorded CANCELLED one by one)."""
        if now < self._media_wait_until:
            return False
        try:
            await self.job.media.wait_connected(self.job.opts.state_poll_s)
        except MediaUnavailable:
            if not self._media_lost:
                self.log.warning("dialing waits: no media platform connected")
            self._media_lost = True
            return False
        if self._media_lost:
            self.log.info("media platform connected again, dialing goes on")
            self._media_lost = False
        return True

    async def claim_media(self, old_calls: list[str]) -> None:
        """Make the platform report this job's calls here (held outcomes of older epochs arrive and are
        dropped as stale), and end calls of the resolved attempts that may still be ringing."""
        try:
            claimed = await self.job.media.claim(media_scope(self.job.job_id), self.job.epoch)
            for call in old_calls:
                await self.job.media.cancel(call)
        except MediaUnavailable as exc:
            self.log.info("media scope not claimed", error=str(exc))
            return
        self.log.info("media scope claimed", granted=claimed.granted, delivered=claimed.delivered,
                      in_progress=claimed.in_progress, cancelled=len(old_calls))

    async def watch_overdue(self) -> None:
        """An attempt whose outcome never comes (its platform restarted and forgot it) must not hold its
        contact forever: past ``attempt_timeout_s`` it is recorded NETWORK_FAILURE."""
        period = min(5.0, self.job.opts.attempt_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            for contact, no in self.job.in_flight.overdue(self.job.opts.attempt_timeout_s):
                self.log.warning("attempt without outcome, recorded as network failure", contact=contact, attempt=no)
                if self.job.writer is not None:
                    self.job.record(contact, no, CompletionCode.NETWORK_FAILURE, None)

    async def add_missing(self, list_id: int) -> None:
        """The takeover's re-read of the list (contacts added since the job was filtered), while dialing."""
        delay = 0.05
        started = time.monotonic()
        while True:
            try:
                added = await self.job.store.add_missing(list_id)
                break
            except DB_ERRORS as exc:
                self.log.warning("cannot re-read the contact list, retrying", error=f"{type(exc).__name__}: {exc}",
                                 retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
        self.log.info("contact list re-read after takeover", added=added,
                      took_ms=round((time.monotonic() - started) * 1000))

    # ---- placing ---------------------------------------------------------------------------------------------
    async def place(self, listed: list[DueContact]) -> int:
        """Judge ``listed`` with the Rule Engine and start the allowed (:meth:`started`); returns how many were
        not dialed."""
        job = self.job
        refusals: list[ContactUpdate] = [ContactUpdate(d.contact_id, "filtered_out", reason="removed from the list")
                                         for d in listed if d.phone is None]
        due = [d for d in listed if d.phone is not None]
        verdicts = await asyncio.gather(*(self._judge(d) for d in due), return_exceptions=True)
        if any(isinstance(v, RuleEngineUnavailable) for v in verdicts):
            await self._pause_for_rule_engine(next(str(v) for v in verdicts if isinstance(v, RuleEngineUnavailable)))
            return len(listed)
        new: list[NewAttempt] = []
        custom = job.writer.custom if job.writer is not None else []
        for d, v in zip(due, verdicts, strict=True):
            if isinstance(v, RuleEngineRefused):
                refusals.append(ContactUpdate(d.contact_id, "filtered_out", reason=f"refused: {v}"))
            elif isinstance(v, BaseException):
                raise v
            else:
                update = verdict_update(d.contact_id, v.allowed, v.code, v.retry_at, v.reason, custom)
                if update is None:
                    no = d.attempts + 1
                    new.append(NewAttempt(d.contact_id, no, attempt_id(job.job_id, d.contact_id, no), d.phone or ""))
                else:
                    refusals.append(update)
        if refusals:
            job.metrics.re_refusals.inc(len(refusals))
            await job.store.update_contacts(refusals, from_state="pending")
            out = [u for u in refusals if u.state == "filtered_out"]
            if out:
                self.log.info("contacts filtered out", count=len(out), first=out[0].contact_id, reason=out[0].reason)
        await job.store.start_attempts(new)  # attempt rows first, fenced, then the DIALs
        if new and job.outbound is not None:
            await job.outbound.dialed(job.job_id, job.epoch, job.org,
                                      [(a.contact_id, a.attempt_no, a.call_id) for a in new])
        job.metrics.attempts.inc(len(new))
        job.metrics.count("attempts", len(new))
        for a in new:
            job.in_flight.add(a.contact_id, a.attempt_no)
            await self.started(a)
        return len(listed) - len(new)

    async def _judge(self, d: DueContact) -> Verdict:
        contact = {"id": d.contact_id, "phone": d.phone or "", "timezone": d.timezone or ""}
        return await self.job.re.evaluate(contact, ContactHistory(d.dialed, d.last_dial_at), job=str(self.job.job_id),
                                          timeout_s=self.job.opts.re_timeout_s)

    async def _pause_for_rule_engine(self, why: str) -> None:
        job = self.job
        if not self.re_paused:
            self.re_paused = True
            job.metrics.dialing_paused.inc()
            job.metrics.count("dialing_paused")
        paused_at = time.monotonic()
        self.log.warning("dialing paused: no Rule Engine master answers", error=why)
        while not await job.re.wait_connected(job.opts.state_poll_s):
            job.check()
            current = await job.store.state()
            if current is None or current[0] != JobState.RUNNING.value:
                break
        self.re_paused = False
        job.metrics.dialing_paused.dec()
        self.log.info("dialing resumed", paused_ms=round((time.monotonic() - paused_at) * 1000),
                      master=job.re.master.server if job.re.master else None)

    async def send(self, a: NewAttempt) -> None:
        job = self.job
        cmd = Dial(a.call_id, str(job.job_id), a.contact_id, a.attempt_no, a.phone, job.epoch, media_scope(job.job_id))
        delay = 0.05
        while True:
            try:
                reply = await job.media.dial(cmd)
                break
            except MediaUnavailable as exc:  # fate unknown: the same attempt id again is a duplicate at worst
                self.log.debug("dial not confirmed, sending again", call=a.call_id, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
        if isinstance(reply, Accepted) or reply.reason == "duplicate":
            job.metrics.dials.labels("accepted").inc()
            return
        job.metrics.dials.labels(reply.reason).inc()
        job.metrics.count(f"dials_rejected_{reply.reason}")
        wait = refused_dial_retry(reply.reason)
        if reply.reason in ("down", "capacity") and wait is not None:
            self._media_wait_until = max(self._media_wait_until, time.monotonic() + wait.total_seconds())
        if wait is None:
            job.record(a.contact_id, a.attempt_no, CompletionCode.INVALID_NUMBER, 0)
        else:
            job.record(a.contact_id, a.attempt_no, CompletionCode.CANCELLED, 0, retry_at=datetime.now(UTC) + wait)
