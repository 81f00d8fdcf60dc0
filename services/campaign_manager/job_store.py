"""The Campaign Manager's reads and fenced writes of one job (tables of migration 0004).

Every write goes through :func:`pom_ha.ha.fencing.execute_fenced` under the job's ``AssignmentFence``: it
lands only while ``ha_assignment('campaign_manager', 'job:<id>')`` is still owned by this instance at this
epoch. Writes that must be atomic together run in one transaction; the first fenced statement locks the
assignment row ``FOR SHARE``, so a reassignment waits for the transaction and the writes after it are
covered too. A fence that does not hold raises :class:`FenceLost` and rolls the transaction back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pom_ha.ha.assignments import Assignment
from pom_ha.ha.fencing import FencedWrite, execute_fenced
from services.campaign_manager.decisions import NOT_DIALED_CODES, AttemptRow, ContactUpdate


class FenceLost(Exception):
    """The job's assignment moved (or was removed): this CM must stop acting for it."""


class WriteConflict(Exception):
    """A batch changed fewer rows than it should have: the transaction is rolled back."""


@dataclass(frozen=True, slots=True)
class JobInfo:
    job_id: int
    campaign_id: int
    list_id: int
    state: str
    ending: str | None
    definition: Any  # the campaign's JSON definition
    pacing_rate: float | None = None  # a runtime override (calls per second), migration 0008
    zone: str = "Default"  # the zone whose agents an agent-based job uses


@dataclass(frozen=True, slots=True)
class DueContact:
    contact_id: str
    attempts: int  # attempt rows so far: the next attempt number is attempts + 1
    phone: str | None  # None: the contact was removed from the list since the job was filtered
    timezone: str | None
    dialed: int
    last_dial_at: datetime | None


@dataclass(frozen=True, slots=True)
class Progress:
    pending: int
    dialing: int
    finished: int  # done or filtered out
    next_due: datetime | None

    @property
    def total(self) -> int:
        return self.pending + self.dialing + self.finished


SQL_JOB = """
SELECT j.id, j.campaign_id, j.list_id, j.state, j.ending, c.definition, j.pacing_rate, j.zone
  FROM jobs j JOIN campaigns c ON c.id = j.campaign_id WHERE j.id = $1
"""
SQL_STATE = "SELECT state, ending FROM jobs WHERE id = $1"
SQL_PROGRESS = """
SELECT count(*) FILTER (WHERE state = 'pending') AS pending, count(*) FILTER (WHERE state = 'dialing') AS dialing,
       count(*) FILTER (WHERE state IN ('done', 'filtered_out')) AS finished,
       min(next_attempt_at) FILTER (WHERE state = 'pending') AS next_due
  FROM job_contacts WHERE job_id = $1
"""
# The due contacts are picked first, by the partial index job_contacts_due alone (its order, so the scan
# stops after $3 rows), and only those few are joined to their contact and attempt history. Ordering by
# (next_attempt_at, contact_id) over the whole job instead made PostgreSQL join and sort every pending
# contact before the LIMIT: 2.5 s per tick on a job of 200,000 contacts (the dial loop, and a failover,
# waited for it).
SQL_DUE = """
SELECT jc.contact_id, jc.attempts, c.phone, c.timezone, h.dialed, h.last_dial_at
  FROM (SELECT contact_id, attempts, next_attempt_at FROM job_contacts
         WHERE job_id = $1 AND state = 'pending' AND next_attempt_at <= now()
         ORDER BY next_attempt_at LIMIT $3) jc
  LEFT JOIN contacts c ON c.list_id = $2 AND c.contact_id = jc.contact_id
  LEFT JOIN LATERAL (
       SELECT count(*) FILTER (WHERE a.code IS NULL OR a.code <> ALL($4::text[])) AS dialed,
              max(coalesce(a.completed_at, a.created_at)) FILTER (WHERE a.code IS NULL OR a.code <> ALL($4::text[]))
                  AS last_dial_at
         FROM attempts a WHERE a.job_id = $1 AND a.contact_id = jc.contact_id) h ON jc.attempts > 0
 ORDER BY jc.next_attempt_at, jc.contact_id
"""
SQL_ATTEMPTS_OF = """
SELECT contact_id, attempt_no, state, code, created_at, completed_at FROM attempts
 WHERE job_id = $1 AND contact_id = ANY($2::text[]) ORDER BY contact_id, attempt_no FOR UPDATE
"""
SQL_OURS_DIALING = """
SELECT a.contact_id, a.attempt_no, a.call_id, c.phone FROM attempts a
  JOIN jobs j ON j.id = a.job_id JOIN contacts c ON c.list_id = j.list_id AND c.contact_id = a.contact_id
 WHERE a.job_id = $1 AND a.state = 'dialing' AND a.cm_instance = $2 AND a.assignment_epoch = $3
"""
SQL_DIALING = """
SELECT contact_id, attempt_no, call_id, cm_instance, assignment_epoch FROM attempts
 WHERE job_id = $1 AND state = 'dialing' ORDER BY contact_id FOR UPDATE
"""

