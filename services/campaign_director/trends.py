"""Trend samples: the progress of every active job, one fenced row per job per period (``cd_job_trends``).

The POM Monitor's progress charts and multi-campaign summary read them. While no Common CD is up there are
no samples: the charts show the gap (the guide's "stale data"), and sampling resumes with the next master.
"""

from __future__ import annotations

from services.campaign_director.context import TermContext

# live answers: the system codes a person answered (the nuisance rate's denominator); custom codes are
# counted by the nuisance duty, which knows each campaign's definition
SQL_SAMPLE = """
INSERT INTO cd_job_trends (job_id, state, contacts_total, contacts_done, attempts, live_answers, nuisance, epoch)
SELECT j.id, j.state,
       (SELECT count(*) FROM job_contacts jc WHERE jc.job_id = j.id AND jc.state <> 'filtered_out'),
       (SELECT count(*) FROM job_contacts jc WHERE jc.job_id = j.id AND jc.state = 'done'),
       (SELECT count(*) FROM attempts a WHERE a.job_id = j.id),
       (SELECT count(*) FROM attempts a WHERE a.job_id = j.id AND a.code = ANY($1::text[])),
       (SELECT count(*) FROM attempts a WHERE a.job_id = j.id AND a.code = 'NUISANCE'),
       $2
  FROM jobs j
 WHERE j.state IN ('Filter in Progress', 'Running', 'Paused', 'Stopping') AND {fence}
"""


class TrendDuties:
    def __init__(self, ctx: TermContext, live_codes: list[str]) -> None:
        self.ctx = ctx
        self.live_codes = live_codes

    async def sample(self) -> int:
        result = await self.ctx.execute(SQL_SAMPLE, self.live_codes, self.ctx.epoch)
        return result.rows
