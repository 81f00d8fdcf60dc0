"""The takeover that starts every master term of a zone: plan -> persist -> announce.

1. ``agent_zone_status`` says the zone is unavailable; the stored rows of the zone are loaded.
2. Desktops that log in meanwhile get ``LOGIN_OK`` + ``POM_NOT_AVAILABLE``. A stored agent's login is its
   (simulated) application server reporting its nailing session; the master waits until every stored
   logged-in agent has reported, or AppServerWaitTimeOut (``pim_config``, ms) has passed.
3. Platform call events written while the zone had no master are read as what happened during the gap:
   ``released`` = the customer call was disconnected, ``answered`` = a dial was answered.
4. Each reconnected desktop gets ``STATE_QUERY``; its report is compared with the stored (pre-failover)
   state. **Plan**: :func:`pom_ha.domain.takeover.plan_agent` per agent (Table 9, ``resolve_nailing``, the
   desktop check, the outage added to each agent's Total HA time).
5. **Persist**: rows and one ``agent_failover_log`` row per agent in one fenced transaction. **Announce**:
   ``agent_zone_status`` available, then ``POM_AVAILABLE`` + ``AGENT_STATE`` (+ ``CALL_EVENT released`` for
   calls that ended) to every desktop, or the forced logout of a desktop whose account did not match.

A first start with no stored agents goes through it in a few ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from pom_ha.desktop.protocol import CallEvent, ForcedLogout, PomAvailable
from pom_ha.domain.agents import APP_SERVER_WAIT_TIMEOUT_KEY, resolve_nailing
from pom_ha.domain.attempts import CompletionCode
from pom_ha.domain.takeover import AgentPlan, AgentRecord, app_server_wait_timeout_from_config_s, plan_agent
from services.agent_manager.desktops import STATE_QUERY_TIMEOUT_S, Desktops
from services.agent_manager.session import Session
from services.agent_manager.zone_state import SQL_GAP_EVENTS_DONE, TakeoverReport, ZoneState, state_frame

YIELD_EVERY = 100  # agents handled per event-loop turn in the takeover's loops
REPORT_BUDGET_S = STATE_QUERY_TIMEOUT_S  # the takeover waits this long for the reports once all desktops are back


class Takeover:
    def __init__(self, z: ZoneState, desktops: Desktops, lease_acquired_at: Callable[[], datetime | None]) -> None:
        self.z = z
        self.desktops = desktops
        self.lease_acquired_at = lease_acquired_at

    async def run(self) -> None:
        z, desks = self.z, self.desktops
        t0 = time.monotonic()
        pool = await z.ports.pool()
        await z.zone_status(False)
        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT * FROM agents WHERE zone = $1", z.zone)
            raw_timeout = await conn.fetchval("SELECT value FROM pim_config WHERE key = $1",
                                              APP_SERVER_WAIT_TIMEOUT_KEY)
        async with z.lock:
            for r in rows:
                rec = AgentRecord.from_row(r)
                z.agents[rec.snap.agent_id] = rec
            desks.loaded.set()
        known = sorted(a for a, rec in z.agents.items() if rec.snap.logged_in)
        timeout_s = app_server_wait_timeout_from_config_s(raw_timeout)
        report = TakeoverReport(z.epoch, known_agents=len(known))
        outage_start = await self._outage_start()
        # 2. wait for the nailing sessions (the desktops of the stored agents logging in again)
        deadline = t0 + timeout_s
        while known and not all(a in desks.reconnected for a in known) and time.monotonic() < deadline:
            desks.reconnect.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await desks.reconnect.wait()
        report.wait_ms = (time.monotonic() - t0) * 1000
        # 3. what the platform reported while the zone had no master
        released, answered = await self._gap_events()
        # 4. desktop check: the reports to the STATE_QUERY sent at each desktop's login (the query of each desktop
        # went out at its login, while the others were still coming back); a desktop that has not answered
        # within REPORT_BUDGET_S is checked on its own afterwards (``Desktops.start_check``, with the same
        # query). Not shorter: per-desktop checks are one fenced write each, a batch is one for all
        to_query = [a for a in known if a in desks.reconnected and a in z.sessions]
        reports = await desks.collect_reports(to_query, REPORT_BUDGET_S)
        nailing = resolve_nailing(
            {a: z.agents[a].nailed for a in known}, {a: desks.reconnected[a] for a in known if a in desks.reconnected},
            t0, timeout_s,
        )
        report.query_ms = (time.monotonic() - t0) * 1000 - report.wait_ms
        async with z.lock:
            end = datetime.now(UTC)
            report.outage_s = (end - outage_start).total_seconds()
            plans: dict[str, AgentPlan] = {}
            for i, a in enumerate(known):  # plan
                if i % YIELD_EVERY == YIELD_EVERY - 1:
                    await asyncio.sleep(0)  # the HA core's renewals share this loop: never starve them
                desk = reports.get(a)
                plan = plans[a] = plan_agent(
                    z.agents[a], zone=z.zone, nailed=nailing[a].nailed, detach_job=nailing[a].detach_job,
                    released=released, answered=answered,
                    desk=None if desk is None else (desk.call_state, desk.call_id), outage_start=outage_start, end=end)
                if plan.mismatch is not None:
                    z.log.warning("desktop state mismatch after takeover", detail=plan.mismatch)
                z.agents[a] = plan.record
                self._count(report, a, plan)
            for a, plan in plans.items():
                if a not in reports and not plan.outcome.force_logout and plan.record.snap.logged_in:
                    desks.unchecked[a] = (plan.outcome.before, plan.ended_call)
            # persist: every agent's row and failover-log row in one transaction of two statements
            w0 = time.monotonic()
            if not await z.persist_takeover([plans[a].record for a in known], [plans[a].log_row for a in known]):
                return  # no longer master: the term is ending
            report.write_ms = (time.monotonic() - w0) * 1000
            # announce
            z.available = True
            await z.zone_status(True)
            s0 = time.monotonic()
            available = PomAvailable(zone=z.zone, master=z.server, epoch=z.epoch).to_bytes()
            items = list(z.sessions.items())
            for i in range(0, len(items), YIELD_EVERY):  # a chunk per loop turn (renewals go in between)
                await asyncio.gather(*(self._announce(a, session, plans.get(a), report, available)
                                       for a, session in items[i:i + YIELD_EVERY]))
            report.send_ms = (time.monotonic() - s0) * 1000
        report.total_ms = (time.monotonic() - t0) * 1000
        z.report = report
        z.log.info("zone taken over", known_agents=report.known_agents, reconnected=report.reconnected,
                   desktop_errors=report.desktop_errors, nuisance=report.nuisance, detached=report.detached,
                   wait_ms=round(report.wait_ms, 1), query_ms=round(report.query_ms, 1),
                   write_ms=round(report.write_ms, 1), send_ms=round(report.send_ms, 1),
                   total_ms=round(report.total_ms, 1), outage_s=round(report.outage_s, 3))

    def _count(self, report: TakeoverReport, agent_id: str, plan: AgentPlan) -> None:
        outcome = plan.outcome
        report.by_agent[agent_id] = outcome.describe()
        report.reconnected += agent_id in self.desktops.reconnected
        report.desktop_errors += outcome.completion_code is CompletionCode.DESKTOP_ERROR or outcome.force_logout
        report.nuisance += outcome.completion_code is CompletionCode.NUISANCE
        report.detached += outcome.job_detached

    async def _announce(self, agent_id: str, session: Session, plan: AgentPlan | None, report: TakeoverReport,
                        available: bytes) -> None:
        """The end of the takeover at one desktop: POM_AVAILABLE + AGENT_STATE (+ the released call), or the
        forced logout of a desktop whose account did not match."""
        z = self.z
        if agent_id in self.desktops.unchecked:
            self.desktops.start_check(agent_id, session)  # logged in after the STATE_QUERY round
            return
        if plan is not None and plan.outcome.force_logout:
            if z.sessions.get(agent_id) is session:
                z.sessions.pop(agent_id, None)
            await session.send(ForcedLogout(reason="desktop_error", detail=report.by_agent[agent_id][:2000]))
            session.detach()
            return
        await session.send_bytes(available)  # the same POM_AVAILABLE for every desktop, serialised once
        await session.send(state_frame(z.agents[agent_id].snap))
        if plan is not None and plan.ended_call:
            await session.send(CallEvent(call_id=plan.ended_call, event="released"))

    async def _outage_start(self) -> datetime:
        """When the zone's previous master was last alive: our lease's acquisition minus the gap the elector
        recorded in the take-over event; the acquisition itself when there was no previous master."""
        z = self.z
        acquired = self.lease_acquired_at() or datetime.now(UTC)
        pool = await z.ports.pool()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            row = await pool.fetchrow(
                "SELECT detail FROM ha_event WHERE service = $1 AND scope = $2 AND epoch = $3"
                " AND kind IN ('took_over', 'acquired') ORDER BY at DESC LIMIT 1",
                z.term.service, z.zone, z.epoch,
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
        z = self.z
        pool = await z.ports.pool()
        rows = await pool.fetch(
            "SELECT id, agent_id, event, call_id FROM agent_call_command WHERE zone = $1 AND applied_at IS NULL"
            " AND event IN ('released', 'answered') ORDER BY id", z.zone,
        )
        released: set[str] = set()
        answered: set[str] = set()
        done: list[int] = []
        for r in rows:
            rec = z.agents.get(r["agent_id"])
            if rec is None or rec.snap.call_id != r["call_id"]:
                continue  # not a call the stored state knows: the command loop applies (or refuses) it
            (released if r["event"] == "released" else answered).add(r["call_id"])
            done.append(int(r["id"]))
        if done:
            await z.fenced(SQL_GAP_EVENTS_DONE, done)
        return released, answered
