"""The Campaign Manager's side of an agent-based job: what it reads of the Agent Manager (AM) and what it
asks of it, all through PostgreSQL (both sides already use it; no new connection between them).

Reads (written by the zone's AM master, docs/agent-manager.md):

* ``agent_zone_status.available`` of the job's zone (``jobs.zone``): false from an AM takeover's start
  until its agents are checked — the job dials nothing new in the zone meanwhile;
* ``agents`` of the zone attached to the job (``job_id`` = the job's id): free = logged in, ready, Idle, in
  an offerable job state; busy = logged in on a call or wrapping up.

Writes, each one fenced by the job's assignment (owner instance + epoch, like the attempt rows), into
``agent_call_command`` (the AM applies them in id order and records ``applied_at`` + ``result``):

* ``offered``: a live answer handed to a free agent; ``preview_offered``: a preview for a free agent;
  ``answered`` / ``released``: what became of a preview's dial. ``ref`` (migration 0013) is the attempt's
  call id, so the CM can follow a row whose fenced insert returns no id; a re-offer by a new AM master
  (``services/agent_manager/queue.py``) keeps the row and its ``ref``.

An agent promised a call (an offer the AM has not applied yet) is *reserved*: not counted free, not
offered another call, until the offer's result is known.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pom_ha.domain.pacing import AgentView
from services.campaign_manager.job_store import JobStore

SQL_ZONE_AVAILABLE = "SELECT available FROM agent_zone_status WHERE zone = $1"
SQL_JOB_AGENTS = """
SELECT agent_id, logged_in, ready, call_state, job_state, call_id FROM agents WHERE zone = $1 AND job_id = $2
"""
SQL_AGENT_CALLS = "SELECT agent_id, call_state, call_id FROM agents WHERE zone = $1 AND agent_id = ANY($2::text[])"
SQL_OFFER_RESULTS = """
SELECT DISTINCT ON (ref) ref, id, agent_id, applied_at, result, reoffered_from FROM agent_call_command
 WHERE ref = ANY($1::text[]) ORDER BY ref, id DESC
"""
W_OFFER = """
INSERT INTO agent_call_command (zone, agent_id, event, call_id, job_id, contact_id, phone, ref)
SELECT $1, $2, $3, $4, $5, $6, $7, $8 WHERE {fence}
"""
W_CANCEL_OFFER = """
UPDATE agent_call_command SET applied_at = now(), result = $2
 WHERE ref = $1 AND applied_at IS NULL AND {fence}
"""
OFFERABLE = ("Job Attached", "Job Manual Inbound")
SQL_DAY_COUNTS = """
SELECT count(*) FILTER (WHERE code <> ALL($2::text[])) AS dialed,
       count(*) FILTER (WHERE code IN ('ANSWER_HUMAN', 'NUISANCE')) AS live,
       count(*) FILTER (WHERE code = 'NUISANCE') AS abandoned
  FROM attempts WHERE job_id = $1 AND state = 'completed' AND completed_at >= date_trunc('day', now())
