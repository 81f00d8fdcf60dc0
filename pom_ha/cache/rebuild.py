"""Rebuild the job caches from PostgreSQL after the whole cache was lost (and at a deployment's first start).

PostgreSQL is the truth: ``jobs`` gives each active job's state, ``job_contacts`` and ``attempts`` give its
counters (pom_ha/db/migrations/0004_campaigns.sql). The rebuild replays the guide's restore sequence in the
cache: a Running job is first published as *Filter in Progress* without statistics, and once its counters are
loaded as *Running* with them; a Paused job keeps its state with ``refilter`` set and no statistics — they
come back when it resumes (its CM calls :func:`refresh_job`). Other active jobs get their counters at once.

Idempotent: it only ever writes whole values computed from PostgreSQL, so running it twice (or two cache
services racing) leaves the same content. A lock entry in ``pom-meta`` (taken with put-if-absent, taken over
when older than ``lock_ttl_s``) keeps the cache services from all doing the same work at once. The last
write is the generation: until it exists, gated client operations are refused as "being rebuilt".
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from pom_ha.cache.client import OperationalCache
from pom_ha.cache.models import ALL_CACHES, GENERATION_KEY, JOBS, META, REBUILD_LOCK_KEY, JobCounters, JobEntry
from pom_ha.domain.jobs import JobState

log = structlog.get_logger("pom_ha.cache.rebuild")

ACTIVE_STATES = tuple(s.value for s in JobState if not s.is_terminal)

# One row per job: its state and counters. ``$1`` NULL = every active job, else those ids (any state).
SQL_JOBS = """
WITH chosen AS (
    SELECT id, campaign_id, zone, state FROM jobs
     WHERE ($1::bigint[] IS NULL AND state = ANY($2::text[])) OR id = ANY($1::bigint[])
), jc AS (
    SELECT job_id, count(*) AS total,
           count(*) FILTER (WHERE state = 'pending') AS pending,
           count(*) FILTER (WHERE state = 'dialing') AS dialing,
           count(*) FILTER (WHERE state = 'done') AS done,
           count(*) FILTER (WHERE state = 'filtered_out') AS filtered_out
      FROM job_contacts WHERE job_id IN (SELECT id FROM chosen) GROUP BY job_id
), att AS (
    SELECT job_id, count(*) AS total,
           count(*) FILTER (WHERE state = 'dialing') AS in_flight,
           count(*) FILTER (WHERE state = 'completed') AS completed
      FROM attempts WHERE job_id IN (SELECT id FROM chosen) GROUP BY job_id
), codes AS (
    SELECT job_id, jsonb_object_agg(code, n) AS by_code
      FROM (SELECT job_id, code, count(*) AS n FROM attempts
             WHERE job_id IN (SELECT id FROM chosen) AND state = 'completed' GROUP BY job_id, code) c
     GROUP BY job_id
)
SELECT j.id, j.campaign_id, j.zone, j.state,
       coalesce(jc.total, 0) AS contacts_total, coalesce(jc.pending, 0) AS contacts_pending,
       coalesce(jc.dialing, 0) AS contacts_dialing, coalesce(jc.done, 0) AS contacts_done,
       coalesce(jc.filtered_out, 0) AS contacts_filtered_out,
       coalesce(att.total, 0) AS attempts_total, coalesce(att.in_flight, 0) AS attempts_in_flight,
       coalesce(att.completed, 0) AS attempts_completed, coalesce(codes.by_code, '{}'::jsonb)::text AS by_code
  FROM chosen j LEFT JOIN jc ON jc.job_id = j.id LEFT JOIN att ON att.job_id = j.id
  LEFT JOIN codes ON codes.job_id = j.id
 ORDER BY j.id
