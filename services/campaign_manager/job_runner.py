"""One job on one Campaign Manager, under one assignment epoch: its lifecycle. Dialing is a strategy on one loop
skeleton (:mod:`.dial_loop`: unattended; :mod:`.agent_dialing`: preview / progressive / predictive).

    (takeover) resolve the previous owner's in-flight attempts as CALL_FAILOVER
    Queued -> Filter in Progress (job_contacts from the list, fenced) -> Running (dial loop)
    Running: paced; each due contact is judged by the Rule Engine; allowed ones get their attempt row and
             their contact 'dialing' in ONE fenced transaction, then the DIAL leaves
    Paused: dials nothing (outcomes are still recorded)
    Stopping: dials nothing new; when no attempt of the job is in flight, the job takes its ``ending``

A runner stops when its job ends, when its fence fails (the job moved: :class:`FenceLost`), or when the
daemon cancels it. Its tasks run in a :class:`~pom_ha.ha.term.MasterTerm` of the job's assignment epoch (ended
when the runner stops; a task that crashes makes the runner stop, and the daemon starts it again).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pom_ha.clients.rule_engine import RuleEngineClient
from pom_ha.domain.attempts import CompletionCode
from pom_ha.domain.campaigns import CampaignDefinition, InvalidCampaign, validate_campaign
from pom_ha.domain.jobs import InvalidTransition, JobState, JobStatus, transition
from pom_ha.domain.jobs import JobEvent as JobTransition
from pom_ha.domain.strategy import RetryStrategy
from pom_ha.ha.term import MasterTerm
from pom_ha.media.client import MediaClient
from pom_ha.media.protocol import Outcome
from services.campaign_manager.agent_dialing import AgentDialing
from services.campaign_manager.agent_link import AgentLink
from services.campaign_manager.completions import DB_ERRORS, Completion, CompletionWriter, InFlight, resolve_in_flight
from services.campaign_manager.decisions import platform_code
from services.campaign_manager.dial_loop import DialLoop, JobPorts, RunnerOptions
from services.campaign_manager.job_store import FenceLost, JobStore, WriteConflict
from services.campaign_manager.metrics import CMMetrics
from services.campaign_manager.outbound import Outbound
from services.campaign_manager.runtime_control import RuntimeRefused

__all__ = ["JobRunner", "RunnerOptions"]

TERMINAL = (JobState.COMPLETED, JobState.STOPPED)
_WAITING = (JobState.QUEUED, JobState.PAUSED)


def _state(value: JobState | str) -> JobState:
    return value if isinstance(value, JobState) else JobState(value)


class JobRunner:
    def __init__(self, store: JobStore, *, rule_engine: RuleEngineClient, media: MediaClient, metrics: CMMetrics,
                 log: Any, options: RunnerOptions | None = None, outbound: Outbound | None = None) -> None:
        self.store = store
        self.job_id = store.job_id
        self.epoch = store.fence.epoch
        self.media = media
        self.metrics = metrics
        self.opts = options or RunnerOptions()
        self.log = log.bind(job=self.job_id, assignment_epoch=self.epoch)
        self.outbound = outbound
        self.state: JobState | None = None
        self.tasks = MasterTerm("campaign_manager", f"job-{self.job_id}", self.epoch, on_error=self._task_failed)
        self.job = JobPorts(store, rule_engine=rule_engine, media=media, metrics=metrics, log=self.log,
                            opts=self.opts, outbound=outbound, tasks=self.tasks, check=self._check,
                            set_state=self.set_state, list_read=self._list_read)
        self.dialing: DialLoop = DialLoop(self.job)  # the strategy, chosen by the campaign definition
        self._lost = False
        self._crashed: BaseException | None = None
        self._refilter = True  # a running job found at takeover goes through Filter in Progress first
        self._taken_running = False  # that Filter in Progress re-reads the list beside the dial loop
        self._catch_up: asyncio.Task[None] | None = None  # that re-read
        self._refilter_cause = "taken over"  # or "cache rebuilt" (services/campaign_manager/cache_link.py)
        self._campaign: tuple[int | None, str | None] = (None, None)

    # the job's shared state lives in its ports (the strategies read it there)
    @property
    def in_flight(self) -> InFlight:
        return self.job.in_flight

    @property
    def writer(self) -> CompletionWriter | None:
        return self.job.writer

    @property
    def pacing_rate(self) -> float | None:
        return self.job.pacing_rate

    @property
    def cache_link(self) -> Any:
        return self.job.cache_link

    @cache_link.setter
    def cache_link(self, link: Any) -> None:
        self.job.cache_link = link

    @property
    def active(self) -> bool:
        return self.state not in TERMINAL

    def agent_info(self) -> dict[str, Any]:
        """For /health: the agent side of an agent-based job (nothing for agentless jobs)."""
        return self.dialing.info()

    # ---- entry points ------------------------------------------------------------------------------------
    def offer(self, outcome: Outcome) -> None:
        """An outcome of this job under this epoch (the daemon checked both)."""
        writer = self.job.writer
        if writer is None:
            return
        completion = Completion(outcome.contact, outcome.attempt_no, platform_code(outcome.code, writer.custom),
                                outcome.duration_ms)
        if self.dialing.take_outcome(completion):
            return
        writer.offer(completion)

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
            self.dialing.close()
            self.tasks.end("runner stopped")
            await self.tasks.wait_tasks()

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
        return self.tasks.create_task(coro, name=name)

    def _task_failed(self, task: asyncio.Task[Any], exc: BaseException) -> None:
        if isinstance(exc, FenceLost):
            self._lost = True
        else:
            self.log.error("job runner task crashed", task=task.get_name(), exc_info=exc)
            self._crashed = exc

    def _check(self) -> None:
        if self._lost:
            raise FenceLost(f"job {self.job_id}: assignment epoch {self.epoch} no longer ours")
        if self._crashed is not None:  # the daemon logs it and starts the job's runner again
            raise RuntimeError(f"job {self.job_id}: a task of the runner crashed") from self._crashed

    def _list_read(self) -> bool:
        return self._catch_up is None or self._catch_up.done()

    # ---- states ------------------------------------------------------------------------------------------
    async def _definition(self) -> tuple[CampaignDefinition | None, int] | None:
        """The job's campaign (None: invalid, the job is stopped) and list; None: the job was deleted. The first
        call picks the dial strategy and resolves the previous owner's attempts."""
        info = await self.store.job()
        if info is None:
            return None
        self.job.list_id = info.list_id
        self.job.pacing_rate = info.pacing_rate
        definition: CampaignDefinition | None = None
        try:
            definition = validate_campaign(info.definition)
            self.job.org = definition.org
            self._campaign = (info.campaign_id, definition.name)
        except (InvalidCampaign, TypeError, ValueError) as exc:
            self.log.error("campaign definition invalid, the job is stopped", error=str(exc))
        if definition is not None and definition.pacing.kind.needs_agents and \
                not isinstance(self.dialing, AgentDialing):
            self.dialing = AgentDialing(self.job, AgentLink(self.store, info.zone))
            self._spawn(self.dialing.hand_off(), f"job-{self.job_id}-agents")
            self.log.info("agent-based job", pacing=definition.pacing.kind.value, zone=info.zone)
        if self.job.writer is None:
            if definition is None:  # in-flight attempts are still resolved, with the default strategy
                await self._take_over(RetryStrategy(), [])
            else:
                await self._take_over(definition.retry_strategy(), definition.custom_completion_codes())
        return definition, info.list_id

    async def _lifecycle(self) -> str:
        found = await self._definition()
        if found is None:
            return "job deleted"
        definition, list_id = found
        S = JobState
        while True:
            self._check()
            current = await self.store.state()
            if current is None:
                return "job deleted"
            state, ending = _state(current[0]), current[1]
            self.state = state
            if self._refilter and state is S.RUNNING:
                # the taker's view of the contacts is rebuilt before it dials (JobEvent.TAKEOVER; CACHE_REBUILT
                # of a Paused job, on resume)
                await self.set_state(S.RUNNING, S.FILTER_IN_PROGRESS, reason=f"{self._refilter_cause}, filtering again")
                self._refilter = False
                self._taken_running = True
                continue
            self._refilter = self._refilter and state in _WAITING
            if definition is None and state in (S.QUEUED, S.FILTER_IN_PROGRESS, S.RUNNING, S.PAUSED):
                await self.set_state(state, S.STOPPING, ending=S.STOPPED, reason="invalid campaign definition")
            elif state is S.QUEUED:
                await self.set_state(S.QUEUED, S.FILTER_IN_PROGRESS, reason="campaign manager filtering")
            elif state is S.FILTER_IN_PROGRESS and self._taken_running:
                # taken over while Running: its contacts were filtered by a previous owner and every attempt
                # in flight is resolved, so it dials again at once; the list is re-read beside the dial loop
                # (a scan of the whole list, seconds at 200,000 contacts on a busy database) and the job
                # cannot complete before that re-read has added what the list gained meanwhile
                await self.store.unstick()
                if self._catch_up is None or self._catch_up.done():
                    self._catch_up = self._spawn(self.dialing.add_missing(list_id), f"job-{self.job_id}-refilter")
                cause, self._refilter_cause = self._refilter_cause, "taken over"
                await self.set_state(S.FILTER_IN_PROGRESS, S.RUNNING,
                                     reason=f"{cause}: filtered, the list is re-read while dialing")
                self._taken_running = False
                self.log.info(f"job {cause} running, dialing again; the list is re-read meanwhile")
            elif state is S.FILTER_IN_PROGRESS:
                added = await self.store.filter_contacts(list_id)
                await self.set_state(S.FILTER_IN_PROGRESS, S.RUNNING, reason="filtered")
                self.log.info("contacts filtered, job running", added=added)
            elif state is S.RUNNING and definition is not None:
                await self.dialing.run(definition)
            elif state is S.PAUSED:
                await self._wait_while(S.PAUSED)
            elif state is S.STOPPING:
                await self._settle(_state(ending or S.STOPPED.value))
            else:
                self.log.info("job ended", state=state.value)
                return str(state.value)

    async def set_state(self, from_state: JobState | str, to_state: JobState | str, *,
                        ending: JobState | str | None = None, reason: str | None = None) -> bool:
        """The store's compare-and-set; a change that landed is published as a JOB event (after the commit).
        Also for services/campaign_manager/cache_link.py (CACHE_REBUILT)."""
        before, after = _state(from_state).value, _state(to_state).value
        changed = await self.store.set_state(before, after, ending=None if ending is None else _state(ending).value,
                                             reason=reason)
        if changed and self.job.cache_link is not None:
            self.job.cache_link.touch(self.job_id)
        if changed and self.outbound is not None:
            await self.outbound.job_state(self.job_id, self.epoch, self.job.org, campaign_id=self._campaign[0],
                                          campaign_name=self._campaign[1], previous=before, state=after,
                                          reason=reason)
        return changed

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
            if _state(state) in (JobState.STOPPING, *TERMINAL):
                raise RuntimeRefused(f"job {self.job_id} is {state}: its pacing rate cannot change")
            assert rate is not None
            old = self.job.pacing_rate
            await self.store.set_pacing_rate(rate)
            self.job.pacing_rate = rate
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
        if not await self.set_state(state, to_state, ending=after.ending,
                                     reason=f"operator {action} over ActiveMQ (request {request_id[:8]})"):
            raise RuntimeRefused(f"job {self.job_id} changed state meanwhile (was {state}); {action} not applied")
        return f"job {self.job_id}: {state} -> {to_state}"

    async def _take_over(self, strategy: RetryStrategy, custom: list[CompletionCode]) -> None:
        writer = CompletionWriter(self.store, strategy, custom, self.metrics, self.log, max_batch=self.opts.max_batch,
                                  on_done=self.in_flight.done, on_recorded=self._recorded)
        resolved = await resolve_in_flight(self.store, writer.strategy, writer.custom)
        self.job.writer = writer
        self._spawn(writer.run(), f"job-{self.job_id}-outcomes")
        self._spawn(self.dialing.watch_overdue(), f"job-{self.job_id}-overdue")
        self._spawn(self.dialing.claim_media([r[2] for r in resolved if r[2]]), f"job-{self.job_id}-claim")
        if resolved:
            # the previous owner's attempts end here: their RESULT events come from the taker
            await self._recorded([(r[0], r[1], CompletionCode.CALL_FAILOVER.name, None) for r in resolved])
            self.metrics.failover_resolved.inc(len(resolved))
            self.metrics.count("failover_resolved", len(resolved))
            owners = sorted({f"{r[3]}@{r[4]}" for r in resolved})
            self.log.info("took over job: in-flight attempts resolved as CALL_FAILOVER", count=len(resolved),
                          previous=owners)

    async def _recorded(self, done: list[tuple[str, int, str, int | None]]) -> None:
        self.dialing.recorded(done)
        if self.outbound is not None:
            await self.outbound.recorded(self.job_id, self.epoch, self.job.org, done)

    async def _wait_while(self, state: JobState) -> None:
        while True:
            self._check()
            await asyncio.sleep(self.opts.state_poll_s)
            current = await self.store.state()
            if current is None or current[0] != state.value:
                return

    async def _settle(self, ending: JobState) -> None:
        """Stopping: nothing new is dialed; once no attempt is in flight, the job takes its ending."""
        next_sweep = 0.0
        while True:
            self._check()
            if time.monotonic() >= next_sweep:
                await self.dialing.sweep()
                next_sweep = time.monotonic() + self.opts.sweep_s
            current = await self.store.state()
            if current is None or current[0] != JobState.STOPPING.value:
                return
            assert self.job.writer is not None
            if self.job.writer.idle and await self.store.in_flight_count() == 0:
                if await self.set_state(JobState.STOPPING, ending, ending=ending):
                    self.log.info("job settled", ending=ending.value)
                return
            await asyncio.sleep(0.05)
