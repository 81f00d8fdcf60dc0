"""One zone under one master term of the Agent Manager, as its workers share it: the agents, the desktops'
sessions, the lock that orders their changes, and the persistence of every change in ``agents`` under the zone
lease's fence (through the term's ports, :mod:`pom_ha.ha.ports`).

The workers: :mod:`.takeover` (plan -> persist -> announce), :mod:`.desktops` (logins, requests, desktop checks),
:mod:`.commands` (the platform's call events, the requeue of :mod:`.queue`), :mod:`.reset` (the zone reset);
:mod:`.zone` puts them together for one term.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from pom_ha.desktop.protocol import AgentStateFrame, ErrorFrame
from pom_ha.domain.agents import AgentSnapshot
from pom_ha.domain.takeover import AgentRecord
from pom_ha.ha.fencing import FenceLost, execute_fenced
from pom_ha.ha.ports import TermPorts
from services.agent_manager.session import Session

#: an agent row replaces the stored one whole (both upserts below)
_AGENT_UPSERT_SET = """ON CONFLICT (zone, agent_id) DO UPDATE SET
    logged_in = EXCLUDED.logged_in, ready = EXCLUDED.ready, call_state = EXCLUDED.call_state,
    call_role = EXCLUDED.call_role, job_state = EXCLUDED.job_state, job_id = EXCLUDED.job_id,
    call_id = EXCLUDED.call_id, nailed = EXCLUDED.nailed, login_time = EXCLUDED.login_time,
    ha_time_s = EXCLUDED.ha_time_s, failovers = EXCLUDED.failovers, nuisance_calls = EXCLUDED.nuisance_calls,
    desktop_errors = EXCLUDED.desktop_errors, last_completion_code = EXCLUDED.last_completion_code,
    last_closed_call_id = EXCLUDED.last_closed_call_id, epoch = EXCLUDED.epoch, updated_at = now()
"""
SQL_UPSERT_AGENT = f"""
INSERT INTO agents (zone, agent_id, logged_in, ready, call_state, call_role, job_state, job_id, call_id, nailed,
                    login_time, ha_time_s, failovers, nuisance_calls, desktop_errors, last_completion_code,
                    last_closed_call_id, epoch, updated_at)
SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, now() WHERE {{fence}}
{_AGENT_UPSERT_SET}"""
_AGENT_COLS = """agent_id, logged_in, ready, call_state, call_role, job_state, job_id, call_id, nailed,
                    login_time, ha_time_s, failovers, nuisance_calls, desktop_errors, last_completion_code,
                    last_closed_call_id"""
# the takeover's rows in one statement: one array per column (unnest), same upsert as SQL_UPSERT_AGENT
SQL_UPSERT_AGENTS = f"""
INSERT INTO agents (zone, {_AGENT_COLS}, epoch, updated_at)
SELECT $1, u.*, $2, now() FROM unnest($3::text[], $4::bool[], $5::bool[], $6::text[], $7::text[], $8::text[],
    $9::text[], $10::text[], $11::bool[], $12::timestamptz[], $13::float8[], $14::int[], $15::int[], $16::int[],
    $17::text[], $18::text[]) AS u WHERE {{fence}}
{_AGENT_UPSERT_SET}"""
SQL_FAILOVER_LOGS = """
INSERT INTO agent_failover_log (zone, epoch, agent_id, before_state, after_state, after_job_state, table_column,
    call_effect, nailed, job_detached, desktop_state, completion_code, force_logout, call_id, ha_time_s)
SELECT $1, $2, u.* FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
    $9::bool[], $10::bool[], $11::text[], $12::text[], $13::bool[], $14::text[], $15::float8[]) AS u WHERE {fence}
"""
# the late desktop check (a desktop back after the takeover) completes the agent's failover-log row of the term
SQL_LATE_CHECK_LOG = """
UPDATE agent_failover_log SET desktop_state = $4, force_logout = $5, completion_code = coalesce($6, completion_code),
    after_state = coalesce($7, after_state)
WHERE zone = $1 AND agent_id = $2 AND epoch = $3 AND {fence}
"""
SQL_GAP_EVENTS_DONE = ("UPDATE agent_call_command SET applied_at = now(), result = 'during failover: ' || event"
                       " WHERE id = ANY($1::bigint[]) AND {fence}")
SQL_ZONE_STATUS = """
INSERT INTO agent_zone_status (zone, available, since, master_server, epoch)
SELECT $1, $2, now(), $3, $4 WHERE {fence}
ON CONFLICT (zone) DO UPDATE SET available = EXCLUDED.available, since = EXCLUDED.since,
    master_server = EXCLUDED.master_server, epoch = EXCLUDED.epoch
