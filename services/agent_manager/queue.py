"""Calls queued for agents when an Agent Manager failed: re-offered or closed, never silently lost.

A Campaign Manager hands a live answer (``offered``) or a preview (``preview_offered``) to a free agent
by inserting an ``agent_call_command`` row; the zone's master applies it. When the master dies, the rows
it had not applied stay pending. After the new master's takeover (Table 9 applied, the zone available
again) and before its command loop starts, :func:`requeue_offers` goes through them in id order:

* the target agent is still free (logged in, ready, Idle, attached to the call's job in an offerable job
  state, and not the target of an earlier pending offer): the row is left for the command loop to apply;
* otherwise another free agent of the same job takes it: the row is re-targeted **in place** (same id,
  same ``ref``), ``reoffered_from`` keeps the first agent, ``reoffered_at`` the time; the command loop
  then applies it to the new agent;
* no agent of the job is free: the row is closed, ``applied_at`` set and ``result`` =
  ``closed: AGENT_UNAVAILABLE ...`` naming the job and the first agent's state. The Campaign Manager
  that offered it records the attempt NUISANCE (a person answered and no agent took the call), so it
  counts against the abandon cap; a closed preview was never dialed and is recorded CANCELLED.

Every write is fenced by the zone lease (``ZoneState.fenced``), like every other write of the master.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import asyncpg

from pom_ha.domain.agents import OFFERABLE_JOB_STATES, CallState
from pom_ha.domain.takeover import AgentRecord
from services.agent_manager.zone_state import ZoneState

AGENT_UNAVAILABLE = "AGENT_UNAVAILABLE"
REQUEUED_EVENTS = ("offered", "preview_offered")
SQL_PENDING_OFFERS = """
SELECT id, agent_id, event, call_id, job_id FROM agent_call_command
 WHERE zone = $1 AND applied_at IS NULL AND event = ANY($2::text[]) ORDER BY id
"""
W_RETARGET = """
UPDATE agent_call_command SET agent_id = $2, reoffered_from = agent_id, reoffered_at = now()
 WHERE id = $1 AND applied_at IS NULL AND {fence}
"""
W_CLOSE = """
UPDATE agent_call_command SET applied_at = now(), result = $2 WHERE id = $1 AND applied_at IS NULL AND {fence}
"""


def _free(rec: AgentRecord | None, job_id: str | None) -> bool:
    if rec is None:
        return False
    s = rec.snap
    return (s.logged_in and s.ready and s.call_state is CallState.IDLE and s.job_state in OFFERABLE_JOB_STATES
            and (job_id is None or s.job_id == job_id))


async def requeue_offers(zone: ZoneState) -> Counter[str]:
    """Keep, re-offer or close every offer of the zone still pending after a takeover; returns the counts
    (``kept``, ``reoffered``, ``closed``). A database error ends the pass (logged): the offers left are
    applied by the command loop, which refuses those whose agent is not free, and the Campaign Manager
    offers a refused call to another agent or records it NUISANCE."""
    try:
        return await _requeue(zone)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        zone.log.warning("queued calls not re-offered: database error", error=f"{type(exc).__name__}: {exc}")
        return Counter()


async def _requeue(zone: ZoneState) -> Counter[str]:
    counts: Counter[str] = Counter()
    pool = await zone.ports.pool()
    async with zone.lock:
        rows: list[Any] = await pool.fetch(SQL_PENDING_OFFERS, zone.zone, list(REQUEUED_EVENTS))
        targeted: set[str] = set()
        for r in rows:
            agent, job = str(r["agent_id"]), r["job_id"]
            if agent not in targeted and _free(zone.agents.get(agent), job):
                targeted.add(agent)
                counts["kept"] += 1
                continue
            others = sorted(a for a, rec in zone.agents.items() if a not in targeted and _free(rec, job))
            if others:
                if not await zone.fenced(W_RETARGET, r["id"], others[0]):
                    return counts  # no longer master: the next one does it
                targeted.add(others[0])
                counts["reoffered"] += 1
                continue
            rec = zone.agents.get(agent)
            was = rec.snap.describe() if rec is not None else f"agent {agent} unknown in zone {zone.zone}"
            result = (f"closed: {AGENT_UNAVAILABLE}: no free agent of job {job} after the Agent Manager failover"
                      f" ({was})")[:2000]
            if not await zone.fenced(W_CLOSE, r["id"], result):
                return counts
            counts["closed"] += 1
    if rows:
        zone.log.info("calls queued at the failover re-offered or closed", pending=len(rows), **counts)
    return counts
