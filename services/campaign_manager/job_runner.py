"""One job on one Campaign Manager, under one assignment epoch: its states, its dial loop, its outcomes.

    (takeover) resolve the previous owner's in-flight attempts as CALL_FAILOVER
    Queued -> Filter in Progress (job_contacts from the list, fenced) -> Running (dial loop)
    Running: paced; each due contact is judged by the Rule Engine; allowed ones get their attempt row and
             their contact 'dialing' in ONE fenced transaction, then the DIAL leaves
    Paused: dials nothing (outcomes are still recorded)
    Stopping: dials nothing new; when no attempt of the job is in flight, the job takes its ``ending``

A runner stops when its job ends, when its fence fails (the job moved: :class:`FenceLost`), or when the
daemon cancels it. While no Rule Engine master answers, dialing pauses and resumes when one does.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pom_ha.clients.rule_engine import RuleEngineClient, RuleEngineRefused, RuleEngineUnavailable, Verdict
from pom_ha.domain.attempts import CompletionCode, ContactHistory
from pom_ha.domain.campaigns import CampaignDefinition, InvalidCampaign, validate_campaign
from pom_ha.domain.jobs import InvalidTransition, JobState, JobStatus, transition
from pom_ha.domain.jobs import JobEvent as JobTransition
from pom_ha.domain.pacing import Pacer, PacingKind, PredictivePacer, PreviewPacer, TimeBasedPacer
from pom_ha.domain.stats import JobStats
from pom_ha.domain.strategy import RetryStrategy
from pom_ha.media.client import MediaClient, MediaUnavailable
from pom_ha.media.protocol import Accepted, Dial, Outcome
from services.campaign_manager.agent_link import AgentLink, Offer
from services.campaign_manager.cache_link import CacheLink
from services.campaign_manager.completions import (
    DB_ERRORS,
    Completion,
    CompletionWriter,
    InFlight,
    resolve_in_flight,
)
from services.campaign_manager.decisions import (
    NOT_DIALED_CODES,
    ContactUpdate,
    attempt_id,
    media_scope,
    platform_code,
    refused_dial_retry,
    verdict_update,
)
from services.campaign_manager.job_store import (
    DueContact,
    FenceLost,
    JobStore,
    NewAttempt,
    Progress,
    WriteConflict,
)
from services.campaign_manager.metrics import CMMetrics
from services.campaign_manager.outbound import Outbound
from services.campaign_manager.runtime_control import RuntimeRefused

TERMINAL = ("Completed", "Stopped")
OFFER_TIMEOUT_S = 60.0  # an offer no AM applied within this long (no master for the zone) is abandoned
OFFER_TRIES = 3  # a live answer refused by the AM (its agent changed state meanwhile) goes to another agent


@dataclass
class _LoopTimers:
    """When a dial loop next sweeps overdue attempts and next re-reads its job's state (monotonic seconds)."""

    next_state: float = 0.0
    next_sweep: float = 0.0


@dataclass(frozen=True)
class RunnerOptions:
    state_poll_s: float = 0.25  # how often a running job's state is re-read (pause/stop by the Director)
    progress_poll_s: float = 1.0  # how often the job's contact counts are re-read
    re_timeout_s: float = 1.0  # one Rule Engine evaluation; past it dialing pauses
    attempt_timeout_s: float = 600.0  # an attempt without outcome this long is recorded NETWORK_FAILURE
    max_batch: int = 200
    sweep_s: float = 5.0  # how often attempts written but never dialed (commit not confirmed) are looked for


