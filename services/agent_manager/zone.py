"""One zone under one master term of the Agent Manager: the takeover sequence, the desktops' requests, the
call events of the platform, every change persisted in ``agents`` under the zone lease's fence.

Takeover (each term starts with it; a first start with no stored agents goes through it in a few ms):

1. ``agent_zone_status`` says the zone is unavailable; the stored rows of the zone are loaded.
2. Desktops that log in meanwhile get ``LOGIN_OK`` + ``POM_NOT_AVAILABLE``. A stored agent's login is its
   (simulated) application server reporting its nailing session; the master waits until every stored
   logged-in agent has reported, or AppServerWaitTimeOut (``pim_config``, ms) has passed.
3. Platform call events written while the zone had no master are read as what happened during the gap:
   ``released`` = the customer call was disconnected, ``answered`` = a dial was answered.
4. Each reconnected desktop gets ``STATE_QUERY``; its report is compared with the stored (pre-failover)
   state (``check_desktop_state``): a mismatch closes the call DESKTOP_ERROR and forces a logout.
   Otherwise Table 9 (``after_failover``) gives the agent's new state, with ``resolve_nailing`` deciding
   nailed / unnailed-and-detached.
5. Rows, one ``agent_failover_log`` row per agent (completion codes, nuisance marks), the outage added to
   each agent's Total HA time; then ``POM_AVAILABLE`` + ``AGENT_STATE`` (+ ``CALL_EVENT released`` for
   calls that ended) to every desktop and ``agent_zone_status`` available.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog

from pom_ha.desktop.protocol import (
    AgentStateFrame,
    CallbackAccept,
    CallbackOffered,
    CallEvent,
    ErrorFrame,
    ForcedLogout,
    JobAttach,
    Login,
    LoginOk,
    Logout,
    NotReady,
    Ok,
    PomAvailable,
    PomNotAvailable,
    PreviewAccept,
    PreviewCancel,
    PreviewOffered,
    Ready,
    StateQuery,
    StateReport,
    ToManager,
    WrapUp,
)
from pom_ha.domain.agents import (
    APP_SERVER_WAIT_TIMEOUT_KEY,
    AgentEvent,
    AgentJobState,
    AgentSnapshot,
    CallEffect,
    CallRole,
    CallState,
    EventKind,
    FailoverOutcome,
    InvalidAgentTransition,
    after_failover,
    after_sdk_connection_lost,
    app_server_wait_timeout_s,
    apply,
    check_desktop_state,
    ha_time_s,
    resolve_nailing,
)
from pom_ha.domain.attempts import CompletionCode
from pom_ha.ha.election import Elector
from pom_ha.ha.fencing import LeaseFence, execute_fenced
from pom_ha.ha.term import MasterTerm
from services.agent_manager.queue import requeue_offers

if TYPE_CHECKING:
    from services.agent_manager.daemon import AgentManagerDaemon, Session

log = structlog.get_logger("services.agent_manager.zone")

STATE_QUERY_TIMEOUT_S = 2.0
YIELD_EVERY = 100  # agents handled per event-loop turn in the takeover's loops
REPORT_BUDGET_S = STATE_QUERY_TIMEOUT_S  # the takeover waits this long for the reports once all desktops are back
COMMAND_POLL_S = 1.0

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

COMMAND_EVENTS = {
    "offered": EventKind.OFFERED, "preview_offered": EventKind.PREVIEW_OFFERED,
    "callback_offered": EventKind.CALLBACK_OFFERED, "dial_started": EventKind.DIAL_STARTED,
    "answered": EventKind.ANSWERED, "released": EventKind.RELEASED,
}
# Owner call events that carry the consulted (passive) agent along.
_PASSIVE_FOLLOWS = {EventKind.CONFERENCE, EventKind.CONSULT_ENDED, EventKind.RELEASED}


@dataclass
class AgentRecord:
    """One agent of the zone: its state machine snapshot plus what the table keeps beside it."""

    snap: AgentSnapshot
    nailed: bool = False
    login_time: datetime | None = None
    ha_time_s: float = 0.0
    failovers: int = 0
    nuisance_calls: int = 0
    desktop_errors: int = 0
    last_completion_code: str | None = None
    last_closed_call_id: str | None = None

    @staticmethod
    def from_row(r: Any) -> AgentRecord:
        logged_in = bool(r["logged_in"])
        snap = AgentSnapshot(
            r["agent_id"], r["zone"], logged_in=logged_in, ready=bool(r["ready"]),
            call_state=CallState(r["call_state"]),
            job_state=AgentJobState(r["job_state"]) if r["job_state"] else None, job_id=r["job_id"],
            call_id=r["call_id"], role=CallRole(r["call_role"]) if r["call_role"] else None,
        )
        return AgentRecord(
            snap, bool(r["nailed"]), r["login_time"], float(r["ha_time_s"]), int(r["failovers"]),
            int(r["nuisance_calls"]), int(r["desktop_errors"]), r["last_completion_code"], r["last_closed_call_id"],
        )


def _row_args(rec: AgentRecord) -> tuple[Any, ...]:
    """The ``agents`` columns of a record after (zone), in ``_AGENT_COLS`` order."""
    s = rec.snap
    return (
        s.agent_id, s.logged_in, s.ready, s.call_state.value, s.role.value if s.role else None,
        s.job_state.value if s.job_state else None, s.job_id, s.call_id, rec.nailed, rec.login_time, rec.ha_time_s,
        rec.failovers, rec.nuisance_calls, rec.desktop_errors, rec.last_completion_code, rec.last_closed_call_id,
    )


class _FenceLost(Exception):
    pass


def state_frame(snap: AgentSnapshot) -> AgentStateFrame:
    return AgentStateFrame(
        logged_in=snap.logged_in, ready=snap.ready, call_state=snap.call_state, job_state=snap.job_state,
        job_id=snap.job_id, call_id=snap.call_id,
    )


def _error(req: int | str | None, code: Any, reason: str) -> ErrorFrame:
    return ErrorFrame(req=req, code=code, reason=reason[:2000], fatal=False)


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


class ZoneRuntime:
    def __init__(self, daemon: AgentManagerDaemon, elector: Elector, term: MasterTerm) -> None:
        self.daemon = daemon
        self.elector = elector
        self.term = term
        self.zone = term.scope
        self.epoch = term.epoch
        self.agents: dict[str, AgentRecord] = {}
        self.sessions: dict[str, Session] = {}
        self.available = False
        self.lock = asyncio.Lock()
        self.reconnected: dict[str, float] = {}
        # agents the takeover could not check with their desktop (not back in time): their pre-failover state and
        # the call the takeover ended; checked when their desktop logs in later (``_late_check``)
        self.unchecked: dict[str, tuple[AgentSnapshot, str | None]] = {}
        self.checking: set[str] = set()
        self._early: dict[str, asyncio.Task[StateReport | None]] = {}
        self._pending: dict[str, asyncio.Task[StateReport | None]] = {}  # queries past the takeover's budget
        self._taking_over: bytes | None = None  # the POM_NOT_AVAILABLE of a login during the takeover
        self._checks: set[asyncio.Task[None]] = set()
        self._reconnect = asyncio.Event()
        self._loaded = asyncio.Event()  # logins wait for the stored rows (a login must not overwrite one)
        self._reports: dict[tuple[str, int | str], asyncio.Future[StateReport]] = {}
        self._req = itertools.count(1)
        self._commands = asyncio.Event()
        self.report: TakeoverReport | None = None
        self.resetting = False  # "Save and Apply": logins are refused while the zone is handed over
        self._log = log.bind(zone=self.zone, epoch=self.epoch, server=daemon.config.server)

    # ---- persistence --------------------------------------------------------------------------------------
    async def _fenced(self, sql: str, *args: object) -> bool:
        result = await self.daemon.fenced_execute(self.term, sql, *args)
        if not result.fence_held:
            self._log.warning("fenced write refused: no longer master of the zone")
        return bool(result)

    async def persist(self, rec: AgentRecord) -> bool:
        done = await self._fenced(SQL_UPSERT_AGENT, self.zone, *_row_args(rec), self.epoch)
        if done:
            self._cached(rec)
        return done

    def _cached(self, *recs: AgentRecord) -> None:
        """Persisted changes to the cache service: queued for the link's own task, never waited for."""
        link = self.daemon.cache_link
        if link is not None:
            for rec in recs:
                link.agent_changed(rec.snap)

    async def _zone_status(self, available: bool) -> None:
        await self._fenced(SQL_ZONE_STATUS, self.zone, available, self.daemon.config.server, self.epoch)

    # ---- the term ---------------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            await self.takeover()
            # offers queued for agents when the previous master died: re-offered or closed (queue.py)
            self.requeued = await requeue_offers(self)
            await self._command_loop()
        finally:
            self.available = False
            for session in list(self.sessions.values()):
                session.abort()  # nothing of an ended term may reach a desktop; it reconnects elsewhere
            self.sessions.clear()
            for fut in self._reports.values():
                fut.cancel()
            for task in [*self._checks, *self._early.values(), *self._pending.values()]:
                task.cancel()

    async def takeover(self) -> None:
        t0 = time.monotonic()
        pool = await self.daemon.app_db()
        await self._zone_status(False)
        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT * FROM agents WHERE zone = $1", self.zone)
            raw_timeout = await conn.fetchval("SELECT value FROM pim_config WHERE key = $1",
                                              APP_SERVER_WAIT_TIMEOUT_KEY)
        async with self.lock:
            for r in rows:
                rec = AgentRecord.from_row(r)
                self.agents[rec.snap.agent_id] = rec
            self._loaded.set()
        known = sorted(a for a, rec in self.agents.items() if rec.snap.logged_in)
        # pim_config keeps the value in ms (migration 0001); the domain rule reads seconds
        timeout_s = app_server_wait_timeout_s(None if raw_timeout is None else str(float(raw_timeout) / 1000))
        report = TakeoverReport(self.epoch, known_agents=len(known))
        outage_start = await self._outage_start()
        # 2. wait for the nailing sessions (the desktops of the stored agents logging in again)
        deadline = t0 + timeout_s
        while known and not all(a in self.reconnected for a in known) and time.monotonic() < deadline:
            self._reconnect.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._reconnect.wait()
        report.wait_ms = (time.monotonic() - t0) * 1000
        # 3. what the platform reported while the zone had no master
        released, answered = await self._gap_events()
        # 4. desktop check
        # (the query of each desktop went out at its login, while the others were still coming back); a desktop
        # that has not answered within REPORT_BUDGET_S is checked on its own afterwards (``_late_check``, with
        # the same query). Not shorter: per-desktop checks are one fenced write each, a batch is one for all
        to_query = [a for a in known if a in self.reconnected and a in self.sessions]
        reports = await self._collect_reports(to_query, REPORT_BUDGET_S)
        nailing = resolve_nailing(
            {a: self.agents[a].nailed for a in known}, {a: self.reconnected[a] for a in known if a in self.reconnected},
            t0, timeout_s,
        )
        report.query_ms = (time.monotonic() - t0) * 1000 - report.wait_ms
        outcomes: dict[str, FailoverOutcome] = {}
        async with self.lock:
            end = datetime.now(UTC)
            report.outage_s = (end - outage_start).total_seconds()
            logs: list[tuple[Any, ...]] = []
            for i, a in enumerate(known):
                if i % YIELD_EVERY == YIELD_EVERY - 1:
                    await asyncio.sleep(0)  # the HA core's renewals share this loop: never starve them
                rec = self.agents[a]
                before = rec.snap
                res = nailing[a]
                call_kept = before.call_id is None or before.call_id not in released
                outcome = after_failover(
                    before, res.nailed, call_kept=call_kept, dial_answered=before.call_id in answered,
                    detach_job=res.detach_job,
                )
                desk = reports.get(a)
                if desk is not None:
                    check = check_desktop_state(before, desk.call_state, desk.call_id)
                    if not check.matches:
                        outcome = replace(outcome, after=AgentSnapshot(a, self.zone), force_logout=True,
                                          completion_code=check.completion_code)
                        self._log.warning("desktop state mismatch after takeover", detail=check.reason)
                outcomes[a] = outcome
                ha = ha_time_s(outage_start.timestamp(), end.timestamp(),
                               rec.login_time.timestamp() if rec.login_time else outage_start.timestamp())
                self._apply_outcome(rec, outcome, res.nailed, ha)
                report.by_agent[a] = outcome.describe()
                report.reconnected += a in self.reconnected
                report.desktop_errors += outcome.completion_code is CompletionCode.DESKTOP_ERROR or (
                    outcome.force_logout)
                report.nuisance += outcome.completion_code is CompletionCode.NUISANCE
                report.detached += outcome.job_detached
                logs.append((
                    a, before.call_state.value, rec.snap.call_state.value,
                    rec.snap.job_state.value if rec.snap.job_state else None,
                    outcome.column.name if outcome.column else None, outcome.call_effect.name, res.nailed,
                    outcome.job_detached, desk.call_state.value if desk else None,
                    outcome.completion_code.name if outcome.completion_code else None, outcome.force_logout,
                    before.call_id, ha,
                ))
            for a in known:
                o = outcomes[a]
                if a not in reports and not o.force_logout and self.agents[a].snap.logged_in:
                    ended = o.before.call_id if o.call_effect in (
                        CallEffect.DISCONNECT_REPORTED, CallEffect.RELEASED) else None
                    self.unchecked[a] = (o.before, ended)
            # every agent's row and failover-log row in one transaction of two statements (was 2 per agent)
            w0 = time.monotonic()
            if not await self._persist_takeover([self.agents[a] for a in known], logs):
                return  # no longer master: the term is ending
            report.write_ms = (time.monotonic() - w0) * 1000
            self.available = True
            await self._zone_status(True)
            s0 = time.monotonic()
            available = PomAvailable(zone=self.zone, master=self.daemon.config.server, epoch=self.epoch).to_bytes()
            items = list(self.sessions.items())
            for i in range(0, len(items), YIELD_EVERY):  # a chunk per loop turn (renewals go in between)
                await asyncio.gather(*(self._announce(a, session, outcomes.get(a), report, available)
                                       for a, session in items[i:i + YIELD_EVERY]))
            report.send_ms = (time.monotonic() - s0) * 1000
        report.total_ms = (time.monotonic() - t0) * 1000
        self.report = report
        self._log.info("zone taken over", known_agents=report.known_agents, reconnected=report.reconnected,
                       desktop_errors=report.desktop_errors, nuisance=report.nuisance, detached=report.detached,
                       wait_ms=round(report.wait_ms, 1), query_ms=round(report.query_ms, 1),
                       write_ms=round(report.write_ms, 1), send_ms=round(report.send_ms, 1),
                       total_ms=round(report.total_ms, 1), outage_s=round(report.outage_s, 3))

    async def _announce(self, agent_id: str, session: Session, outcome: FailoverOutcome | None,
                        report: TakeoverReport, available: bytes) -> None:
        """The end of the takeover at one desktop: POM_AVAILABLE + AGENT_STATE (+ the released call), or the
        forced logout of a desktop whose account did not match."""
        if agent_id in self.unchecked:
            self._start_check(agent_id, session)  # logged in after the STATE_QUERY round
            return
        if outcome is not None and outcome.force_logout:
            if self.sessions.get(agent_id) is session:
                self.sessions.pop(agent_id, None)
            await session.send(ForcedLogout(reason="desktop_error", detail=report.by_agent[agent_id][:2000]))
            session.detach()
            return
        await session.send_bytes(available)  # the same POM_AVAILABLE for every desktop, serialised once
        await session.send(state_frame(self.agents[agent_id].snap))
        if outcome is not None and outcome.call_effect in (
            CallEffect.DISCONNECT_REPORTED, CallEffect.RELEASED,
        ) and outcome.before.call_id:
            await session.send(CallEvent(call_id=outcome.before.call_id, event="released"))

    async def _persist_takeover(self, recs: list[AgentRecord], logs: list[tuple[Any, ...]]) -> bool:
        """The takeover's rows (``agents``) and ``agent_failover_log`` in one transaction under the fence."""
        if not recs:
            return True
        pool = await self.daemon.app_db()
        fence = LeaseFence(self.term.service, self.term.scope, self.term.epoch)
        timeout = self.daemon.timings.store_timeout_s
        cols = list(zip(*(_row_args(r) for r in recs), strict=True))
        log_cols = list(zip(*logs, strict=True))
        try:
            async with pool.acquire(timeout=timeout) as conn, conn.transaction():
                rows = await execute_fenced(conn, fence, SQL_UPSERT_AGENTS, self.zone, self.epoch,
                                            *[list(c) for c in cols], timeout_s=timeout)
                if not rows.fence_held:
                    raise _FenceLost
                await execute_fenced(conn, fence, SQL_FAILOVER_LOGS, self.zone, self.epoch,
                                     *[list(c) for c in log_cols], timeout_s=timeout)
        except _FenceLost:
            self._log.warning("fenced write refused: no longer master of the zone")
            return False
        self._cached(*recs)
        return True

    def _apply_outcome(self, rec: AgentRecord, outcome: FailoverOutcome, nailed: bool, ha: float) -> None:
        closed = outcome.before.call_id
        rec.snap = outcome.after
        rec.nailed = nailed and rec.snap.logged_in
        rec.ha_time_s += ha
        rec.failovers += 1 if ha > 0 else 0
        if outcome.completion_code is not None:
            rec.last_completion_code = outcome.completion_code.name
            rec.last_closed_call_id = closed
        if outcome.completion_code is CompletionCode.NUISANCE:
            rec.nuisance_calls += 1
        if outcome.force_logout:
            rec.desktop_errors += 1
            rec.login_time = None

    async def _outage_start(self) -> datetime:
        """When the zone's previous master was last alive: our lease's acquisition minus the gap the elector
        recorded in the take-over event; the acquisition itself when there was no previous master."""
        lease = self.elector.lease
        acquired = lease.acquired_at if lease is not None and lease.acquired_at is not None else datetime.now(UTC)
        pool = await self.daemon.app_db()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            row = await pool.fetchrow(
                "SELECT detail FROM ha_event WHERE service = $1 AND scope = $2 AND epoch = $3"
                " AND kind IN ('took_over', 'acquired') ORDER BY at DESC LIMIT 1",
                self.term.service, self.zone, self.epoch,
            )
            if row is not None:
                detail = row["detail"]
                if isinstance(detail, str):
                    detail = json.loads(detail)
                gap_ms = detail.get("gap_ms") if isinstance(detail, dict) else None
                return acquired - timedelta(milliseconds=float(gap_ms or 0))
            await asyncio.sleep(0.05)
        return acquired

    async def _gap_events(self) -> tuple[set[str], set[str]]:
        pool = await self.daemon.app_db()
        rows = await pool.fetch(
            "SELECT id, agent_id, event, call_id FROM agent_call_command WHERE zone = $1 AND applied_at IS NULL"
            " AND event IN ('released', 'answered') ORDER BY id", self.zone,
        )
        released: set[str] = set()
        answered: set[str] = set()
        done: list[int] = []
        for r in rows:
            rec = self.agents.get(r["agent_id"])
            if rec is None or rec.snap.call_id != r["call_id"]:
                continue  # not a call the stored state knows: the command loop applies (or refuses) it
            (released if r["event"] == "released" else answered).add(r["call_id"])
            done.append(int(r["id"]))
        if done:
            await self._fenced(SQL_GAP_EVENTS_DONE, done)
        return released, answered

    async def _collect_reports(self, agents: list[str], budget_s: float) -> dict[str, StateReport]:
        """The desktops' reports to the STATE_QUERY sent at their login (a new query when that one went
        unanswered), waited for at most ``budget_s``; the queries still open are kept in ``_pending`` for the
        agents' late checks."""
        tasks: dict[str, asyncio.Task[StateReport | None]] = {}
        for a in agents:
            task = self._early.pop(a, None)
            if task is None or (task.done() and (task.cancelled() or task.result() is None)):
                task = asyncio.create_task(self._query(a), name=f"state-query-{a}")
            tasks[a] = task
        for task in self._early.values():
            task.cancel()
        self._early.clear()
        if tasks:
            await asyncio.wait(tasks.values(), timeout=budget_s)
        out: dict[str, StateReport] = {}
        for a, task in tasks.items():
            if not task.done():
                self._pending[a] = task
            elif not task.cancelled() and (report := task.result()) is not None:
                out[a] = report
        return out

    async def _query(self, agent_id: str) -> StateReport | None:
        session = self.sessions.get(agent_id)
        if session is None:
            return None
        req = next(self._req)
        fut: asyncio.Future[StateReport] = asyncio.get_running_loop().create_future()
        self._reports[(agent_id, req)] = fut
        try:
            await session.send(StateQuery(req=req))
            async with asyncio.timeout(STATE_QUERY_TIMEOUT_S):
                return await fut
        except (TimeoutError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and not self.term.active:
                raise
            return None
        finally:
            self._reports.pop((agent_id, req), None)

    def on_state_report(self, session: Session, frame: StateReport) -> None:
        fut = self._reports.get((session.agent_id or "", frame.req))
        if fut is not None and not fut.done():
            fut.set_result(frame)

    # ---- desktops ---------------------------------------------------------------------------------------
    async def login(self, session: Session, frame: Login) -> None:
        await self._loaded.wait()
        async with self.lock:
            rec = self.agents.get(frame.agent_id)
            stored = rec is not None and rec.snap.logged_in  # the takeover checks this agent with its desktop
            if rec is None or not rec.snap.logged_in:
                base = rec.snap if rec else AgentSnapshot(frame.agent_id, self.zone)
                snap = apply(base, AgentEvent(EventKind.LOGIN))
                # the (simulated) application server reports the agent's nailing session at login
                now = datetime.now(UTC)
                rec = replace(rec, snap=snap, nailed=True, login_time=now) if rec else AgentRecord(
                    snap, nailed=True, login_time=now)
                if not await self.persist(rec):
                    await session.send(_error(frame.req, "zone_unavailable", f"zone {self.zone}: master term ended"))
                    return
                self.agents[frame.agent_id] = rec
            old = self.sessions.get(frame.agent_id)
            if old is not None and old is not session:
                await old.send(ForcedLogout(reason="second_login",
                                            detail=f"agent {frame.agent_id} logged in from desktop {frame.desktop_id}"))
                old.detach()
                old.close()
            session.attach(self, frame.agent_id)
            self.sessions[frame.agent_id] = session
            await session.send(LoginOk(
                req=frame.req, agent_id=frame.agent_id, zone=self.zone, session_id=session.session_id,
                master=self.daemon.config.server, epoch=self.epoch,
                heartbeat_interval_ms=self.daemon.desktop_heartbeat_ms,
                heartbeat_miss_limit=self.daemon.desktop_miss_limit,
                manager_addresses=self.daemon.manager_addresses,
            ))
            if not stored:
                self.unchecked.pop(frame.agent_id, None)  # logged out since the takeover: a fresh login
            if self.available and stored and frame.agent_id in self.unchecked:
                # a stored agent whose desktop returns after the takeover: checked like the others first
                await session.send(PomNotAvailable(zone=self.zone, reason=(
                    f"zone {self.zone}: checking agent {frame.agent_id}'s state with its desktop")))
                self._start_check(frame.agent_id, session)
            elif self.available:
                await session.send(PomAvailable(zone=self.zone, master=self.daemon.config.server, epoch=self.epoch))
                await session.send(state_frame(rec.snap))
            else:
                if self._taking_over is None:
                    self._taking_over = PomNotAvailable(zone=self.zone, reason=(
                        f"zone {self.zone}: {self.daemon.config.server} is taking the zone over")).to_bytes()
                await session.send_bytes(self._taking_over)
                self.reconnected.setdefault(frame.agent_id, time.monotonic())
                if stored:
                    # the desktop check's STATE_QUERY goes out now (compared with the stored pre-failover state,
                    # which a login cannot change), so the takeover need not wait a round trip per desktop; a
                    # query to an older session of the agent is dropped
                    stale = self._early.pop(frame.agent_id, None)
                    if stale is not None:
                        stale.cancel()
                    self._early[frame.agent_id] = asyncio.create_task(
                        self._query(frame.agent_id), name=f"state-query-{frame.agent_id}")
                self._reconnect.set()

    def _start_check(self, agent_id: str, session: Session) -> None:
        if agent_id in self.checking:
            return
        self.checking.add(agent_id)
        task = asyncio.create_task(self._late_check(agent_id, session), name=f"late-check-{agent_id}")
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _late_check(self, agent_id: str, session: Session) -> None:
        """The takeover's desktop check for an agent whose desktop came back after it: ``STATE_QUERY``, the report
        compared with the agent's pre-failover state (as in the takeover). A mismatch closes the call
        DESKTOP_ERROR and forces a logout; agreement gives ``POM_AVAILABLE`` + ``AGENT_STATE`` (+ ``CALL_EVENT
        released`` for a call the takeover ended). The agent's ``agent_failover_log`` row of this term records
        the desktop's state and the outcome. No answer within the query timeout is taken as agreement, as in the
        takeover."""
        try:
            pending = self._pending.pop(agent_id, None)
            desk = None
            if pending is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    desk = await pending
            if desk is None:
                desk = await self._query(agent_id)
            async with self.lock:
                if self.sessions.get(agent_id) is not session or not self.term.active:
                    return  # checked when its desktop logs in again
                entry = self.unchecked.pop(agent_id, None)
                if entry is None:
                    return
                before, ended = entry
                rec = self.agents[agent_id]
                check = None if desk is None else check_desktop_state(before, desk.call_state, desk.call_id)
                desk_state = None if desk is None else desk.call_state.value
                if check is not None and not check.matches:
                    new = replace(rec, snap=AgentSnapshot(agent_id, self.zone), nailed=False, login_time=None,
                                  desktop_errors=rec.desktop_errors + 1)
                    code = check.completion_code.name if check.completion_code else None
                    if code is not None:
                        new.last_completion_code = code
                        new.last_closed_call_id = rec.snap.call_id or before.call_id
                    if not await self.persist(new):
                        return
                    self.agents[agent_id] = new
                    await self._fenced(SQL_LATE_CHECK_LOG, self.zone, agent_id, self.epoch, desk_state, True, code,
                                       "Idle")
                    self._log.warning("late desktop state mismatch", detail=check.reason)
                    if self.report is not None and self.report.epoch == self.epoch:
                        self.report.desktop_errors += 1
                    self.sessions.pop(agent_id, None)
                    await session.send(ForcedLogout(reason="desktop_error", detail=check.reason[:2000]))
                    session.detach()
                    return
                await self._fenced(SQL_LATE_CHECK_LOG, self.zone, agent_id, self.epoch, desk_state, False, None, None)
                await session.send(PomAvailable(zone=self.zone, master=self.daemon.config.server, epoch=self.epoch))
                await session.send(state_frame(rec.snap))
                if ended is not None:
                    await session.send(CallEvent(call_id=ended, event="released"))
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._log.warning("late desktop check failed; the desktop is closed and will log in again",
                              agent=agent_id, error=str(exc))
            session.abort()
        finally:
            self.checking.discard(agent_id)

    async def reset(self, reason: Any, detail: str, *, keep_closed: bool) -> int | None:
        """Force every logged-in agent of the zone out (``FORCED_LOGOUT reason``), persisted first (one
        statement); with ``keep_closed`` logins stay refused afterwards (the zone is about to be released). The
        number of agents logged out, or None when the fence was lost (no longer master).

        ``zone_reset`` ("Save and Apply"): a call in progress is recorded closed with ``ZONE_RESET``.
        ``sdk_connection_lost`` (workspaces: the agent SDK's link broke, ``after_sdk_connection_lost``): a call
        the agent was on is closed ``DESKTOP_ERROR`` (counted in ``desktop_errors``), an answered call still
        pending for the agent is marked ``NUISANCE``; the agent is logged out at once (the guide logs a busy
        agent out when its call ends, but with the SDK link gone the AM cannot follow the call to its end; the
        platform's later ``released`` of it is recorded as refused, not lost)."""
        async with self.lock:
            self.resetting = True
            changed: list[AgentRecord] = []
            for agent_id, rec in list(self.agents.items()):
                if not rec.snap.logged_in:
                    continue
                new = replace(rec, snap=AgentSnapshot(agent_id, self.zone), nailed=False, login_time=None)
                if rec.snap.call_id is not None:
                    new.last_closed_call_id = rec.snap.call_id
                    new.last_completion_code = "ZONE_RESET"
                if reason == "sdk_connection_lost":
                    code = after_sdk_connection_lost(rec.snap).completion_code
                    if rec.snap.call_state is CallState.PENDING_CALL:
                        new.last_completion_code, new.nuisance_calls = "NUISANCE", rec.nuisance_calls + 1
                    elif code is not None:
                        new.last_completion_code, new.desktop_errors = code.name, rec.desktop_errors + 1
                changed.append(new)
            if not await self._persist_many(changed):
                return None
            for new in changed:
                self.agents[new.snap.agent_id] = new
            for agent_id, session in list(self.sessions.items()):
                self.sessions.pop(agent_id, None)
                await session.send(ForcedLogout(reason=reason, detail=detail[:2000]))
                session.detach()
                session.close()
            if not keep_closed:
                self.resetting = False
            return len(changed)

    async def _persist_many(self, recs: list[AgentRecord]) -> bool:
        """Rows of many agents in one fenced statement."""
        if not recs:
            return True
        cols = list(zip(*(_row_args(r) for r in recs), strict=True))
        done = await self._fenced(SQL_UPSERT_AGENTS, self.zone, self.epoch, *[list(c) for c in cols])
        if done:
            self._cached(*recs)
        return done

    def reopen(self) -> None:
        self.resetting = False

    def session_closed(self, session: Session) -> None:
        if session.agent_id is not None and self.sessions.get(session.agent_id) is session:
            del self.sessions[session.agent_id]

    async def request(self, session: Session, frame: ToManager) -> None:
        req = getattr(frame, "req", None)
        if not self.available:
            await session.send(_error(req, "zone_unavailable",
                                      f"zone {self.zone} is being taken over: POM not available"))
            return
        if session.agent_id in self.checking:
            await session.send(_error(req, "zone_unavailable", f"zone {self.zone}: agent {session.agent_id}'s state "
                                      "is being checked with its desktop: POM not available"))
            return
        agent_id = session.agent_id
        assert agent_id is not None
        async with self.lock:
            rec = self.agents[agent_id]
            try:
                changes = self._changes(rec, frame)
            except InvalidAgentTransition as exc:
                await session.send(_error(req, "invalid_transition", str(exc)))
                return
            for changed, _note in changes:
                if not await self.persist(changed):
                    await session.send(_error(req, "zone_unavailable", f"zone {self.zone}: master term ended"))
                    return
                self.agents[changed.snap.agent_id] = changed
            if isinstance(frame, Logout):
                self.sessions.pop(agent_id, None)
            await session.send(Ok(req=req if req is not None else 0))
            for changed, note in changes:
                target = self.sessions.get(changed.snap.agent_id) if changed.snap.agent_id != agent_id else session
                if target is None:
                    continue
                if note is not None:
                    await target.send(note)
                await target.send(state_frame(changed.snap))
            if isinstance(frame, WrapUp) and self.daemon.cache_link is not None:
                # its callback to the cache after the OK; a refusal is an ERROR callback_refused (cache_link.py)
                self.daemon.cache_link.wrap_up(session, self.zone, rec.snap, frame)
        if isinstance(frame, Logout):
            session.detach()

    def _changes(self, rec: AgentRecord, frame: ToManager) -> list[tuple[AgentRecord, Any]]:
        """The records the request changes (the requester first) and the frame each other agent is sent."""
        snap = rec.snap
        new = replace(rec)
        if isinstance(frame, Logout):
            new.snap = apply(snap, AgentEvent(EventKind.LOGOUT))
            new.nailed, new.login_time = False, None
            return [(new, None)]
        event = self._event_of(snap, frame)
        new.snap = apply(snap, event)
        if isinstance(frame, WrapUp):
            new.last_completion_code, new.last_closed_call_id = frame.completion_code, frame.call_id
        out: list[tuple[AgentRecord, Any]] = [(new, None)]
        if isinstance(frame, CallEvent) and event.kind is EventKind.CONSULT:
            other = self.agents.get(frame.consult_agent_id or "")
            if other is None or other.snap.agent_id == snap.agent_id:
                raise InvalidAgentTransition(
                    f"{snap.describe()}: cannot consult: agent {frame.consult_agent_id!r} is not in zone {self.zone}")
            joined = replace(other, snap=apply(other.snap, AgentEvent(EventKind.CONSULT_JOINED, call_id=frame.call_id)))
            out.append((joined, CallEvent(call_id=frame.call_id, event="consult_joined")))
        elif isinstance(frame, CallEvent) and event.kind in _PASSIVE_FOLLOWS and snap.role is CallRole.OWNER:
            for other in self._passives(snap.call_id):
                moved = replace(other, snap=apply(other.snap, AgentEvent(event.kind, call_id=frame.call_id)))
                out.append((moved, CallEvent(call_id=frame.call_id, event=frame.event)))
        return out

    def _passives(self, call_id: str | None) -> Iterable[AgentRecord]:
        return [r for r in self.agents.values()
                if call_id is not None and r.snap.call_id == call_id and r.snap.role is CallRole.PASSIVE]

    def _event_of(self, snap: AgentSnapshot, frame: ToManager) -> AgentEvent:
        if isinstance(frame, Ready):
            return AgentEvent(EventKind.READY)
        if isinstance(frame, NotReady):
            return AgentEvent(EventKind.NOT_READY)
        if isinstance(frame, JobAttach):
            return AgentEvent(EventKind.JOB_ATTACH, job_id=frame.job_id)
        call_id: str
        if isinstance(frame, PreviewAccept | PreviewCancel | CallbackAccept | WrapUp | CallEvent):
            call_id = frame.call_id
        else:
            raise InvalidAgentTransition(f"{snap.describe()}: cannot handle {type(frame).__name__}")
        if snap.call_id is not None and call_id != snap.call_id:
            raise InvalidAgentTransition(f"{snap.describe()}: call {call_id} is not the agent's call {snap.call_id}")
        kinds: dict[type, EventKind] = {
            PreviewAccept: EventKind.PREVIEW_ACCEPT, PreviewCancel: EventKind.PREVIEW_CANCEL,
            CallbackAccept: EventKind.CALLBACK_ACCEPT,
        }
        if isinstance(frame, WrapUp):
            return AgentEvent(EventKind.WRAP_UP, call_id=call_id, completion_code=frame.completion_code)
        if isinstance(frame, CallEvent):
            return frame.to_agent_event()
        return AgentEvent(kinds[type(frame)], call_id=call_id)

    # ---- the platform's call events ----------------------------------------------------------------------
    async def _command_loop(self) -> None:
        pool = await self.daemon.app_db()
        conn = await pool.acquire()
        listener: Callable[..., None] = lambda *_a: self._commands.set()  # noqa: E731
        try:
            await conn.add_listener("agent_call_command", listener)
            while True:
                self._commands.clear()
                rows = await conn.fetch(
                    "SELECT * FROM agent_call_command WHERE zone = $1 AND applied_at IS NULL ORDER BY id LIMIT 500",
                    self.zone,
                )
                try:
                    for r in rows:
                        await self._command(r)
                except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    self._log.warning("cannot apply call events now; retrying", error=str(exc))
                    await asyncio.sleep(COMMAND_POLL_S)
                    continue
                if rows:
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(COMMAND_POLL_S):
                        await self._commands.wait()
        finally:
            with contextlib.suppress(Exception):
                await conn.remove_listener("agent_call_command", listener)
            await pool.release(conn)

    async def _command(self, r: Any) -> None:
        kind = COMMAND_EVENTS[r["event"]]
        call_id = str(r["call_id"])
        async with self.lock:
            rec = self.agents.get(r["agent_id"])
            changes: list[tuple[AgentRecord, Any]] = []
            try:
                if rec is None:
                    raise InvalidAgentTransition(f"agent {r['agent_id']} is not known in zone {self.zone}")
                if kind in (EventKind.ANSWERED, EventKind.RELEASED) and rec.snap.call_id != call_id:
                    raise InvalidAgentTransition(f"{rec.snap.describe()}: call {call_id} is not the agent's call")
                new = replace(rec, snap=apply(rec.snap, AgentEvent(kind, call_id=call_id)))
                changes.append((new, self._offer_frame(kind, r, new.snap)))
                if kind is EventKind.RELEASED and rec.snap.role is CallRole.OWNER:
                    for other in self._passives(call_id):
                        moved = replace(other, snap=apply(other.snap, AgentEvent(kind, call_id=call_id)))
                        changes.append((moved, CallEvent(call_id=call_id, event="released")))
                result = f"ok: {new.snap.call_state.value}"
            except InvalidAgentTransition as exc:
                result = f"refused: {exc}"[:2000]
            for changed, _ in changes:
                if not await self.persist(changed):
                    return  # no longer master: the command stays pending for the zone's next master
            for changed, _ in changes:
                self.agents[changed.snap.agent_id] = changed
            await self._fenced(SQL_COMMAND_DONE, r["id"], result)
            for changed, note in changes:
                session = self.sessions.get(changed.snap.agent_id)
                if session is not None:
                    await session.send(note)
                    await session.send(state_frame(changed.snap))

    def _offer_frame(self, kind: EventKind, r: Any, snap: AgentSnapshot) -> Any:
        job_id = r["job_id"] or snap.job_id or "none"
        contact = r["contact_id"] or r["call_id"]
        phone = r["phone"] or "+10000000000"
        if kind is EventKind.PREVIEW_OFFERED:
            return PreviewOffered(call_id=r["call_id"], job_id=job_id, contact_id=contact, phone=phone)
        if kind is EventKind.CALLBACK_OFFERED:
            return CallbackOffered(call_id=r["call_id"], job_id=job_id, contact_id=contact, phone=phone,
                                   due_at=datetime.now(UTC))
        return CallEvent(call_id=r["call_id"], event=r["event"])
