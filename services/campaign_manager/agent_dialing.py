"""The agent-based dial strategy (preview / progressive / predictive pacing) on the dial loop's skeleton.

Every tick the zone's availability and the job's agents are read (``agent_zone_status``, ``agents``) and the
pacer grants dials (previews for preview pacing) from them; nothing new is dialed while the zone has no Agent
Manager master. Beside the loop, one task hands live answers to free agents, follows the Agent Manager's results
of every offer, dials the previews an agent accepted and tells an agent what became of its preview's dial
(:mod:`.agent_link` is the PostgreSQL side of all this).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any

from pom_ha.domain.attempts import CompletionCode
from pom_ha.domain.campaigns import CampaignDefinition
from pom_ha.domain.pacing import AgentView, Pacer, PacingKind, PredictivePacer, PreviewPacer
from pom_ha.domain.stats import JobStats
from services.campaign_manager.agent_link import AgentLink, Offer
from services.campaign_manager.completions import DB_ERRORS, Completion
from services.campaign_manager.decisions import NOT_DIALED_CODES, attempt_id
from services.campaign_manager.dial_loop import DialLoop, JobPorts
from services.campaign_manager.job_store import NewAttempt

OFFER_TIMEOUT_S = 60.0  # an offer no AM applied within this long (no master for the zone) is abandoned
OFFER_TRIES = 3  # a live answer refused by the AM (its agent changed state meanwhile) goes to another agent
LIVE = CompletionCode.ANSWER_HUMAN.name


class AgentDialing(DialLoop):
    tick_s = 0.1

    def __init__(self, job: JobPorts, link: AgentLink) -> None:
        super().__init__(job)
        self.link = link
        self.pacer: Pacer | None = None
        self.preview = False
        self.counts: collections.Counter[str] = collections.Counter()
        self._view: AgentView | None = None
        self._zone_waiting = False
        self._answers: collections.deque[Completion] = collections.deque()  # live answers waiting for an agent
        self._answered: dict[str, Completion] = {}  # call id -> the live answer an offer is out for
        self._phones: dict[tuple[str, int], str] = {}
        self._previews: dict[str, tuple[NewAttempt, Offer | None, str | None]] = {}  # call -> (attempt, offer, agent)
        self._preview_dialed: set[str] = set()
        self._followups: collections.deque[tuple[str, str, str, tuple[str, int], Completion]] = collections.deque()
        self._wake = asyncio.Event()

    # ---- the strategy ----------------------------------------------------------------------------------------
    async def prepare(self, definition: CampaignDefinition) -> None:
        pacer = definition.pacer()
        if isinstance(pacer, PredictivePacer):
            dialed, live, abandoned = await self.link.day_counts(list(NOT_DIALED_CODES))
            pacer.seed(attempts=dialed, live_answers=live, abandons=abandoned)
            self.log.info("predictive pacing", abandon_cap=pacer.abandon_cap, max_ratio=pacer.max_ratio,
                          day_attempts=dialed, day_live_answers=live, day_abandons=abandoned)
        self.pacer = pacer
        self.preview = definition.pacing.kind is PacingKind.PREVIEW

    async def ready(self, now: float) -> bool:
        link, pacer = self.link, self.pacer
        view = self._view = await link.view()
        if isinstance(pacer, PredictivePacer):
            for seconds in link.handle_times:
                pacer.record_handle_time(seconds)
        link.handle_times.clear()
        if not view.available:
            if not self._zone_waiting:
                self.log.warning("dialing waits: the zone has no Agent Manager master", zone=link.zone)
                self.counts["zone_unavailable_waits"] += 1
            self._zone_waiting = True
            return False
        if self._zone_waiting:
            self.log.info("zone available again, dialing goes on", zone=link.zone)
            self._zone_waiting = False
        return await self.media_ready(now)

    def permits(self, now: float, stats: JobStats) -> int:
        assert self.pacer is not None and self._view is not None
        return self.pacer.permits(now, self._ringing(), stats, self._view)

    def refund(self, n: int) -> None:
        assert self.pacer is not None
        self.pacer.refund(n)

    async def started(self, a: NewAttempt) -> None:
        self._phones[(a.contact_id, a.attempt_no)] = a.phone
        if self.preview:
            await self._offer_preview(a)
        else:
            await super().started(a)

    def _ringing(self) -> int:
        """Dials placed and not yet answered or ended (a pacer's ``in_flight``): attempts in flight less
        the live answers waiting for an agent and the previews not dialed yet."""
        waiting = len(self._answers) + len(self._answered)
        previews = sum(1 for call in self._previews if call not in self._preview_dialed)
        return max(0, len(self.job.in_flight) - waiting - previews)

    # ---- outcomes ---------------------------------------------------------------------------------------------
    def take_outcome(self, completion: Completion) -> bool:
        """An outcome that needs an agent (a live answer, a preview's dial ending): queued for the hand-off task.
        False: an ordinary outcome, for the writer."""
        key = (completion.contact_id, completion.attempt_no)
        call = attempt_id(self.job.job_id, *key)
        preview = self._previews.get(call)
        if preview is not None and preview[2] is not None:
            # a preview's dial ended: its agent (Dialing) talks to the person or wraps the call up
            event = "answered" if completion.code.name == LIVE else "released"
            self._followups.append((event, preview[2], call, key, completion))
            self._wake.set()
            return True
        if completion.code.name == LIVE:
            # a person answered: the attempt ends once an agent has the call (or none could take it)
            self._answers.append(completion)
            self._wake.set()
            return True
        return False

    def recorded(self, done: list[tuple[str, int, str, int | None]]) -> None:
        """Outcomes recorded: a predictive pacer learns its answer and abandon rates from them."""
        pacer = self.pacer
        if isinstance(pacer, PredictivePacer):
            for _c, _n, code, _ms in done:
                if code in NOT_DIALED_CODES or code == CompletionCode.CALL_FAILOVER.name:
                    continue
                live = code in (LIVE, CompletionCode.NUISANCE.name)
                pacer.record(live=live, abandoned=code == CompletionCode.NUISANCE.name)
            self.job.metrics.pacing(self.job.job_id, pacer.abandon_rate, pacer.abandon_cap)

    def info(self) -> dict[str, Any]:
        """For /health: the agent side of the job."""
        info: dict[str, Any] = {"agents": {**self.link.info(), **dict(self.counts)}}
        pacer = self.pacer
        if isinstance(pacer, PredictivePacer):
            info["agents"].update(abandon_cap=pacer.abandon_cap, abandon_rate=pacer.abandon_rate,
                                  answer_rate=round(pacer.answer_rate, 4), budget=pacer.budget)
        return info

    def _abandon(self, completion: Completion, why: str) -> None:
        """A live answer no agent took: recorded NUISANCE (counted against the abandon cap)."""
        self.counts["abandoned"] += 1
        if self.counts["abandoned"] <= 5 or self.counts["abandoned"] % 100 == 0:
            self.log.info("live answer abandoned (NUISANCE)", contact=completion.contact_id, why=why,
                          abandoned=self.counts["abandoned"])
        self.job.record(completion.contact_id, completion.attempt_no, CompletionCode.NUISANCE, completion.duration_ms)

    # ---- the hand-off task --------------------------------------------------------------------------------------
    async def _offer_preview(self, a: NewAttempt) -> None:
        """A preview of ``a`` to a free agent; its DIAL leaves only once the agent accepted it."""
        offer = await self.link.offer("preview_offered", (a.contact_id, a.attempt_no), a.call_id, a.phone)
        if offer is None:  # no agent any more: not dialed, due again soon
            self.job.not_dialed(a)
            return
        self._previews[a.call_id] = (a, offer, None)
        if isinstance(self.pacer, PreviewPacer):
            self.pacer.offered(a.call_id)
        self.counts["previews_offered"] += 1

    async def hand_off(self) -> None:
        """Live answers to free agents, the AM's results of every offer, previews accepted -> DIAL, a
        preview's dial outcome -> its agent; until cancelled (FenceLost when the job moved)."""
        delay = 0.05
        while True:
            self._wake.clear()
            if self.job.writer is None:
                await asyncio.sleep(0.05)
                continue
            try:
                await self._step()
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
                        await self._wake.wait()

    async def _step(self) -> None:
        link, job = self.link, self.job
        assert job.writer is not None
        while self._answers:
            completion = self._answers[0]
            key = (completion.contact_id, completion.attempt_no)
            call = attempt_id(job.job_id, *key)
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
            if isinstance(self.pacer, PreviewPacer):
                self.pacer.ended(call)
            job.writer.offer(completion)
        for res in await link.results():
            await self._offer_result(res.offer, res.agent_id, res.result, res.reoffered_from)
        if self._previews:
            await self._watch_previews()
        now = time.monotonic()
        for offer in [o for o in link.pending.values() if now - o.started > OFFER_TIMEOUT_S]:
            if await link.cancel(offer, f"abandoned: no Agent Manager applied it within {OFFER_TIMEOUT_S:g} s"):
                link.pending.pop(offer.ref, None)
                link.reserved.pop(offer.agent_id, None)
                await self._offer_result(offer, offer.agent_id, "closed: offer timed out", None)

    async def _offer_result(self, offer: Offer, agent: str, result: str, reoffered_from: str | None) -> None:
        job = self.job
        assert job.writer is not None
        ok = result.startswith("ok")
        if reoffered_from:
            self.counts["reoffered_by_am"] += 1
        if offer.event == "offered":
            completion = self._answered.pop(offer.ref, None)
            if completion is None:
                return
            if ok:
                self.counts["handed_to_agents"] += 1
                job.writer.offer(completion)  # ANSWER_HUMAN: a person answered and an agent has the call
                return
            if result.startswith("refused") and offer.tries < OFFER_TRIES:
                try:
                    again = await self.link.offer("offered", offer.key, offer.ref, offer.phone, exclude={agent},
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
            if isinstance(self.pacer, PreviewPacer):
                self.pacer.cancelled(offer.ref)
            job.not_dialed(entry[0])

    async def _watch_previews(self) -> None:
        """Previews an agent holds: accepted (the agent went Dialing on it) -> the DIAL leaves; cancelled
        (the agent is off it) -> not dialed, the contact is due again."""
        held = {call: agent for call, (_a, _o, agent) in self._previews.items()
                if agent is not None and call not in self._preview_dialed}
        if not held:
            return
        state = await self.link.agent_calls(sorted(set(held.values())))
        pacer = self.pacer
        for call, agent in held.items():
            call_state, agent_call = state.get(agent, ("Idle", None))
            a = self._previews[call][0]
            if agent_call == call and call_state == "Dialing":
                if isinstance(pacer, PreviewPacer):
                    pacer.accepted(call)
                    pacer.dialed(call)
                self._preview_dialed.add(call)
                self.counts["previews_accepted"] += 1
                self.job.spawn(self.send(a), f"dial-{call}")
            elif agent_call != call:
                self._previews.pop(call, None)
                if isinstance(pacer, PreviewPacer):
                    pacer.cancelled(call)
                self.counts["previews_cancelled"] += 1
                self.job.not_dialed(a)
