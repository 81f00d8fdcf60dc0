"""The Common CD's job duties: allocate, reallocate, apply operator commands, check finish criteria, unassign.

Contract with the Campaign Manager (services/campaign_manager):

* The CD gives a job to a CM with :func:`pom_ha.ha.assignments.assign` under its own lease fence
  (``ha_assignment`` service ``campaign_manager``, item ``job:<id>``). A non-terminal job with no owner,
  or whose owner left (member STOPPED, replaced, or not seen for ``cm_dead_after_ms``), is (re)allocated
  to the least busy RUNNING CM; the new epoch fences the old owner out.
* The CM runs the job: Queued -> Filter in Progress -> Running, writes job_contacts and attempts under
  the assignment epoch, and when every contact is done moves the job to Stopping/ending Completed itself.
  A job in Stopping is finished by its CM (state := its ending).
* The CD moves a job to Stopping (ending Completed) when its end time or a completion-code goal is
  reached, and applies the operator's pause / resume / stop requests (``job_commands``).
* The CD removes the assignment of a job that reached Completed or Stopped.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from pom_ha.cache import JobEntry, JobStartRefused
from pom_ha.campaign.admin import COMMAND_EVENTS, job_status
from pom_ha.campaign.allocation import CMCandidate, allocate
from pom_ha.campaign.fenced_tx import fenced_transaction
from pom_ha.domain.campaigns import CampaignDefinition, InvalidCampaign, validate_campaign
from pom_ha.domain.jobs import InvalidTransition, JobEvent, JobState, transition
from pom_ha.domain.stats import JobStats
from pom_ha.domain.strategy import FinishCriteria
from pom_ha.events import EventPublishError
from pom_ha.events import JobEvent as JobStateEvent
from pom_ha.ha.assignments import assign, unassign
from pom_ha.ha.store import Holder
from services.campaign_director.context import TermContext

CM_SERVICE = "campaign_manager"

SQL_LIVE_CMS = """
SELECT m.server, m.instance_id, m.load,
       (SELECT count(*) FROM ha_assignment a WHERE a.service = 'campaign_manager'
                                              AND a.owner_instance = m.instance_id) AS assigned
  FROM ha_member m
 WHERE m.service = 'campaign_manager' AND m.state = 'RUNNING' AND m.seen_at > now() - $1::interval
 ORDER BY m.server
"""

SQL_JOBS_WITHOUT_LIVE_OWNER = """
SELECT j.id, j.state, j.campaign_id, j.zone, a.owner_server, a.owner_instance, a.epoch
  FROM jobs j
  LEFT JOIN ha_assignment a ON a.service = 'campaign_manager' AND a.item = 'job:' || j.id
 WHERE j.state NOT IN ('Completed', 'Stopped')
   AND (a.item IS NULL OR NOT EXISTS (
        SELECT 1 FROM ha_member m
         WHERE m.service = 'campaign_manager' AND m.instance_id = a.owner_instance
           AND m.state = 'RUNNING' AND m.seen_at > now() - $1::interval))
 ORDER BY j.id
"""

SQL_ENDED_ASSIGNED = """
SELECT a.item FROM ha_assignment a JOIN jobs j ON a.item = 'job:' || j.id
 WHERE a.service = 'campaign_manager' AND j.state IN ('Completed', 'Stopped')
