"""Campaign post-processing: a result summary for every ended job, resuming where it stopped.

Each ended job gets one ``cd_job_results`` row (final state, contacts, attempts, attempts per completion
code, run time), written by one fenced statement that also cannot write it twice (``ON CONFLICT DO
NOTHING``). The work list is "ended jobs without a row", so a master cut off mid-way leaves exactly the
unprocessed jobs for the next one: post-processing resumes from where it stopped (the guide's behaviour).
"""

from __future__ import annotations

from services.campaign_director.context import TermContext

SQL_PENDING = """
SELECT j.id FROM jobs j LEFT JOIN cd_job_results r ON r.job_id = j.id
 WHERE j.state IN ('Completed', 'Stopped') AND r.job_id IS NULL ORDER BY j.id LIMIT $1
"""

SQL_RESULT = """
INSERT INTO cd_job_results (job_id, ended_state, contacts_total, contacts_done, attempts, codes, run_seconds, epoch)
SELECT j.id, j.state,
       (SELECT count(*) FROM job_contacts jc WHERE jc.job_id = j.id AND jc.state <> 'filtered_out'),
       (SELECT count(*) FROM job_contacts jc WHERE jc.job_id = j.id AND jc.state = 'done'),
       (SELECT count(*) FROM attempts a WHERE a.job_id = j.id),
       coalesce((SELECT jsonb_object_agg(code, n) FROM (SELECT a.code, count(*) AS n FROM attempts a
                  WHERE a.job_id = j.id AND a.code IS NOT NULL GROUP BY a.code) c), '{}'::jsonb),
       EXTRACT(EPOCH FROM (j.ended_at - j.started_at)),
       $2
  FROM jobs j WHERE j.id = $1 AND j.state IN ('Completed', 'Stopped') AND {fence}
ON CONFLICT (job_id) DO NOTHING
"""


class PostProcessing:
    def __init__(self, ctx: TermContext, batch: int = 50) -> None:
        self.ctx = ctx
        self.batch = batch

    async def run(self) -> int:
        done = 0
        for r in await self.ctx.fetch(SQL_PENDING, self.batch):
            if await self.ctx.execute(SQL_RESULT, int(r["id"]), self.ctx.epoch):
                done += 1
                self.ctx.log.info("job post-processed", job_id=int(r["id"]))
        return done