class JobRunner:
    def __init__(self, store: JobStore, *, rule_engine: RuleEngineClient, media: MediaClient, metrics: CMMetrics,
                 log: Any, options: RunnerOptions | None = None, outbound: Outbound | None = None) -> None:
        self.store = store
        self.job_id = store.job_id
        self.epoch = store.fence.epoch
        self.re = rule_engine
        self.media = media
        self.metrics = metrics
        self.opts = options or RunnerOptions()
        self.log = log.bind(job=self.job_id, assignment_epoch=self.epoch)
        self.state = "?"
        self.in_flight = InFlight()
        self.writer: CompletionWriter | None = None
        self._lost = asyncio.Event()
        self._crashed: BaseException | None = None
        self._re_paused = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._list_id = 0
        self._refilter = True  # a running job found at takeover goes through Filter in Progress first
        self._taken_running = False  # that Filter in Progress re-reads the list beside the dial loop
        self._catch_up: asyncio.Task[None] | None = None  # that re-read
        self._refilter_cause = "taken over"  # or "cache rebuilt" (services/campaign_manager/cache_link.py)
        self.cache_link: CacheLink | None = None  # statistics to the cache service (best-effort, never waited for)
        self._media_wait_until = 0.0
        self._media_lost = False
        self._progress: Progress | None = None  # the latest contact counts, read beside the dial loop
        self.outbound = outbound
        self.org = "Default"
        self._campaign: tuple[int | None, str | None] = (None, None)
        self.pacing_rate: float | None = None  # runtime override (calls per second), from jobs.pacing_rate
        # agent-based jobs (preview / progressive / predictive): services/campaign_manager/agent_link.py
        self.agent_link: AgentLink | None = None
        self._agent_pacer: Pacer | None = None
        self._answers: collections.deque[Completion] = collections.deque()  # live answers waiting for an agent
        self._answered: dict[str, Completion] = {}  # call id -> the live answer an offer is out for
        self._phones: dict[tuple[str, int], str] = {}
        self._previews: dict[str, tuple[NewAttempt, Offer | None, str | None]] = {}  # call -> (attempt, offer, agent)
        self._preview_dialed: set[str] = set()
        self._followups: collections.deque[tuple[str, str, str, tuple[str, int], Completion]] = collections.deque()
        self._agent_wake = asyncio.Event()
        self._zone_waiting = False
        self.agent_counts: collections.Counter[str] = collections.Counter()

    @property
    def active(self) -> bool:
        return self.state not in TERMINAL

    # ---- entry points ------------------------------------------------------------------------------------
    def offer(self, outcome: Outcome) -> None:
        """An outcome of this job under this epoch (the daemon checked both)."""
        if self.writer is None:
            return
        code = platform_code(outcome.code, self.writer.custom)
        completion = Completion(outcome.contact, outcome.attempt_no, code, outcome.duration_ms)
        if self.agent_link is not None:
            key = (outcome.contact, outcome.attempt_no)
            call = attempt_id(self.job_id, outcome.contact, outcome.attempt_no)
            preview = self._previews.get(call)
            if preview is not None and preview[2] is not None:
                # a preview's dial ended: its agent (Dialing) talks to the person or wraps the call up
                event = "answered" if code.name == CompletionCode.ANSWER_HUMAN.name else "released"
                self._followups.append((event, preview[2], call, key, completion))
                self._agent_wake.set()
                return
            if code.name == CompletionCode.ANSWER_HUMAN.name:
                # a person answered: the attempt ends once an agent has the call (or none could take it)
                self._answers.append(completion)
                self._agent_wake.set()
                return
        self.writer.offer(completion)

    async def run(self) -> str:
        """Run the job until it ends or is no longer ours; returns why it stopped."""
        try:
            return await self._run()
        except FenceLost as exc:
            self.metrics.fence_lost.inc()
            self.log.info("job no longer ours, runner stops", reason=str(exc))
            return "fence lost"
        finally:
            self.metrics.job_gone(self.job_id)
            if self._re_paused:
                self.metrics.dialing_paused.dec()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self) -> str:
        delay = 0.05
        while True:
            try:
                return await self._lifecycle()
            except (WriteConflict, *DB_ERRORS) as exc:
                self.log.warning("job runner step failed, retrying", error=f"{type(exc).__name__}: {exc}",
                                 retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, FenceLost):
            self._lost.set()
        elif exc is not None:
            self.log.error("job runner task crashed", task=task.get_name(), exc_info=exc)
            self._crashed = exc

    def _check(self) -> None:
        if self._lost.is_set():
            raise FenceLost(f"job {self.job_id}: assignment epoch {self.epoch} no longer ours")
        if self._crashed is not None:  # the daemon logs it and starts the job's runner again
            raise RuntimeError(f"job {self.job_id}: a task of the runner crashed") from self._crashed

    # ---- states ------------------------------------------------------------------------------------------
    async def _lifecycle(self) -> str:
        info = await self.store.job()
        if info is None:
            return "job deleted"
        self._list_id = info.list_id
        self.pacing_rate = info.pacing_rate
        definition: CampaignDefinition | None = None
        try:
            definition = validate_campaign(info.definition)
            self.org = definition.org
            self._campaign = (info.campaign_id, definition.name)
        except (InvalidCampaign, TypeError, ValueError) as exc:
            self.log.error("campaign definition invalid, the job is stopped", error=str(exc))
        if definition is not None and definition.pacing.kind.needs_agents and self.agent_link is None:
            self.agent_link = AgentLink(self.store, info.zone)
            self._spawn(self._agent_calls(), f"job-{self.job_id}-agents")
            self.log.info("agent-based job", pacing=definition.pacing.kind.value, zone=info.zone)
        if self.writer is None:
            if definition is None:  # in-flight attempts are still resolved, with the default strategy
                await self._take_over(RetryStrategy(), [])
            else:
                await self._take_over(definition.retry_strategy(), definition.custom_completion_codes())
        while True:
            self._check()
            current = await self.store.state()
            if current is None:
                return "job deleted"
            self.state, ending = current
            if self._refilter and self.state == "Running":
                # the taker's view of the contacts is rebuilt before it dials (JobEvent.TAKEOVER; CACHE_REBUILT
                # of a Paused job, on resume)
                await self._set_state("Running", "Filter in Progress",
                                      reason=f"{self._refilter_cause}, filtering again")
                self._refilter = False
                self._taken_running = True
                continue
            self._refilter = self._refilter and self.state in ("Queued", "Paused")
            if definition is None and self.state in ("Queued", "Filter in Progress", "Running", "Paused"):
                await self._set_state(self.state, "Stopping", ending="Stopped",
                                           reason="invalid campaign definition")
            elif self.state == "Queued":
                await self._set_state("Queued", "Filter in Progress", reason="campaign manager filtering")
            elif self.state == "Filter in Progress" and self._taken_running:
                # taken over while Running: its contacts were filtered by a previous owner and every attempt
                # in flight is resolved, so it dials again at once; the list is re-read beside the dial loop
                # (a scan of the whole list, seconds at 200,000 contacts on a busy database) and the job
                # cannot complete before that re-read has added what the list gained meanwhile
                await self.store.unstick()
                if self._catch_up is None or self._catch_up.done():
                    self._catch_up = self._spawn(self._add_missing(info.list_id), f"job-{self.job_id}-refilter")
                cause, self._refilter_cause = self._refilter_cause, "taken over"
                await self._set_state("Filter in Progress", "Running",
                                      reason=f"{cause}: filtered, the list is re-read while dialing")
                self._taken_running = False
                self.log.info(f"job {cause} running, dialing again; the list is re-read meanwhile")
            elif self.state == "Filter in Progress":
                added = await self.store.filter_contacts(info.list_id)
                await self._set_state("Filter in Progress", "Running", reason="filtered")
                self.log.info("contacts filtered, job running", added=added)
            elif self.state == "Running" and definition is not None:
                await self._dial(definition)
            elif self.state == "Paused":
                await self._wait_while("Paused")
            elif self.state == "Stopping":
                await self._settle(ending or "Stopped")
            else:
                self.log.info("job ended", state=self.state)
                return self.state

    async def _set_state(self, from_state: str, to_state: str, *, ending: str | None = None,
                         reason: str | None = None) -> bool:
        """The store's compare-and-set; a change that landed is published as a JOB event (after the commit)."""
        changed = await self.store.set_state(from_state, to_state, ending=ending, reason=reason)
        if changed and self.cache_link is not None:
            self.cache_link.touch(self.job_id)
        if changed and self.outbound is not None:
            await self.outbound.job_state(self.job_id, self.epoch, self.org, campaign_id=self._campaign[0],
                                          campaign_name=self._campaign[1], previous=from_state, state=to_state,
                                          reason=reason)
        return changed

    set_state = _set_state  # for services/campaign_manager/cache_link.py (CACHE_REBUILT)

    def mark_refilter(self, cause: str | None, *, running: bool = False) -> None:
        """The job must pass through Filter in Progress (JobEvent.CACHE_REBUILT): a Paused job on resume
        (``refilter``), a Running one now, on the takeover's fast path; ``cause`` None undoes ``running``."""
        if cause is None:
            self._taken_running, self._refilter_cause = False, "taken over"
            return
        self._refilter_cause = cause
        if running:
            self._taken_running = True
        else:
            self._refilter = True

    async def apply_runtime_change(self, action: str, rate: float | None, request_id: str) -> str:
        """A runtime change received over ActiveMQ (RuntimeControl): returns what was done, raises
        RuntimeRefused when nothing was. Pause/resume are the compare-and-set the Director uses."""
        self._check()
        current = await self.store.state()
        if current is None:
            raise RuntimeRefused(f"job {self.job_id} does not exist any more")
        state, ending = current
        if action == "pacing_rate":
            if state in ("Stopping", *TERMINAL):
                raise RuntimeRefused(f"job {self.job_id} is {state}: its pacing rate cannot change")
            assert rate is not None
            old = self.pacing_rate
            await self.store.set_pacing_rate(rate)
            self.pacing_rate = rate
            return f"pacing rate of job {self.job_id} set to {rate:g} calls/s" + (
                f" (was {old:g})" if old is not None else " (was the campaign's)")
        event = JobTransition.PAUSE if action == "pause" else JobTransition.RESUME
        try:
            status = JobStatus(JobState(state), ending=JobState(ending or "Stopped")) if state == "Stopping" \
                else JobStatus(JobState(state))
            after = transition(status, event)
        except (InvalidTransition, ValueError) as exc:
            raise RuntimeRefused(f"job {self.job_id}: {exc}") from None
        to_state = after.state.value
        if not await self._set_state(state, to_state, ending=after.ending.value if after.ending else None,
                                     reason=f"operator {action} over ActiveMQ (request {request_id[:8]})"):
            raise RuntimeRefused(f"job {self.job_id} changed state meanwhile (was {state}); {action} not applied")
        return f"job {self.job_id}: {state} -> {to_state}"

    async def _take_over(self, strategy: RetryStrategy, custom: list[CompletionCode]) -> None:
        writer = CompletionWriter(self.store, strategy, custom, self.metrics, self.log, max_batch=self.opts.max_batch,
                                  on_done=self.in_flight.done, on_recorded=self._recorded)
        resolved = await resolve_in_flight(self.store, writer.strategy, writer.custom)
        self.writer = writer
        self._spawn(writer.run(), f"job-{self.job_id}-outcomes")
        self._spawn(self._watch_overdue(), f"job-{self.job_id}-overdue")
        self._spawn(self._claim([r[2] for r in resolved if r[2]]), f"job-{self.job_id}-claim")
        if resolved:
            # the previous owner's attempts end here: their RESULT events come from the taker
            await self._recorded([(r[0], r[1], CompletionCode.CALL_FAILOVER.name, None) for r in resolved])
            self.metrics.failover_resolved.inc(len(resolved))
            self.metrics.count("failover_resolved", len(resolved))
            owners = sorted({f"{r[3]}@{r[4]}" for r in resolved})
            self.log.info("took over job: in-flight attempts resolved as CALL_FAILOVER", count=len(resolved),
                          previous=owners)

    async def _recorded(self, done: list[tuple[str, int, str, int | None]]) -> None:
        pacer = self._agent_pacer
        if isinstance(pacer, PredictivePacer):
            for _c, _n, code, _ms in done:
                if code in NOT_DIALED_CODES or code == CompletionCode.CALL_FAILOVER.name:
                    continue
                live = code in (CompletionCode.ANSWER_HUMAN.name, CompletionCode.NUISANCE.name)
                pacer.record(live=live, abandoned=code == CompletionCode.NUISANCE.name)
            self.metrics.pacing(self.job_id, pacer.abandon_rate, pacer.abandon_cap)
        if self.outbound is not None:
            await self.outbound.recorded(self.job_id, self.epoch, self.org, done)

    async def _claim(self, old_calls: list[str]) -> None:
        """Make the platform report this job's calls here (held outcomes of older epochs arrive and are
        dropped as stale), and end calls of the resolved attempts that may still be ringing."""
        try:
            claimed = await self.media.claim(media_scope(self.job_id), self.epoch)
            for call in old_calls:
                await self.media.cancel(call)
        except MediaUnavailable as exc:
            self.log.info("media scope not claimed", error=str(exc))
            return
        self.log.info("media scope claimed", granted=claimed.granted, delivered=claimed.delivered,
                      in_progress=claimed.in_progress, cancelled=len(old_calls))

    async def _wait_while(self, state: str) -> None:
        while True:
            self._check()
            await asyncio.sleep(self.opts.state_poll_s)
            current = await self.store.state()
            if current is None or current[0] != state:
                return

    async def _settle(self, ending: str) -> None:
        """Stopping: nothing new is dialed; once no attempt is in flight, the job takes its ending."""
        next_sweep = 0.0
        while True:
            self._check()
            if time.monotonic() >= next_sweep:
                await self._sweep()
                next_sweep = time.monotonic() + self.opts.sweep_s
            current = await self.store.state()
            if current is None or current[0] != "Stopping":
                return
            assert self.writer is not None
            if self.writer.idle and await self.store.in_flight_count() == 0:
                if await self._set_state("Stopping", ending, ending=ending):
                    self.log.info("job settled", ending=ending)
                return
            await asyncio.sleep(0.05)

    # ---- dialing -----------------------------------------------------------------------------------------
    async def _dial(self, definition: CampaignDefinition) -> None:
        if self.agent_link is not None:
            return await self._dial_agents(definition, self.agent_link)
        pacer = self._pacer(definition)
        tick = min(0.1, max(0.01, pacer.burst / pacer.rate / 2))
        timers = _LoopTimers()
        # the contact counts (a scan of every contact of the job: 100-200 ms at 200,000 contacts) are read
        # beside the dial loop, never in it, so a tick (and the first dial after a failover) never waits for them
        self._progress = None
        watcher = self._spawn(self._watch_progress(), f"job-{self.job_id}-progress")
        try:
            while True:
                self._check()
                now = time.monotonic()
                if (stats := await self._housekeeping(now, timers)) is None:
                    return
                if self.pacing_rate is not None and self.pacing_rate != pacer.rate:
                    pacer = self._pacer(definition)  # a runtime change: the new rate from this tick on
                    tick = min(0.1, max(0.01, pacer.burst / pacer.rate / 2))
                    self.log.info("pacing rate changed", calls_per_second=pacer.rate)
                if not await self._media_ready(now):
                    await asyncio.sleep(tick)
                    continue
                grant = pacer.permits(now, len(self.in_flight), stats)
                if grant:
                    due = await self.store.due(self._list_id, min(grant, self.opts.max_batch))
                    pacer.refund(grant - len(due))
                    if due:
                        pacer.refund(await self._place(due))
                await asyncio.sleep(max(0.0, now + tick - time.monotonic()))  # a slow batch eats into its tick
        finally:
            watcher.cancel()

    async def _housekeeping(self, now: float, timers: _LoopTimers) -> JobStats | None:
        """The part of a dial-loop tick every pacing kind shares: sweep overdue attempts, re-read the job's state,
        end the job once every contact is done. None: the loop ends (the job is no longer Running, or done)."""
        if now >= timers.next_sweep:
            await self._sweep()
            timers.next_sweep = now + self.opts.sweep_s
        if now >= timers.next_state:
            current = await self.store.state()
            if current is None or current[0] != "Running":
                return None
            timers.next_state = now + self.opts.state_poll_s
        progress = self._progress
        if progress is not None and progress.pending == 0 and progress.dialing == 0 and self._idle():
            progress = await self.store.progress()  # confirmed on a fresh read, in this task
            if progress.pending == 0 and progress.dialing == 0 and self._idle():
                if await self._set_state("Running", "Stopping", ending="Completed", reason="all contacts done"):
                    self.log.info("all contacts done, job stopping", contacts=progress.total)
                return None
            self._progress = progress
        return JobStats() if progress is None else JobStats(progress.total, progress.finished)

    def _pacer(self, definition: CampaignDefinition) -> TimeBasedPacer:
        if self.pacing_rate is None:
            return definition.time_pacer()
        return TimeBasedPacer(calls_per_second=self.pacing_rate, max_in_flight=definition.pacing.max_in_flight)

    def _idle(self) -> bool:
        """No outcome waits to be recorded and no re-read of the list is still running."""
        list_read = self._catch_up is None or self._catch_up.done()
        return list_read and self.writer is not None and self.writer.idle

    async def _add_missing(self, list_id: int) -> None:
        """The takeover's re-read of the list (contacts added since the job was filtered), while dialing."""
        delay = 0.05
        started = time.monotonic()
        while True:
            try:
                added = await self.store.add_missing(list_id)
                break
            except DB_ERRORS as exc:
                self.log.warning("cannot re-read the contact list, retrying", error=f"{type(exc).__name__}: {exc}",
                                 retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
        self.log.info("contact list re-read after takeover", added=added,
                      took_ms=round((time.monotonic() - started) * 1000))

    async def _watch_progress(self) -> None:
        """Keep ``_progress`` (the job's contact counts) fresh for the dial loop: every ``progress_poll_s``,
        every ``state_poll_s`` once no contact is pending (the end is near)."""
        delay = 0.05
        while True:
            try:
                progress = await self.store.progress()
            except DB_ERRORS as exc:
                self.log.debug("cannot read job progress, retrying", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
                continue
            delay = 0.05
            self._progress = progress
            if self.cache_link is not None:
                self.cache_link.touch(self.job_id)  # published by the link's own task, coalesced
            await asyncio.sleep(self.opts.state_poll_s if progress.pending == 0 else self.opts.progress_poll_s)

    async def _sweep(self) -> None:
        """Attempts written dialing under our epoch that this runner does not know (the commit of
        ``start_attempts`` failed to confirm, so their DIALs never left): send their DIALs now, with the
        same attempt ids — the platform refuses a second call for an id it already placed. Runs in the
        lifecycle task only, never while a placement is between its commit and its DIALs."""
        self.in_flight.ended_since_sweep.clear()
        ours = await self.store.ours_dialing()
        unknown = set(self.in_flight.unknown([(a.contact_id, a.attempt_no) for a in ours]))
        sent: list[tuple[str, int, str]] = []
        for a in ours:
            if (a.contact_id, a.attempt_no) in unknown:
                self.log.warning("attempt written but its DIAL not sent: sending it", call=a.call_id)
                self.in_flight.add(a.contact_id, a.attempt_no)
                self._spawn(self._send(a), f"dial-{a.call_id}")
                sent.append((a.contact_id, a.attempt_no, a.call_id))
        if sent and self.outbound is not None:  # their DIALED events were not published with the lost commit
            await self.outbound.dialed(self.job_id, self.epoch, self.org, sent)

    async def _media_ready(self, now: float) -> bool:
        """No new attempts while no media platform is connected or it just refused a DIAL as down: they
        would only pile up unsent (or be recorded CANCELLED one by one)."""
        if now < self._media_wait_until:
            return False
        try:
            await self.media.wait_connected(self.opts.state_poll_s)
        except MediaUnavailable:
            if not self._media_lost:
                self.log.warning("dialing waits: no media platform connected")
            self._media_lost = True
            return False
        if self._media_lost:
            self.log.info("media platform connected again, dialing goes on")
            self._media_lost = False
        return True

    async def _place(self, listed: list[DueContact], *, preview: bool = False) -> int:
        """Judge ``listed`` with the Rule Engine and dial the allowed; returns how many were not dialed.
        ``preview``: the allowed ones are offered to free agents as previews, dialed once accepted."""
        refusals: list[ContactUpdate] = [ContactUpdate(d.contact_id, "filtered_out", reason="removed from the list")
                                         for d in listed if d.phone is None]
        due = [d for d in listed if d.phone is not None]
        verdicts = await asyncio.gather(*(self._judge(d) for d in due), return_exceptions=True)
        if any(isinstance(v, RuleEngineUnavailable) for v in verdicts):
            await self._pause_for_rule_engine(next(str(v) for v in verdicts if isinstance(v, RuleEngineUnavailable)))
            return len(listed)
        new: list[NewAttempt] = []
        custom = self.writer.custom if self.writer is not None else []
        for d, v in zip(due, verdicts, strict=True):
            if isinstance(v, RuleEngineRefused):
                refusals.append(ContactUpdate(d.contact_id, "filtered_out", reason=f"refused: {v}"))
            elif isinstance(v, BaseException):
                raise v
            else:
                update = verdict_update(d.contact_id, v.allowed, v.code, v.retry_at, v.reason, custom)
                if update is None:
                    no = d.attempts + 1
                    phone = d.phone or ""
                    new.append(NewAttempt(d.contact_id, no, attempt_id(self.job_id, d.contact_id, no), phone))
                else:
                    refusals.append(update)
        if refusals:
            self.metrics.re_refusals.inc(len(refusals))
            await self.store.update_contacts(refusals, from_state="pending")
            out = [u for u in refusals if u.state == "filtered_out"]
            if out:
                self.log.info("contacts filtered out", count=len(out), first=out[0].contact_id, reason=out[0].reason)
        await self.store.start_attempts(new)  # attempt rows first, fenced, then the DIALs
        if new and self.outbound is not None:
            await self.outbound.dialed(self.job_id, self.epoch, self.org, [(a.contact_id, a.attempt_no, a.call_id)
                                                                          for a in new])
        self.metrics.attempts.inc(len(new))
        self.metrics.count("attempts", len(new))
        for a in new:
            self.in_flight.add(a.contact_id, a.attempt_no)
            if self.agent_link is not None:
                self._phones[(a.contact_id, a.attempt_no)] = a.phone
            if preview:
                await self._offer_preview(a)
            else:
                self._spawn(self._send(a), f"dial-{a.call_id}")
        return len(listed) - len(new)

    # ---- agent-based jobs ---------------------------------------------------------------------------------
    async def _dial_agents(self, definition: CampaignDefinition, link: AgentLink) -> None:
        """The dial loop of an agent-based job: every tick the zone's availability and the job's agents are
        read (``agent_zone_status``, ``agents``) and the pacer grants dials (previews for preview pacing)
        from them; nothing new is dialed while the zone has no Agent Manager master."""
        pacer = definition.pacer()
        if isinstance(pacer, PredictivePacer):
            dialed, live, abandoned = await link.day_counts(list(NOT_DIALED_CODES))
            pacer.seed(attempts=dialed, live_answers=live, abandons=abandoned)
            self.log.info("predictive pacing", abandon_cap=pacer.abandon_cap, max_ratio=pacer.max_ratio,
                          day_attempts=dialed, day_live_answers=live, day_abandons=abandoned)
        self._agent_pacer = pacer
        preview = definition.pacing.kind is PacingKind.PREVIEW
        tick = 0.1
        timers = _LoopTimers()
        self._progress = None
        watcher = self._spawn(self._watch_progress(), f"job-{self.job_id}-progress")
        try:
            while True:
                self._check()
                now = time.monotonic()
                if (stats := await self._housekeeping(now, timers)) is None:
                    return
                view = await link.view()
                if isinstance(pacer, PredictivePacer):
                    for seconds in link.handle_times:
                        pacer.record_handle_time(seconds)
                link.handle_times.clear()
                if not view.available:
                    if not self._zone_waiting:
                        self.log.warning("dialing waits: the zone has no Agent Manager master", zone=link.zone)
                        self.agent_counts["zone_unavailable_waits"] += 1
                    self._zone_waiting = True
                    await asyncio.sleep(tick)
                    continue
                if self._zone_waiting:
                    self.log.info("zone available again, dialing goes on", zone=link.zone)
                    self._zone_waiting = False
                if not await self._media_ready(now):
                    await asyncio.sleep(tick)
                    continue
                grant = pacer.permits(now, self._ringing(), stats, view)
                if grant:
                    due = await self.store.due(self._list_id, min(grant, self.opts.max_batch))
                    pacer.refund(grant - len(due))
                    if due:
                        pacer.refund(await self._place(due, preview=preview))
                await asyncio.sleep(max(0.0, now + tick - time.monotonic()))
        finally:
            watcher.cancel()

    def agent_info(self) -> dict[str, Any]:
        """For /health: the agent side of an agent-based job (nothing for agentless jobs)."""
        link, pacer = self.agent_link, self._agent_pacer
        if link is None:
            return {}
        info: dict[str, Any] = {"agents": {**link.info(), **dict(self.agent_counts)}}
        if isinstance(pacer, PredictivePacer):
            info["agents"].update(abandon_cap=pacer.abandon_cap, abandon_rate=pacer.abandon_rate,
                                  answer_rate=round(pacer.answer_rate, 4), budget=pacer.budget)
        return info

    def _ringing(self) -> int:
        """Dials placed and not yet answered or ended (a pacer's ``in_flight``): attempts in flight less
        the live answers waiting for an agent and the previews not dialed yet."""
        waiting = len(self._answers) + len(self._answered)
        previews = sum(1 for call in self._previews if call not in self._preview_dialed)
        return max(0, len(self.in_flight) - waiting - previews)

    def _abandon(self, completion: Completion, why: str) -> None:
        """A live answer no agent took: recorded NUISANCE (counted against the abandon cap)."""
        assert self.writer is not None
        self.agent_counts["abandoned"] += 1
        if self.agent_counts["abandoned"] <= 5 or self.agent_counts["abandoned"] % 100 == 0:
            self.log.info("live answer abandoned (NUISANCE)", contact=completion.contact_id, why=why,
                          abandoned=self.agent_counts["abandoned"])
        self.writer.offer(Completion(completion.contact_id, completion.attempt_no, CompletionCode.NUISANCE,
                                     completion.duration_ms))

    async def _offer_preview(self, a: NewAttempt) -> None:
        """A preview of ``a`` to a free agent; its DIAL leaves only once the agent accepted it."""
        assert self.agent_link is not None and self.writer is not None
        offer = await self.agent_link.offer("preview_offered", (a.contact_id, a.attempt_no), a.call_id, a.phone)
        if offer is None:  # no agent any more: not dialed, due again soon
            self.writer.offer(Completion(a.contact_id, a.attempt_no, CompletionCode.CANCELLED, 0,
                                         retry_at=datetime.now(UTC)))
            return
        self._previews[a.call_id] = (a, offer, None)
        pacer = self._agent_pacer
        if isinstance(pacer, PreviewPacer):
            pacer.offered(a.call_id)
        self.agent_counts["previews_offered"] += 1

    async def _agent_calls(self) -> None:
        """Live answers to free agents, the AM's results of every offer, previews accepted -> DIAL, a
        preview's dial outcome -> its agent; until cancelled (FenceLost when the job moved)."""
        link = self.agent_link
        assert link is not None
        delay = 0.05
        while True:
            self._agent_wake.clear()
            if self.writer is None:
                await asyncio.sleep(0.05)
                continue
            try:
                await self._agent_step(link)
                delay = 0.05
            except DB_ERRORS as exc:  # nothing is lost: what was not done stays queued for the next step
                self.log.warning("agent hand-off step failed, retrying", error=f"{type(exc).__name__}: {exc}",
                                 retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
                continue
            if not (self._answers or self._followups):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await self._agent_wake.wait()

    async def _agent_step(self, link: AgentLink) -> None:
        assert self.writer is not None
        while self._answers:
            completion = self._answers[0]
            key = (completion.contact_id, completion.attempt_no)
            call = attempt_id(self.job_id, *key)
            offer = await link.offer("offered", key, call, self._phones.get(key, ""))
            self._answers.popleft()
            if offer is None:
                self._abandon(completion, "no free agent" if link.available else "zone unavailable")
            else:
                self._answered[call] = completion
        while self._followups:
            event, agent, call, key, completion = self._followups[0]
            await link.command(event, agent, call, key)
            self._followups.popleft()
            self._previews.pop(call, None)
            self._preview_dialed.discard(call)
            if isinstance(self._agent_pacer, PreviewPacer):
                self._agent_pacer.ended(call)
            self.writer.offer(completion)
        for res in await link.results():
            await self._offer_result(link, res.offer, res.agent_id, res.result, res.reoffered_from)
        if self._previews:
            await self._watch_previews(link)
        now = time.monotonic()
        for offer in [o for o in link.pending.values() if now - o.started > OFFER_TIMEOUT_S]:
            if await link.cancel(offer, f"abandoned: no Agent Manager applied it within {OFFER_TIMEOUT_S:g} s"):
                link.pending.pop(offer.ref, None)
                link.reserved.pop(offer.agent_id, None)
                await self._offer_result(link, offer, offer.agent_id, "closed: offer timed out", None)

    async def _offer_result(self, link: AgentLink, offer: Offer, agent: str, result: str,
                            reoffered_from: str | None) -> None:
        assert self.writer is not None
        ok = result.startswith("ok")
        if reoffered_from:
            self.agent_counts["reoffered_by_am"] += 1
        if offer.event == "offered":
            completion = self._answered.pop(offer.ref, None)
            if completion is None:
                return
            if ok:
                self.agent_counts["handed_to_agents"] += 1
                self.writer.offer(completion)  # ANSWER_HUMAN: a person answered and an agent has the call
                return
            if result.startswith("refused") and offer.tries < OFFER_TRIES:
                try:
                    again = await link.offer("offered", offer.key, offer.ref, offer.phone, exclude={agent},
                                             tries=offer.tries + 1)
                except DB_ERRORS as exc:
                    again = None
                    result = f"{result}; not offered again: {type(exc).__name__}"
                if again is not None:
                    self._answered[offer.ref] = completion
                    return
            self._abandon(completion, result[:200])
        elif offer.event == "preview_offered":
            entry = self._previews.get(offer.ref)
            if entry is None:
                return
            if ok:
                self._previews[offer.ref] = (entry[0], None, agent)
                return
            self._previews.pop(offer.ref, None)  # the agent could not take it: not dialed, due again
            if isinstance(self._agent_pacer, PreviewPacer):
                self._agent_pacer.cancelled(offer.ref)
            a = entry[0]
            self.writer.offer(Completion(a.contact_id, a.attempt_no, CompletionCode.CANCELLED, 0,
                                         retry_at=datetime.now(UTC)))

    async def _watch_previews(self, link: AgentLink) -> None:
        """Previews an agent holds: accepted (the agent went Dialing on it) -> the DIAL leaves; cancelled
        (the agent is off it) -> not dialed, the contact is due again."""
        assert self.writer is not None
        held = {call: agent for call, (_a, _o, agent) in self._previews.items()
                if agent is not None and call not in self._preview_dialed}
        if not held:
            return
        rows = await self.store.pool.fetch(
            "SELECT agent_id, call_state, call_id FROM agents WHERE zone = $1 AND agent_id = ANY($2::text[])",
            link.zone, sorted(set(held.values())), timeout=self.store.timeout_s)
        state = {str(r["agent_id"]): (r["call_state"], r["call_id"]) for r in rows}
        pacer = self._agent_pacer
        for call, agent in held.items():
            call_state, agent_call = state.get(agent, ("Idle", None))
            a = self._previews[call][0]
            if agent_call == call and call_state == "Dialing":
                if isinstance(pacer, PreviewPacer):
                    pacer.accepted(call)
                    pacer.dialed(call)
                self._preview_dialed.add(call)
                self.agent_counts["previews_accepted"] += 1
                self._spawn(self._send(a), f"dial-{call}")
            elif agent_call != call:
                self._previews.pop(call, None)
                if isinstance(pacer, PreviewPacer):
                    pacer.cancelled(call)
                self.agent_counts["previews_cancelled"] += 1
                self.writer.offer(Completion(a.contact_id, a.attempt_no, CompletionCode.CANCELLED, 0,
                                             retry_at=datetime.now(UTC)))

    async def _judge(self, d: DueContact) -> Verdict:
        contact = {"id": d.contact_id, "phone": d.phone or "", "timezone": d.timezone or ""}
        return await self.re.evaluate(contact, ContactHistory(d.dialed, d.last_dial_at), job=str(self.job_id),
                                      timeout_s=self.opts.re_timeout_s)

    async def _pause_for_rule_engine(self, why: str) -> None:
        if not self._re_paused:
            self._re_paused = True
            self.metrics.dialing_paused.inc()
            self.metrics.count("dialing_paused")
        paused_at = time.monotonic()
        self.log.warning("dialing paused: no Rule Engine master answers", error=why)
        while not await self.re.wait_connected(self.opts.state_poll_s):
            self._check()
            current = await self.store.state()
            if current is None or current[0] != "Running":
                break
        self._re_paused = False
        self.metrics.dialing_paused.dec()
        self.log.info("dialing resumed", paused_ms=round((time.monotonic() - paused_at) * 1000),
                      master=self.re.master.server if self.re.master else None)

    async def _send(self, a: NewAttempt) -> None:
        cmd = Dial(a.call_id, str(self.job_id), a.contact_id, a.attempt_no, a.phone, self.epoch,
                   media_scope(self.job_id))
        delay = 0.05
        while True:
            try:
                reply = await self.media.dial(cmd)
                break
            except MediaUnavailable as exc:  # fate unknown: the same attempt id again is a duplicate at worst
                self.log.debug("dial not confirmed, sending again", call=a.call_id, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
        if isinstance(reply, Accepted) or reply.reason == "duplicate":
            self.metrics.dials.labels("accepted").inc()
            return
        self.metrics.dials.labels(reply.reason).inc()
        self.metrics.count(f"dials_rejected_{reply.reason}")
        wait = refused_dial_retry(reply.reason)
        if reply.reason in ("down", "capacity") and wait is not None:
            self._media_wait_until = max(self._media_wait_until, time.monotonic() + wait.total_seconds())
        assert self.writer is not None
        if wait is None:
            self.writer.offer(Completion(a.contact_id, a.attempt_no, CompletionCode.INVALID_NUMBER, 0))
        else:
            self.writer.offer(Completion(a.contact_id, a.attempt_no, CompletionCode.CANCELLED, 0,
                                         retry_at=datetime.now(UTC) + wait))

    async def _watch_overdue(self) -> None:
        """An attempt whose outcome never comes (its platform restarted and forgot it) must not hold its
        contact forever: past ``attempt_timeout_s`` it is recorded NETWORK_FAILURE."""
        period = min(5.0, self.opts.attempt_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            for contact, no in self.in_flight.overdue(self.opts.attempt_timeout_s):
                self.log.warning("attempt without outcome, recorded as network failure", contact=contact, attempt=no)
                if self.writer is not None:
                    self.writer.offer(Completion(contact, no, CompletionCode.NETWORK_FAILURE, None))