"""


class JobDuties:
    def __init__(self, ctx: TermContext) -> None:
        self.ctx = ctx
        self._definitions: dict[int, CampaignDefinition | None] = {}

    # ---- allocation -----------------------------------------------------------------------------------
    async def allocate_round(self) -> int:
        """Allocate owner-less jobs and move the jobs of dead CMs; returns how many were (re)assigned."""
        dead_after = timedelta(milliseconds=self.ctx.settings.cm_dead_after_ms)
        jobs = await self.ctx.fetch(SQL_JOBS_WITHOUT_LIVE_OWNER, dead_after)
        moved = 0
        if jobs:
            cms = [CMCandidate(r["server"], r["instance_id"], int(r["load"]), int(r["assigned"]))
                   for r in await self.ctx.fetch(SQL_LIVE_CMS, dead_after)]
            if not cms:
                return 0
            by_id = {int(r["id"]): r for r in jobs}
            pool = await self.ctx.pool()
            async with pool.acquire() as conn:
                for job_id, cm in allocate(by_id, cms):
                    prev = by_id[job_id]
                    starting = prev["owner_instance"] is None and prev["state"] == "Queued"
                    if starting and not await self._cache_admits(prev):
                        continue
                    owner = Holder(cm.server, cm.instance)
                    done = await assign(conn, self.ctx.fence, CM_SERVICE, f"job:{job_id}", owner)
                    if done is None:
                        continue
                    moved += 1
                    if prev["owner_instance"] is None:
                        self.ctx.log.info("job allocated", job_id=job_id, cm=cm.server, cm_busy=cm.busy,
                                          assignment_epoch=done.epoch, job_state=prev["state"])
                    else:
                        decision = (f"job {job_id} reallocated from Campaign Manager {prev['owner_server']} "
                                    f"(gone) to {cm.server}")
                        self.ctx.log.info(decision, job_id=job_id, assignment_epoch=done.epoch)
                        await self.ctx.event("job_reallocated", decision, {
                            "job_id": job_id, "from_server": prev["owner_server"],
                            "from_instance": prev["owner_instance"], "to_server": cm.server,
                            "to_instance": cm.instance, "assignment_epoch": done.epoch,
                        })
        for r in await self.ctx.fetch(SQL_ENDED_ASSIGNED):
            pool = await self.ctx.pool()
            async with pool.acquire() as conn:
                if await unassign(conn, self.ctx.fence, CM_SERVICE, r["item"]):
                    self.ctx.log.info("ended job unassigned", item=r["item"])
        return moved

    async def _cache_admits(self, job: Any) -> bool:
        """A Queued job starts only once the cache holds it (the guide: with the cache service down "a new job
        cannot start"). Refused: the job stays Queued and one ``job_start_refused`` alarm per job carries the
        cache's message; it is tried again next round and the alarm cleared when it starts."""
        cache = self.ctx.sinks.cache
        if cache is None:
            return True
        job_id = int(job["id"])
        try:
            await cache.start_job(JobEntry(job_id, int(job["campaign_id"]), str(job["zone"]),
                                           JobState.FILTER_IN_PROGRESS.value))
        except JobStartRefused as exc:
            await self.ctx.raise_alarm("job_start_refused", job_id, str(exc), {"rebuilding": exc.rebuilding})
            return False
        # job starts are rare: clearing unconditionally also ends an alarm a previous master raised
        await self.ctx.clear_alarm("job_start_refused", job_id, "the cache is back: the job starts")
        return True

    # ---- operator commands --------------------------------------------------------------------------------
    async def apply_commands(self) -> int:
        rows = await self.ctx.fetch(
            "SELECT c.id, c.job_id, c.command, j.state, j.ending, j.campaign_id, k.name AS campaign,"
            " coalesce(k.definition->>'org', 'Default') AS org"
            " FROM job_commands c JOIN jobs j ON j.id = c.job_id JOIN campaigns k ON k.id = j.campaign_id"
            " WHERE c.state = 'pending' ORDER BY c.id LIMIT 100"
        )
        pool = await self.ctx.pool()
        for r in rows:
            event = COMMAND_EVENTS[r["command"]]
            try:
                after = transition(job_status(r["state"], r["ending"]), event)
            except InvalidTransition as exc:
                await self.ctx.execute(
                    "UPDATE job_commands SET state = 'refused', result = $2, applied_at = now(), epoch = $3"
                    " WHERE id = $1 AND state = 'pending' AND {fence}", r["id"], str(exc), self.ctx.epoch,
                )
                self.ctx.log.info("job command refused", job_id=r["job_id"], command=r["command"], reason=str(exc))
                continue
            async with pool.acquire() as conn, fenced_transaction(conn, self.ctx.fence):
                changed = await conn.fetchval(
                    "UPDATE jobs SET state = $2, ending = $3, state_reason = $4, updated_at = now(),"
                    " ended_at = CASE WHEN $2 IN ('Completed', 'Stopped') THEN now() ELSE ended_at END"
                    " WHERE id = $1 AND state = $5 RETURNING id",
                    r["job_id"], after.state.value, after.ending.value if after.ending else None,
                    f"operator {r['command']}", r["state"],
                )
                result = (f"{r['state']} -> {after.state.value}" if changed is not None
                          else "job state changed meanwhile; command not applied")
                await conn.execute(
                    "UPDATE job_commands SET state = $2, result = $3, applied_at = now(), epoch = $4 WHERE id = $1",
                    r["id"], "applied" if changed is not None else "refused", result, self.ctx.epoch,
                )
            self.ctx.log.info("job command applied", job_id=r["job_id"], command=r["command"], result=result)
            if changed is not None:  # after the commit
                await self.publish_job(int(r["job_id"]), r["org"], int(r["campaign_id"]), r["campaign"], r["state"],
                                       after.state.value, f"operator {r['command']}")
        return len(rows)

    async def publish_job(self, job_id: int, org: str, campaign_id: int, campaign: str | None, previous: str,
                          state: str, reason: str) -> None:
        """A JOB event with this term's epoch, after the state change committed; never waits for Kafka (a
        full queue or a failed delivery is counted in the publisher / ``events_failed``)."""
        publisher = self.ctx.sinks.events
        if publisher is None:
            return
        try:
            event = JobStateEvent(org=org, job_id=job_id, campaign_id=campaign_id, campaign_name=campaign,
                                  state=state, previous_state=previous, reason=reason)
            await publisher.publish(event, epoch=self.ctx.epoch, wait_for_room=False)
        except (EventPublishError, ValueError) as exc:
            self.ctx.sinks.events_failed += 1
            self.ctx.log.warning("JOB event not published", job_id=job_id, error=str(exc))

    # ---- finish criteria ----------------------------------------------------------------------------------
    def definition(self, campaign_id: int, raw: Any) -> CampaignDefinition | None:
        if campaign_id not in self._definitions:
            try:
                data = json.loads(raw) if isinstance(raw, str) else raw
                self._definitions[campaign_id] = validate_campaign(data)
            except (InvalidCampaign, ValueError) as exc:
                self.ctx.log.error("stored campaign definition is invalid", campaign_id=campaign_id, error=str(exc))
                self._definitions[campaign_id] = None
        return self._definitions[campaign_id]

    async def check_finish(self) -> int:
        """Move active jobs whose finish criteria are met to Stopping (ending Completed); a Queued one ends
        at once. Returns how many were finished."""
        rows = await self.ctx.fetch(
            "SELECT j.id, j.state, j.campaign_id, c.definition, now() AS now,"
            " (SELECT count(*) FROM job_contacts jc WHERE jc.job_id = j.id AND jc.state <> 'filtered_out') AS total,"
            " (SELECT count(*) FROM job_contacts jc WHERE jc.job_id = j.id AND jc.state = 'done') AS done"
            " FROM jobs j JOIN campaigns c ON c.id = j.campaign_id"
            " WHERE j.state IN ('Queued', 'Filter in Progress', 'Running', 'Paused') ORDER BY j.id"
        )
        if not rows:
            return 0
        counts: dict[int, dict[str, int]] = {}
        with_goals = [int(r["id"]) for r in rows
                      if (d := self.definition(int(r["campaign_id"]), r["definition"])) and d.finish.code_goals]
        if with_goals:  # counting codes reads every attempt of the job: only for jobs that have goals
            for r in await self.ctx.fetch(
                "SELECT job_id, code, count(*) AS n FROM attempts WHERE job_id = ANY($1::bigint[])"
                " AND state = 'completed' GROUP BY job_id, code", with_goals,
            ):
                counts.setdefault(int(r["job_id"]), {})[r["code"]] = int(r["n"])
        finished = 0
        for r in rows:
            definition = self.definition(int(r["campaign_id"]), r["definition"])
            if definition is None:
                continue
            verdict = finish_verdict(definition.finish_criteria(), r["state"], int(r["total"]), int(r["done"]),
                                     counts.get(int(r["id"]), {}), r["now"])
            if verdict is None:
                continue
            after = transition(job_status(r["state"], None), JobEvent.FINISH_CRITERIA_MET)
            result = await self.ctx.execute(
                "UPDATE jobs SET state = $2, ending = $3, state_reason = $4, updated_at = now(),"
                " ended_at = CASE WHEN $2 = 'Completed' THEN now() ELSE ended_at END"
                " WHERE id = $1 AND state = $5 AND {fence}",
                int(r["id"]), after.state.value, after.ending.value if after.ending else None,
                f"finish criteria met: {verdict}", r["state"],
            )
            if result:
                finished += 1
                await self.publish_job(int(r["id"]), definition.org, int(r["campaign_id"]), definition.name,
                                       r["state"], after.state.value, f"finish criteria met: {verdict}")
                self.ctx.log.info("finish criteria met", job_id=int(r["id"]), reason=verdict,
                                  job_state=f"{r['state']} -> {after.state.value}")
        return finished


def finish_verdict(
    criteria: FinishCriteria, state: str, total: int, done: int, code_counts: dict[str, int], now: datetime
) -> str | None:
    """Why the job must finish now, or ``None``. "All contacts done" is judged only once the job's contacts
    were filtered (Running or Paused): before that there are none, which would look like all done."""
    filtered = JobState(state) in (JobState.RUNNING, JobState.PAUSED)
    if not filtered:
        if criteria.end_time is None and not criteria.code_goals:
            return None
        criteria = FinishCriteria(False, criteria.end_time, dict(criteria.code_goals))
    stats = JobStats(max(total, done), done, code_counts)
    met, reason = criteria.is_met(stats, now)
    return reason if met else None
