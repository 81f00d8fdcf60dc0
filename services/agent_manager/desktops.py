"""The desktops of one zone under one master term: logins, requests, and the desktop check of the takeover.

A LOGIN during the takeover gets ``POM_NOT_AVAILABLE`` and, for a stored agent, its ``STATE_QUERY`` at once (the
takeover compares the report with the stored state). A stored agent whose desktop returns after the takeover is
checked on its own (:meth:`Desktops.start_check`): a mismatch closes the call DESKTOP_ERROR and forces a logout.
Requests change the agent's state machine (``pom_ha.domain.agents.apply``), persisted before the OK.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg

from pom_ha.desktop.protocol import (
    CallbackAccept,
    CallEvent,
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
    Ready,
    StateQuery,
    StateReport,
    ToManager,
    WrapUp,
)
from pom_ha.domain.agents import (
    AgentEvent,
    AgentSnapshot,
    CallRole,
    EventKind,
    InvalidAgentTransition,
    apply,
    check_desktop_state,
)
from pom_ha.domain.takeover import AgentRecord
from services.agent_manager.session import Session
from services.agent_manager.zone_state import SQL_LATE_CHECK_LOG, ZoneState, error_frame, state_frame

STATE_QUERY_TIMEOUT_S = 2.0
# Owner call events that carry the consulted (passive) agent along.
PASSIVE_FOLLOWS = {EventKind.CONFERENCE, EventKind.CONSULT_ENDED, EventKind.RELEASED}


def passives(agents: dict[str, AgentRecord], call_id: str | None) -> Iterable[AgentRecord]:
    """The passive (consulted) agents on ``call_id``."""
    return [r for r in agents.values()
            if call_id is not None and r.snap.call_id == call_id and r.snap.role is CallRole.PASSIVE]


def event_of(snap: AgentSnapshot, frame: ToManager) -> AgentEvent:
    """The state machine's event for a desktop's request."""
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


def request_changes(agents: dict[str, AgentRecord], zone: str, rec: AgentRecord,
                    frame: ToManager) -> list[tuple[AgentRecord, Any]]:
    """The records the request changes (the requester first) and the frame each other agent is sent."""
    snap = rec.snap
    new = replace(rec)
    if isinstance(frame, Logout):
        new.snap = apply(snap, AgentEvent(EventKind.LOGOUT))
        new.nailed, new.login_time = False, None
        return [(new, None)]
    event = event_of(snap, frame)
    new.snap = apply(snap, event)
    if isinstance(frame, WrapUp):
        new.last_completion_code, new.last_closed_call_id = frame.completion_code, frame.call_id
    out: list[tuple[AgentRecord, Any]] = [(new, None)]
    if isinstance(frame, CallEvent) and event.kind is EventKind.CONSULT:
        other = agents.get(frame.consult_agent_id or "")
        if other is None or other.snap.agent_id == snap.agent_id:
            raise InvalidAgentTransition(
                f"{snap.describe()}: cannot consult: agent {frame.consult_agent_id!r} is not in zone {zone}")
        joined = replace(other, snap=apply(other.snap, AgentEvent(EventKind.CONSULT_JOINED, call_id=frame.call_id)))
        out.append((joined, CallEvent(call_id=frame.call_id, event="consult_joined")))
    elif isinstance(frame, CallEvent) and event.kind in PASSIVE_FOLLOWS and snap.role is CallRole.OWNER:
        for other in passives(agents, snap.call_id):
            moved = replace(other, snap=apply(other.snap, AgentEvent(event.kind, call_id=frame.call_id)))
            out.append((moved, CallEvent(call_id=frame.call_id, event=frame.event)))
    return out


class Desktops:
    def __init__(self, z: ZoneState) -> None:
        self.z = z
        self.reconnected: dict[str, float] = {}
        # agents the takeover could not check with their desktop (not back in time): their pre-failover state and
        # the call the takeover ended; checked when their desktop logs in later (``start_check``)
        self.unchecked: dict[str, tuple[AgentSnapshot, str | None]] = {}
        self.checking: set[str] = set()
        self.reconnect = asyncio.Event()
        self.loaded = asyncio.Event()  # logins wait for the stored rows (a login must not overwrite one)
        self._early: dict[str, asyncio.Task[StateReport | None]] = {}
        self._pending: dict[str, asyncio.Task[StateReport | None]] = {}  # queries past the takeover's budget
        self._taking_over: bytes | None = None  # the POM_NOT_AVAILABLE of a login during the takeover
        self._checks: set[asyncio.Task[None]] = set()
        self._reports: dict[tuple[str, int | str], asyncio.Future[StateReport]] = {}
        self._req = itertools.count(1)

    # what the daemon asks of the runtime a session is attached to
    @property
    def term(self) -> Any:
        return self.z.term

    @property
    def zone(self) -> str:
        return self.z.zone

    def close(self) -> None:
        """The term ended: nothing of it may reach a desktop any more (each reconnects elsewhere)."""
        for session in list(self.z.sessions.values()):
            session.abort()
        self.z.sessions.clear()
        for fut in self._reports.values():
            fut.cancel()
        for task in [*self._checks, *self._early.values(), *self._pending.values()]:
            task.cancel()

    async def login(self, session: Session, frame: Login) -> None:
        await self.loaded.wait()
        async with self.z.lock:
            rec = self.z.agents.get(frame.agent_id)
            stored = rec is not None and rec.snap.logged_in  # the takeover checks this agent with its desktop
            if rec is None or not rec.snap.logged_in:
                base = rec.snap if rec else AgentSnapshot(frame.agent_id, self.z.zone)
                snap = apply(base, AgentEvent(EventKind.LOGIN))
                # the (simulated) application server reports the agent's nailing session at login
                now = datetime.now(UTC)
                rec = replace(rec, snap=snap, nailed=True, login_time=now) if rec else AgentRecord(
                    snap, nailed=True, login_time=now)
                if not await self.z.persist(rec):
                    await session.send(error_frame(frame.req, "zone_unavailable",
                                                   f"zone {self.z.zone}: master term ended"))
                    return
                self.z.agents[frame.agent_id] = rec
            old = self.z.sessions.get(frame.agent_id)
            if old is not None and old is not session:
                await old.send(ForcedLogout(reason="second_login",
                                            detail=f"agent {frame.agent_id} logged in from desktop {frame.desktop_id}"))
                old.detach()
                old.close()
            session.attach(self, frame.agent_id)
            self.z.sessions[frame.agent_id] = session
            await session.send(LoginOk(
                req=frame.req, agent_id=frame.agent_id, zone=self.z.zone, session_id=session.session_id,
                master=self.z.server, epoch=self.z.epoch,
                heartbeat_interval_ms=self.z.desktop.heartbeat_interval_ms,
                heartbeat_miss_limit=self.z.desktop.miss_limit,
                manager_addresses=self.z.desktop.manager_addresses,
            ))
            if not stored:
                self.unchecked.pop(frame.agent_id, None)  # logged out since the takeover: a fresh login
            if self.z.available and stored and frame.agent_id in self.unchecked:
                # a stored agent whose desktop returns after the takeover: checked like the others first
                await session.send(PomNotAvailable(zone=self.z.zone, reason=(
                    f"zone {self.z.zone}: checking agent {frame.agent_id}'s state with its desktop")))
                self.start_check(frame.agent_id, session)
            elif self.z.available:
                await session.send(PomAvailable(zone=self.z.zone, master=self.z.server, epoch=self.z.epoch))
                await session.send(state_frame(rec.snap))
            else:
                if self._taking_over is None:
                    self._taking_over = PomNotAvailable(zone=self.z.zone, reason=(
                        f"zone {self.z.zone}: {self.z.server} is taking the zone over")).to_bytes()
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
                self.reconnect.set()

    def session_closed(self, session: Session) -> None:
        if session.agent_id is not None and self.z.sessions.get(session.agent_id) is session:
            del self.z.sessions[session.agent_id]

    async def request(self, session: Session, frame: ToManager) -> None:
        req = getattr(frame, "req", None)
        if not self.z.available:
            await session.send(error_frame(req, "zone_unavailable",
                                           f"zone {self.z.zone} is being taken over: POM not available"))
            return
        if session.agent_id in self.checking:
            await session.send(error_frame(req, "zone_unavailable",
                                           f"zone {self.z.zone}: agent {session.agent_id}'s state "
                                           "is being checked with its desktop: POM not available"))
            return
        agent_id = session.agent_id
        assert agent_id is not None
        async with self.z.lock:
            rec = self.z.agents[agent_id]
            try:
                changes = self.changes(rec, frame)
            except InvalidAgentTransition as exc:
                await session.send(error_frame(req, "invalid_transition", str(exc)))
                return
            for changed, _note in changes:
                if not await self.z.persist(changed):
                    await session.send(error_frame(req, "zone_unavailable", f"zone {self.z.zone}: master term ended"))
                    return
                self.z.agents[changed.snap.agent_id] = changed
            if isinstance(frame, Logout):
                self.z.sessions.pop(agent_id, None)
            await session.send(Ok(req=req if req is not None else 0))
            for changed, note in changes:
                target = self.z.sessions.get(changed.snap.agent_id) if changed.snap.agent_id != agent_id else session
                if target is None:
                    continue
                if note is not None:
                    await target.send(note)
                await target.send(state_frame(changed.snap))
            if isinstance(frame, WrapUp) and self.z.ports.sinks.cache is not None:
                # its callback to the cache after the OK; a refusal is an ERROR callback_refused (cache_link.py)
                self.z.ports.sinks.cache.wrap_up(session, self.z.zone, rec.snap, frame)
        if isinstance(frame, Logout):
            session.detach()

    def changes(self, rec: AgentRecord, frame: ToManager) -> list[tuple[AgentRecord, Any]]:
        return request_changes(self.z.agents, self.z.zone, rec, frame)

    def on_state_report(self, session: Session, frame: StateReport) -> None:
        fut = self._reports.get((session.agent_id or "", frame.req))
        if fut is not None and not fut.done():
            fut.set_result(frame)

    async def collect_reports(self, agents: list[str], budget_s: float) -> dict[str, StateReport]:
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
        session = self.z.sessions.get(agent_id)
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
            if isinstance(exc, asyncio.CancelledError) and not self.z.term.active:
                raise
            return None
        finally:
            self._reports.pop((agent_id, req), None)

    def start_check(self, agent_id: str, session: Session) -> None:
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
            async with self.z.lock:
                if self.z.sessions.get(agent_id) is not session or not self.z.term.active:
                    return  # checked when its desktop logs in again
                entry = self.unchecked.pop(agent_id, None)
                if entry is None:
                    return
                before, ended = entry
                rec = self.z.agents[agent_id]
                check = None if desk is None else check_desktop_state(before, desk.call_state, desk.call_id)
                desk_state = None if desk is None else desk.call_state.value
                if check is not None and not check.matches:
                    new = replace(rec, snap=AgentSnapshot(agent_id, self.z.zone), nailed=False, login_time=None,
                                  desktop_errors=rec.desktop_errors + 1)
                    code = check.completion_code.name if check.completion_code else None
                    if code is not None:
                        new.last_completion_code = code
                        new.last_closed_call_id = rec.snap.call_id or before.call_id
                    if not await self.z.persist(new):
                        return
                    self.z.agents[agent_id] = new
                    await self.z.fenced(SQL_LATE_CHECK_LOG, self.z.zone, agent_id, self.z.epoch, desk_state, True, code,
                                       "Idle")
                    self.z.log.warning("late desktop state mismatch", detail=check.reason)
                    if self.z.report is not None and self.z.report.epoch == self.z.epoch:
                        self.z.report.desktop_errors += 1
                    self.z.sessions.pop(agent_id, None)
                    await session.send(ForcedLogout(reason="desktop_error", detail=check.reason[:2000]))
                    session.detach()
                    return
                await self.z.fenced(SQL_LATE_CHECK_LOG, self.z.zone, agent_id, self.z.epoch, desk_state, False, None,
                                    None)
                await session.send(PomAvailable(zone=self.z.zone, master=self.z.server, epoch=self.z.epoch))
                await session.send(state_frame(rec.snap))
                if ended is not None:
                    await session.send(CallEvent(call_id=ended, event="released"))
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self.z.log.warning("late desktop check failed; the desktop is closed and will log in again",
                              agent=agent_id, error=str(exc))
            session.abort()
        finally:
            self.checking.discard(agent_id)
