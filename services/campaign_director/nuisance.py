"""Nuisance (abandoned-call) rate of each active job over a sliding window, and its alarm.

Counts come from ``attempts`` completed in the window (the database clock decides the window); the pure
:func:`pom_ha.domain.nuisance.decide_alarm` says whether the alarm changes state, so a rate that stays
high raises one alarm row, not one per cycle. While no Common CD is up nothing is computed (the guide's
behaviour); the first master after the gap computes over the whole window again.
"""

from __future__ import annotations

from datetime import timedelta

from pom_ha.domain.attempts import SYSTEM_CODES, CompletionCode
from pom_ha.domain.nuisance import AlarmAction, NuisanceAlarmPolicy, NuisanceRate, decide_alarm
from services.campaign_director.context import TermContext
from services.campaign_director.jobs import JobDuties

# a range scan of attempts_completed_window (migration 0005) per active job
SQL_COUNTS = """
SELECT a.job_id, a.code, count(*) AS n
  FROM attempts a
 WHERE a.job_id = ANY(ARRAY(SELECT id FROM jobs WHERE state IN ('Filter in Progress', 'Running', 'Paused', 'Stopping')))
   AND a.state = 'completed' AND a.completed_at >= $1 AND a.completed_at < $2
 GROUP BY a.job_id, a.code
"""


class NuisanceDuties:
    def __init__(self, ctx: TermContext, jobs: JobDuties) -> None:
        self.ctx = ctx
        self.jobs = jobs
        s = ctx.settings
        self.policy = NuisanceAlarmPolicy(cap=s.nuisance_cap, min_live_answers=s.nuisance_min_live_answers)
        self.window = timedelta(seconds=s.nuisance_window_s)
        self.latest: dict[int, NuisanceRate] = {}

    async def compute(self) -> int:
        end = await self.ctx.db_now()
        start = end - self.window
        per_job: dict[int, dict[str, int]] = {}
        for r in await self.ctx.fetch(SQL_COUNTS, start, end + timedelta(microseconds=1)):
            per_job.setdefault(int(r["job_id"]), {})[r["code"]] = int(r["n"])
        if not per_job:
            return 0
        custom: dict[int, list[CompletionCode]] = {}
        for r in await self.ctx.fetch(
            "SELECT j.id, j.campaign_id, c.definition FROM jobs j JOIN campaigns c ON c.id = j.campaign_id"
            " WHERE j.id = ANY($1::bigint[])", list(per_job),
        ):
            definition = self.jobs.definition(int(r["campaign_id"]), r["definition"])
            custom[int(r["id"])] = definition.custom_completion_codes() if definition else []
        open_alarms = {int(r["job_id"]) for r in await self.ctx.fetch(
            "SELECT job_id FROM cd_alarms WHERE kind = 'nuisance' AND cleared_at IS NULL AND job_id IS NOT NULL")}
        for job_id, counts in per_job.items():
            codes = {**SYSTEM_CODES, **{c.name: c for c in custom.get(job_id, [])}}
            live = sum(n for name, n in counts.items() if name in codes and codes[name].is_live_answer)
            nuisance = counts.get(CompletionCode.NUISANCE.name, 0)
            rate = NuisanceRate(start, end + timedelta(microseconds=1), nuisance, live)
            self.latest[job_id] = rate
            decision = decide_alarm(rate, self.policy, active=job_id in open_alarms)
            detail = {"nuisance": nuisance, "live_answers": live, "rate": rate.rate,
                      "window_s": self.window.total_seconds(), "cap": self.policy.cap}
            if decision.action is AlarmAction.RAISE:
                await self.ctx.raise_alarm("nuisance", job_id, f"job {job_id}: {decision.reason}", detail)
            elif decision.action is AlarmAction.CLEAR:
                await self.ctx.clear_alarm("nuisance", job_id, decision.reason)
        return len(per_job)