W_SET_STATE = """
UPDATE jobs SET state = $2, ending = $4, state_reason = coalesce($5, state_reason), updated_at = now(),
       started_at = CASE WHEN $2 = 'Filter in Progress' THEN coalesce(started_at, now()) ELSE started_at END,
       ended_at = CASE WHEN $2 IN ('Completed', 'Stopped') THEN now() ELSE ended_at END
 WHERE id = $1 AND state = $3 AND {fence}
"""
W_SET_RATE = "UPDATE jobs SET pacing_rate = $2, updated_at = now() WHERE id = $1 AND {fence}"
SQL_CHUNK_END = """
SELECT contact_id FROM contacts WHERE list_id = $1 AND contact_id > $2 ORDER BY contact_id OFFSET $3 LIMIT 1
"""
# The contacts of one chunk of the list (contact_id in ($3, $4]) that the job does not have yet: a set
# difference of two primary-key range scans (hashed), so a re-filter that finds nothing new (a takeover)
# costs two scans per chunk instead of one index probe and a conflict check per contact.
W_FILTER = """
INSERT INTO job_contacts (job_id, contact_id, state, next_attempt_at)
SELECT $1, m.contact_id, 'pending', now() FROM (
       SELECT contact_id FROM contacts WHERE list_id = $2 AND contact_id > $3 AND ($4::text IS NULL OR contact_id <= $4)
       EXCEPT
       SELECT contact_id FROM job_contacts
        WHERE job_id = $1 AND contact_id > $3 AND ($4::text IS NULL OR contact_id <= $4)) m
 WHERE {fence}
ON CONFLICT (job_id, contact_id) DO NOTHING
"""
FILTER_CHUNK = 20_000
W_UNSTICK = """
UPDATE job_contacts jc SET state = 'pending', next_attempt_at = now(), updated_at = now()
 WHERE jc.job_id = $1 AND jc.state = 'dialing'
   AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.job_id = jc.job_id AND a.contact_id = jc.contact_id
                   AND a.state = 'dialing')
   AND {fence}
"""
W_START_DIALING = """
UPDATE job_contacts jc SET state = 'dialing', attempts = u.attempt_no, updated_at = now()
  FROM unnest($2::text[], $3::int[]) AS u(contact_id, attempt_no)
 WHERE jc.job_id = $1 AND jc.contact_id = u.contact_id AND jc.state = 'pending'
   AND jc.attempts = u.attempt_no - 1 AND {fence}
"""
W_INSERT_ATTEMPTS = """
INSERT INTO attempts (job_id, contact_id, attempt_no, state, cm_server, cm_instance, assignment_epoch, call_id)
SELECT $1, u.contact_id, u.attempt_no, 'dialing', $5, $6, $7, u.call_id
  FROM unnest($2::text[], $3::int[], $4::text[]) AS u(contact_id, attempt_no, call_id) WHERE {fence}
"""
W_COMPLETE_ATTEMPTS = """
UPDATE attempts a SET state = 'completed', code = u.code, completed_at = now(), duration_ms = u.duration_ms
  FROM unnest($2::text[], $3::int[], $4::text[], $5::int[]) AS u(contact_id, attempt_no, code, duration_ms)
 WHERE a.job_id = $1 AND a.contact_id = u.contact_id AND a.attempt_no = u.attempt_no AND a.state = 'dialing'
   AND {fence}
"""
W_UPDATE_CONTACTS = """
UPDATE job_contacts jc SET state = u.state, next_attempt_at = coalesce(u.next_at, jc.next_attempt_at),
       final_code = u.final_code, updated_at = now()
  FROM unnest($2::text[], $3::text[], $4::timestamptz[], $5::text[]) AS u(contact_id, state, next_at, final_code)
 WHERE jc.job_id = $1 AND jc.contact_id = u.contact_id AND jc.state = $6 AND {fence}
"""