"""


@dataclass
class Offer:
    """One call the CM handed to the AM and whose result it has not seen yet."""

    ref: str
    event: str
    agent_id: str
    key: tuple[str, int]  # the attempt (contact, attempt_no)
    phone: str
    started: float = field(default_factory=time.monotonic)
    tries: int = 1


@dataclass(frozen=True)
class OfferResult:
    offer: Offer
    agent_id: str  # the agent the AM applied it to (a re-offer may have moved it)
    result: str
    reoffered_from: str | None

    @property
    def ok(self) -> bool:
        return self.result.startswith("ok")


class AgentLink:
    def __init__(self, store: JobStore, zone: str) -> None:
        self.store = store
        self.zone = zone
        self.job = str(store.job_id)
        self.pending: dict[str, Offer] = {}  # ref -> offer
        self.reserved: dict[str, str] = {}  # agent -> ref
        self.handed: dict[str, tuple[str, float]] = {}  # agent -> (call id, when its offer was applied)
        self.available = False
        self.free_ids: list[str] = []
        self.handle_times: list[float] = []  # measured since the last read (offer applied -> agent Idle)

    async def view(self) -> AgentView:
        """The zone's availability and the job's agents now (free ones not reserved)."""
        async with self.store.pool.acquire(timeout=self.store.timeout_s) as conn:
            available = await conn.fetchval(SQL_ZONE_AVAILABLE, self.zone, timeout=self.store.timeout_s)
            rows = await conn.fetch(SQL_JOB_AGENTS, self.zone, self.job, timeout=self.store.timeout_s)
        self.available = bool(available)
        free: list[str] = []
        busy = 0
        now = time.monotonic()
        for r in rows:
            if not r["logged_in"]:
                continue
            agent = str(r["agent_id"])
            if r["call_state"] == "Idle":
                handed = self.handed.pop(agent, None)
                if handed is not None:
                    self.handle_times.append(now - handed[1])
                if r["ready"] and r["job_state"] in OFFERABLE and agent not in self.reserved:
                    free.append(agent)
            else:
                busy += 1
        free.sort()
        self.free_ids = free
        return AgentView(free=len(free) if self.available else 0, busy=busy, available=self.available)

    async def offer(self, event: str, key: tuple[str, int], call_id: str, phone: str, *,
                    exclude: set[str] | None = None, tries: int = 1) -> Offer | None:
        """Hand ``call_id`` to a free agent (fresh read): the fenced insert of the command; None when the
        zone is unavailable or no agent of the job is free. Raises FenceLost when the job moved."""
        await self.view()
        if not self.available:
            return None
        candidates = [a for a in self.free_ids if a not in (exclude or set())]
        if not candidates:
            return None
        agent = candidates[0]
        # reserved before the insert: a view() read meanwhile (the dial loop) must not count it free
        self.reserved[agent] = call_id
        if agent in self.free_ids:
            self.free_ids.remove(agent)
        try:
            async with self.store.pool.acquire(timeout=self.store.timeout_s) as conn:
                await self.store.fenced(conn, W_OFFER, self.zone, agent, event, call_id, self.job, key[0], phone,
                                         call_id)
        except BaseException:
            self.reserved.pop(agent, None)
            raise
        offer = Offer(call_id, event, agent, key, phone, tries=tries)
        self.pending[call_id] = offer
        return offer

    async def agent_calls(self, agents: list[str]) -> dict[str, tuple[str, str | None]]:
        """The call state and call of each of ``agents`` (an agent not in the zone is missing)."""
        rows = await self.store.pool.fetch(SQL_AGENT_CALLS, self.zone, agents, timeout=self.store.timeout_s)
        return {str(r["agent_id"]): (r["call_state"], r["call_id"]) for r in rows}

    async def command(self, event: str, agent: str, call_id: str, key: tuple[str, int]) -> None:
        """A follow-up event of a call an agent already has (a preview's ``answered`` / ``released``)."""
        async with self.store.pool.acquire(timeout=self.store.timeout_s) as conn:
            await self.store.fenced(conn, W_OFFER, self.zone, agent, event, call_id, self.job, key[0], None,
                                     f"{call_id}:{event}")

    async def results(self) -> list[OfferResult]:
        """Offers the AM has decided (applied, refused, or closed by a new master); they leave ``pending``."""
        if not self.pending:
            return []
        rows = await self.store.pool.fetch(SQL_OFFER_RESULTS, list(self.pending), timeout=self.store.timeout_s)
        done: list[OfferResult] = []
        for r in rows:
            if r["applied_at"] is None:
                continue
            offer = self.pending.pop(str(r["ref"]))
            self.reserved.pop(offer.agent_id, None)
            agent = str(r["agent_id"])
            res = OfferResult(offer, agent, str(r["result"] or ""), r["reoffered_from"])
            if res.ok:
                self.handed[agent] = (offer.ref, time.monotonic())
            done.append(res)
        return done

    async def cancel(self, offer: Offer, why: str) -> bool:
        """Withdraw an offer the AM has not applied (the caller gave up waiting); False if it was applied
        meanwhile (its result is then read as usual)."""
        async with self.store.pool.acquire(timeout=self.store.timeout_s) as conn:
            done = await self.store.fenced(conn, W_CANCEL_OFFER, offer.ref, f"closed: {why}"[:2000])
        return bool(done)

    async def day_counts(self, not_dialed: list[str]) -> tuple[int, int, int]:
        """(dialed attempts, live answers, abandons) of the job today: the cap is over the day."""
        r = await self.store.pool.fetchrow(SQL_DAY_COUNTS, self.store.job_id, not_dialed,
                                           timeout=self.store.timeout_s)
        dialed, live, abandoned = int(r["dialed"]), int(r["live"]), int(r["abandoned"])
        return max(dialed, live), live, abandoned

    def info(self) -> dict[str, Any]:
        return {"zone": self.zone, "available": self.available, "free": len(self.free_ids),
                "offers_pending": len(self.pending), "reserved": len(self.reserved)}