"""
SQL_COMMAND_DONE = "UPDATE agent_call_command SET applied_at = now(), result = $2 WHERE id = $1 AND {fence}"


def row_args(rec: AgentRecord) -> tuple[Any, ...]:
    """The ``agents`` columns of a record after (zone), in ``_AGENT_COLS`` order."""
    s = rec.snap
    return (
        s.agent_id, s.logged_in, s.ready, s.call_state.value, s.role.value if s.role else None,
        s.job_state.value if s.job_state else None, s.job_id, s.call_id, rec.nailed, rec.login_time, rec.ha_time_s,
        rec.failovers, rec.nuisance_calls, rec.desktop_errors, rec.last_completion_code, rec.last_closed_call_id,
    )


def state_frame(snap: AgentSnapshot) -> AgentStateFrame:
    return AgentStateFrame(
        logged_in=snap.logged_in, ready=snap.ready, call_state=snap.call_state, job_state=snap.job_state,
        job_id=snap.job_id, call_id=snap.call_id,
    )


def error_frame(req: int | str | None, code: Any, reason: str) -> ErrorFrame:
    return ErrorFrame(req=req, code=code, reason=reason[:2000], fatal=False)


@dataclass(frozen=True)
class DesktopSettings:
    """What a LOGIN_OK tells a desktop (the daemon's desktop port settings)."""

    heartbeat_interval_ms: int = 500
    miss_limit: int = 4
    manager_addresses: list[str] = field(default_factory=list)


@dataclass
class TakeoverReport:
    """What the last takeover did (for /health and the logs)."""

    epoch: int
    known_agents: int = 0
    reconnected: int = 0
    desktop_errors: int = 0
    nuisance: int = 0
    detached: int = 0
    wait_ms: float = 0.0  # takeover start -> every stored agent's desktop back (or AppServerWaitTimeOut)
    query_ms: float = 0.0  # gap events + STATE_QUERY round
    write_ms: float = 0.0  # rows + failover log (one transaction)
    send_ms: float = 0.0  # POM_AVAILABLE + AGENT_STATE to every desktop
    total_ms: float = 0.0
    outage_s: float = 0.0
    by_agent: dict[str, str] = field(default_factory=dict)


class ZoneState:
    """The zone's agents and sessions under one term, and the fenced writes of their rows."""

    def __init__(self, ports: TermPorts, desktop: DesktopSettings | None = None) -> None:
        self.ports = ports
        self.term = ports.term
        self.zone = ports.term.scope
        self.epoch = ports.term.epoch
        self.server = ports.server
        self.desktop = desktop or DesktopSettings()
        self.agents: dict[str, AgentRecord] = {}
        self.sessions: dict[str, Session] = {}
        self.lock = asyncio.Lock()
        self.available = False
        self.resetting = False  # "Save and Apply": logins are refused while the zone is handed over
        self.report: TakeoverReport | None = None
        self.log = ports.log.bind(zone=self.zone, server=self.server)

    async def fenced(self, sql: str, *args: object) -> bool:
        """One fenced write; False (logged) when this server is no longer master of the zone."""
        result = await self.ports.execute(sql, *args)
        if not result.fence_held:
            self.log.warning("fenced write refused: no longer master of the zone")
        return bool(result)

    async def persist(self, rec: AgentRecord) -> bool:
        done = await self.fenced(SQL_UPSERT_AGENT, self.zone, *row_args(rec), self.epoch)
        if done:
            self.cached(rec)
        return done

    async def persist_many(self, recs: list[AgentRecord]) -> bool:
        """Rows of many agents in one fenced statement."""
        if not recs:
            return True
        cols = list(zip(*(row_args(r) for r in recs), strict=True))
        done = await self.fenced(SQL_UPSERT_AGENTS, self.zone, self.epoch, *[list(c) for c in cols])
        if done:
            self.cached(*recs)
        return done

    async def persist_takeover(self, recs: list[AgentRecord], logs: list[tuple[Any, ...]]) -> bool:
        """The takeover's rows (``agents``) and ``agent_failover_log`` in one transaction under the fence."""
        if not recs:
            return True
        pool = await self.ports.pool()
        timeout = self.ports.timings.store_timeout_s
        cols = list(zip(*(row_args(r) for r in recs), strict=True))
        log_cols = list(zip(*logs, strict=True))
        try:
            async with pool.acquire(timeout=timeout) as conn, conn.transaction():
                rows = await execute_fenced(conn, self.ports.fence, SQL_UPSERT_AGENTS, self.zone, self.epoch,
                                            *[list(c) for c in cols], timeout_s=timeout)
                if not rows.fence_held:
                    raise FenceLost(self.ports.fence)
                await execute_fenced(conn, self.ports.fence, SQL_FAILOVER_LOGS, self.zone, self.epoch,
                                     *[list(c) for c in log_cols], timeout_s=timeout)
        except FenceLost:
            self.log.warning("fenced write refused: no longer master of the zone")
            return False
        self.cached(*recs)
        return True

    def cached(self, *recs: AgentRecord) -> None:
        """Persisted changes to the cache service: queued for the link's own task, never waited for."""
        link = self.ports.sinks.cache
        if link is not None:
            for rec in recs:
                link.agent_changed(rec.snap)

    async def zone_status(self, available: bool) -> None:
        await self.fenced(SQL_ZONE_STATUS, self.zone, available, self.server, self.epoch)