"""


class Queryable(Protocol):
    """An asyncpg connection or pool."""

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Any]: ...  # noqa: ASYNC109 (asyncpg)


@dataclass(frozen=True)
class RebuildResult:
    generation: int
    jobs: int
    refiltered: int  # Running jobs that went through Filter in Progress
    paused: int  # Paused jobs whose statistics wait for their resume
    seconds: float


async def load_jobs(db: Queryable, job_ids: list[int] | None = None, *, timeout_s: float = 30.0) -> list[JobEntry]:
    """Job entries with counters, as PostgreSQL has them now (every active job, or the given ids)."""
    rows = await db.fetch(SQL_JOBS, job_ids, list(ACTIVE_STATES), timeout=timeout_s)
    now = time.time()
    return [
        JobEntry(
            job_id=int(r["id"]), campaign_id=int(r["campaign_id"]), zone=r["zone"], state=r["state"],
            counters=JobCounters(
                contacts_total=r["contacts_total"], contacts_pending=r["contacts_pending"],
                contacts_dialing=r["contacts_dialing"], contacts_done=r["contacts_done"],
                contacts_filtered_out=r["contacts_filtered_out"], attempts_total=r["attempts_total"],
                attempts_in_flight=r["attempts_in_flight"], attempts_completed=r["attempts_completed"],
                by_code={str(k): int(v) for k, v in json.loads(r["by_code"]).items()},
            ),
            updated_at=now, source="rebuild",
        )
        for r in rows
    ]


async def refresh_job(db: Queryable, cache: OperationalCache, job_id: int) -> JobEntry | None:
    """One job's entry reloaded from PostgreSQL (a paused job on resume, or a CM after a batch of outcomes).
    Raises :class:`pom_ha.cache.errors.StatisticsFrozen` while the cache is down."""
    entries = await load_jobs(db, [job_id])
    if not entries:
        return None
    await cache.put_job(entries[0])
    return entries[0]


def _staged(entry: JobEntry) -> tuple[JobEntry, JobEntry | None]:
    """(what the cache shows while loading, what it shows after) for one job of the rebuild."""
    if entry.state == JobState.RUNNING.value:
        return (JobEntry(entry.job_id, entry.campaign_id, entry.zone, JobState.FILTER_IN_PROGRESS.value,
                         None, False, entry.updated_at, "rebuild"), entry)
    if entry.state == JobState.PAUSED.value:
        return (JobEntry(entry.job_id, entry.campaign_id, entry.zone, entry.state, None, True,
                         entry.updated_at, "rebuild"), None)
    return entry, None


async def rebuild_from_postgres(
    db: Queryable, cache: OperationalCache, *, owner: str | None = None, lock_ttl_s: float = 60.0,
) -> RebuildResult | None:
    """Rebuild the job caches from PostgreSQL; None when another cache service holds the rebuild lock.
    Raises :class:`pom_ha.cache.errors.CacheUnavailable` when the cache went away meanwhile (the caller
    tries again later: nothing half-done is visible, the generation is written last)."""
    t0 = time.monotonic()
    owner = owner or uuid.uuid4().hex[:12]
    lock = json.dumps({"owner": owner, "at": time.time()})
    if not await _take_lock(cache, lock, lock_ttl_s):
        return None
    try:
        async def nothing(_handles: list[Any]) -> None:
            return None

        await cache.ungated("rebuild: create the caches", nothing, *ALL_CACHES)
        entries = await load_jobs(db)
        staged = [_staged(e) for e in entries]
        first = {str(e.job_id): e.encode() for e, _ in staged}
        then = {str(after.job_id): after.encode() for _, after in staged if after is not None}

        async def put_all(handles: list[Any], pairs: dict[str, str]) -> None:
            if pairs:
                await handles[0].put_all(pairs)

        await cache.ungated("rebuild: jobs while filtering", lambda h: put_all(h, first), JOBS)
        await cache.ungated("rebuild: jobs with their counters", lambda h: put_all(h, then), JOBS)
        generation = int(time.time() * 1000)

        async def publish(handles: list[Any]) -> None:
            await handles[0].put(GENERATION_KEY, str(generation))
            await handles[0].remove_if_equals(REBUILD_LOCK_KEY, lock)

        await cache.ungated("rebuild: publish the generation", publish, META)
    except BaseException:
        async def unlock(handles: list[Any]) -> None:
            await handles[0].remove_if_equals(REBUILD_LOCK_KEY, lock)

        try:
            await cache.ungated("rebuild: release the lock", unlock, META)
        except Exception:  # the cache is gone: the lock went with it or expires
            pass
        raise
    result = RebuildResult(generation, len(entries), len(then),
                           sum(1 for e in entries if e.state == JobState.PAUSED.value), time.monotonic() - t0)
    log.info("cache rebuilt from postgresql", owner=owner, generation=generation, jobs=result.jobs,
             refiltered=result.refiltered, paused=result.paused, ms=round(result.seconds * 1000, 1))
    return result


async def _take_lock(cache: OperationalCache, lock: str, ttl_s: float) -> bool:
    async def take(handles: list[Any]) -> bool:
        meta = handles[0]
        if await meta.put_if_absent(REBUILD_LOCK_KEY, lock):
            return True
        held = await meta.get(REBUILD_LOCK_KEY)
        if held is None:
            return bool(await meta.put_if_absent(REBUILD_LOCK_KEY, lock))
        try:
            age = time.time() - float(json.loads(held)["at"])
        except (ValueError, KeyError, TypeError):
            age = ttl_s + 1
        if held == lock:
            return True  # our own put whose reply was lost, retried
        if age > ttl_s:
            return bool(await meta.replace_if_equals(REBUILD_LOCK_KEY, held, lock))
        return False

    return await cache.ungated("rebuild: take the lock", take, META)
