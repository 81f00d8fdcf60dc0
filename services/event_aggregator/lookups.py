"""The aggregator's PostgreSQL reads for one batch: jobs, contacts (through the job's list) and attempts
rows, three queries whatever the batch size. Read-only: the aggregator writes nothing to the database."""

from __future__ import annotations

import json
from typing import Any

from pom_ha.events.models import ContactData
from services.event_aggregator.join import DialRow, JobRow, Lookups, Needs

SQL_JOBS = "SELECT id, campaign_id, list_id, zone FROM jobs WHERE id = ANY($1::bigint[])"
SQL_CONTACTS = """
SELECT c.list_id, c.contact_id, c.phone, c.timezone, c.custom
FROM unnest($1::bigint[], $2::text[]) AS w(job_id, contact_id)
JOIN jobs j ON j.id = w.job_id
JOIN contacts c ON c.list_id = j.list_id AND c.contact_id = w.contact_id
"""
SQL_DIALS = """
SELECT a.job_id, a.contact_id, a.attempt_no, a.created_at, a.call_id
FROM unnest($1::bigint[], $2::text[], $3::int[]) AS w(job_id, contact_id, attempt_no)
JOIN attempts a ON a.job_id = w.job_id AND a.contact_id = w.contact_id AND a.attempt_no = w.attempt_no
"""


async def fetch_lookups(pool: Any, needs: Needs, timeout_s: float, jobs_cache: dict[int, JobRow]) -> Lookups:
    """The facts ``needs`` asks for. Job rows are cached (a job's campaign, list and zone never change)."""
    out = Lookups()
    missing_jobs = [j for j in needs.job_ids if j not in jobs_cache]
    if not (missing_jobs or needs.contacts or needs.dials):
        out.jobs = {j: jobs_cache[j] for j in needs.job_ids}
        return out
    async with pool.acquire(timeout=timeout_s) as conn:
        if missing_jobs:
            for r in await conn.fetch(SQL_JOBS, missing_jobs, timeout=timeout_s):
                jobs_cache[int(r["id"])] = JobRow(int(r["id"]), int(r["campaign_id"]), int(r["list_id"]), r["zone"])
        if needs.contacts:
            pairs = sorted(needs.contacts)
            rows = await conn.fetch(SQL_CONTACTS, [p[0] for p in pairs], [p[1] for p in pairs], timeout=timeout_s)
            for r in rows:
                custom = r["custom"]
                out.contacts[(int(r["list_id"]), r["contact_id"])] = ContactData(
                    list_id=int(r["list_id"]), phone=r["phone"], timezone=r["timezone"],
                    custom=json.loads(custom) if isinstance(custom, str) else dict(custom or {}))
        if needs.dials:
            dials = sorted(needs.dials)
            rows = await conn.fetch(SQL_DIALS, [d[0] for d in dials], [d[1] for d in dials], [d[2] for d in dials],
                                    timeout=timeout_s)
            for r in rows:
                out.dials[(int(r["job_id"]), r["contact_id"], int(r["attempt_no"]))] = DialRow(
                    r["created_at"], r["call_id"])
    out.jobs = {j: jobs_cache[j] for j in needs.job_ids if j in jobs_cache}
    return out