@dataclass(frozen=True, slots=True)
class NewAttempt:
    contact_id: str
    attempt_no: int
    call_id: str
    phone: str


class JobStore:
    """Reads and fenced writes of one job under one assignment (``pool`` is an asyncpg pool)."""

    def __init__(self, pool: Any, assignment: Assignment, job_id: int, server: str, *, timeout_s: float) -> None:
        self.pool = pool
        self.assignment = assignment
        self.fence = assignment.fence()
        self.job_id = job_id
        self.server = server
        self.timeout_s = timeout_s

    async def fenced(self, conn: Any, sql: str, *args: object) -> FencedWrite:
        """``sql`` (with ``{fence}``) on ``conn`` under the job's assignment; raises FenceLost when it moved."""
        result = await execute_fenced(conn, self.fence, sql, *args, timeout_s=self.timeout_s)
        if not result.fence_held:
            raise FenceLost(f"job {self.job_id}: assignment epoch {self.assignment.epoch} no longer ours")
        return result

    # ---- reads -------------------------------------------------------------------------------------------
    async def job(self) -> JobInfo | None:
        row = await self.pool.fetchrow(SQL_JOB, self.job_id, timeout=self.timeout_s)
        if row is None:
            return None
        definition = row["definition"]
        if isinstance(definition, str | bytes):  # jsonb without a codec arrives as text
            definition = json.loads(definition)
        rate = row["pacing_rate"]
        return JobInfo(int(row["id"]), int(row["campaign_id"]), int(row["list_id"]), row["state"], row["ending"],
                       definition, None if rate is None else float(rate), str(row["zone"]))

    async def state(self) -> tuple[str, str | None] | None:
        row = await self.pool.fetchrow(SQL_STATE, self.job_id, timeout=self.timeout_s)
        return None if row is None else (str(row["state"]), row["ending"])

    async def progress(self) -> Progress:
        r = await self.pool.fetchrow(SQL_PROGRESS, self.job_id, timeout=self.timeout_s)
        return Progress(int(r["pending"]), int(r["dialing"]), int(r["finished"]), r["next_due"])

    async def due(self, list_id: int, limit: int) -> list[DueContact]:
        rows = await self.pool.fetch(SQL_DUE, self.job_id, list_id, limit, list(NOT_DIALED_CODES),
                                     timeout=self.timeout_s)
        return [DueContact(r["contact_id"], int(r["attempts"]), r["phone"], r["timezone"], int(r["dialed"] or 0),
                           r["last_dial_at"]) for r in rows]

    async def ours_dialing(self) -> list[NewAttempt]:
        """Attempts of the job written dialing under this assignment (this instance, this epoch)."""
        rows = await self.pool.fetch(SQL_OURS_DIALING, self.job_id, self.fence.owner_instance, self.fence.epoch,
                                     timeout=self.timeout_s)
        return [NewAttempt(r["contact_id"], int(r["attempt_no"]), r["call_id"], r["phone"]) for r in rows]

    async def in_flight_count(self) -> int:
        n = await self.pool.fetchval("SELECT count(*) FROM attempts WHERE job_id = $1 AND state = 'dialing'",
                                     self.job_id, timeout=self.timeout_s)
        return int(n)

    # ---- writes ------------------------------------------------------------------------------------------
    async def set_state(self, from_state: str, to_state: str, *, ending: str | None = None, reason: str | None = None,
                        ) -> bool:
        """Move the job from ``from_state`` (compare-and-set); False when it was not in that state."""
        async with self.pool.acquire(timeout=self.timeout_s) as conn:
            result = await self.fenced(conn, W_SET_STATE, self.job_id, to_state, from_state, ending, reason)
        return result.rows == 1

    async def set_pacing_rate(self, rate: float | None) -> None:
        """Record a runtime pacing rate (calls per second; None: the campaign's) under the fence."""
        async with self.pool.acquire(timeout=self.timeout_s) as conn:
            await self.fenced(conn, W_SET_RATE, self.job_id, rate)

    async def filter_contacts(self, list_id: int, chunk: int = FILTER_CHUNK) -> int:
        """Add the list's contacts that the job does not have yet (:meth:`add_missing`), then put contacts
        'dialing' without an attempt in flight back to pending (:meth:`unstick`). Returns how many
        contacts were added."""
        added = await self.add_missing(list_id, chunk)
        await self.unstick()
        return added

    async def add_missing(self, list_id: int, chunk: int = FILTER_CHUNK) -> int:
        """Add the list's contacts that the job does not have yet, in chunks of ``chunk`` contacts (each
        fenced and idempotent, so a big list never needs one long statement). Safe while the job dials:
        it only inserts rows that do not exist. Returns how many contacts were added."""
        added, low = 0, ""
        async with self.pool.acquire(timeout=self.timeout_s) as conn:
            while True:
                high = await conn.fetchval(SQL_CHUNK_END, list_id, low, chunk - 1, timeout=self.timeout_s)
                added += (await self.fenced(conn, W_FILTER, self.job_id, list_id, low, high)).rows
                if high is None:
                    break
                low = high
        return added

    async def unstick(self) -> int:
        """Contacts 'dialing' without an attempt in flight go back to pending (none is expected). Only
        while this runner places no attempts: its NOT EXISTS would not see an attempt committed meanwhile."""
        async with self.pool.acquire(timeout=self.timeout_s) as conn:
            return (await self.fenced(conn, W_UNSTICK, self.job_id)).rows

    async def start_attempts(self, attempts: Sequence[NewAttempt]) -> None:
        """Write the attempt rows (dialing) and move their contacts to dialing, in ONE fenced transaction —
        before any DIAL leaves. Raises WriteConflict (nothing written) if any contact was not as expected."""
        if not attempts:
            return
        cids = [a.contact_id for a in attempts]
        nos = [a.attempt_no for a in attempts]
        async with self.pool.acquire(timeout=self.timeout_s) as conn, conn.transaction():
            moved = await self.fenced(conn, W_START_DIALING, self.job_id, cids, nos)
            if moved.rows != len(attempts):
                raise WriteConflict(f"job {self.job_id}: {moved.rows} of {len(attempts)} contacts were pending")
            await self.fenced(conn, W_INSERT_ATTEMPTS, self.job_id, cids, nos, [a.call_id for a in attempts],
                               self.server, self.fence.owner_instance, self.fence.epoch)

    async def update_contacts(self, updates: Sequence[ContactUpdate], *, from_state: str) -> int:
        if not updates:
            return 0
        async with self.pool.acquire(timeout=self.timeout_s) as conn:
            result = await self.fenced(conn, W_UPDATE_CONTACTS, *_contact_args(self.job_id, updates, from_state))
        return result.rows

    async def locked_attempts(self, conn: Any, contacts: Sequence[str]) -> list[AttemptRow]:
        rows = await conn.fetch(SQL_ATTEMPTS_OF, self.job_id, list(contacts), timeout=self.timeout_s)
        return [AttemptRow(r["contact_id"], int(r["attempt_no"]), r["state"], r["code"], r["created_at"],
                           r["completed_at"]) for r in rows]

    async def locked_dialing(self, conn: Any) -> list[tuple[str, int, str | None, str, int]]:
        rows = await conn.fetch(SQL_DIALING, self.job_id, timeout=self.timeout_s)
        return [(r["contact_id"], int(r["attempt_no"]), r["call_id"], r["cm_instance"], int(r["assignment_epoch"]))
                for r in rows]

    async def complete(self, conn: Any, done: Sequence[tuple[str, int, str, int | None]],
                       updates: Sequence[ContactUpdate]) -> None:
        """Inside the caller's transaction: complete attempts (contact, attempt_no, code, duration_ms) and
        apply the contacts' updates (from dialing); every row must change, else WriteConflict."""
        if done:
            result = await self.fenced(
                conn, W_COMPLETE_ATTEMPTS, self.job_id, [d[0] for d in done], [d[1] for d in done],
                [d[2] for d in done], [d[3] for d in done])
            if result.rows != len(done):
                raise WriteConflict(f"job {self.job_id}: {result.rows} of {len(done)} attempts were dialing")
        if updates:
            result = await self.fenced(conn, W_UPDATE_CONTACTS, *_contact_args(self.job_id, updates, "dialing"))
            if result.rows != len(updates):
                raise WriteConflict(f"job {self.job_id}: {result.rows} of {len(updates)} contacts were dialing")


def _contact_args(job_id: int, updates: Sequence[ContactUpdate], from_state: str) -> tuple[object, ...]:
    return (job_id, [u.contact_id for u in updates], [u.state for u in updates],
            [u.next_attempt_at for u in updates], [u.final_code for u in updates], from_state)
