"""The platform's call events for one zone under one master term (``agent_call_command``, in id order, woken by
NOTIFY): each is applied to its agent's state machine, persisted, marked done and sent to the desktop; first, the
offers queued when the previous master failed are kept, re-offered or closed (:mod:`.queue`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg

from pom_ha.desktop.protocol import CallbackOffered, CallEvent, PreviewOffered
from pom_ha.domain.agents import AgentEvent, AgentSnapshot, CallRole, EventKind, InvalidAgentTransition, apply
from pom_ha.domain.takeover import AgentRecord
from services.agent_manager.desktops import passives
from services.agent_manager.queue import requeue_offers
from services.agent_manager.zone_state import SQL_COMMAND_DONE, ZoneState, state_frame

COMMAND_POLL_S = 1.0
COMMAND_EVENTS = {
    "offered": EventKind.OFFERED, "preview_offered": EventKind.PREVIEW_OFFERED,
    "callback_offered": EventKind.CALLBACK_OFFERED, "dial_started": EventKind.DIAL_STARTED,
    "answered": EventKind.ANSWERED, "released": EventKind.RELEASED,
}


class CommandLoop:
    def __init__(self, z: ZoneState) -> None:
        self.z = z
        self._commands = asyncio.Event()

    async def requeue(self) -> None:
        """Offers queued for agents when the previous master died: re-offered or closed (queue.py)."""
        await requeue_offers(self.z)

    async def run(self) -> None:
        pool = await self.z.ports.pool()
        conn = await pool.acquire()
        listener: Callable[..., None] = lambda *_a: self._commands.set()  # noqa: E731
        try:
            await conn.add_listener("agent_call_command", listener)
            while True:
                self._commands.clear()
                rows = await conn.fetch(
                    "SELECT * FROM agent_call_command WHERE zone = $1 AND applied_at IS NULL ORDER BY id LIMIT 500",
                    self.z.zone,
                )
                try:
                    for r in rows:
                        await self._command(r)
                except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    self.z.log.warning("cannot apply call events now; retrying", error=str(exc))
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
        async with self.z.lock:
            rec = self.z.agents.get(r["agent_id"])
            changes: list[tuple[AgentRecord, Any]] = []
            try:
                if rec is None:
                    raise InvalidAgentTransition(f"agent {r['agent_id']} is not known in zone {self.z.zone}")
                if kind in (EventKind.ANSWERED, EventKind.RELEASED) and rec.snap.call_id != call_id:
                    raise InvalidAgentTransition(f"{rec.snap.describe()}: call {call_id} is not the agent's call")
                new = replace(rec, snap=apply(rec.snap, AgentEvent(kind, call_id=call_id)))
                changes.append((new, self._offer_frame(kind, r, new.snap)))
                if kind is EventKind.RELEASED and rec.snap.role is CallRole.OWNER:
                    for other in passives(self.z.agents, call_id):
                        moved = replace(other, snap=apply(other.snap, AgentEvent(kind, call_id=call_id)))
                        changes.append((moved, CallEvent(call_id=call_id, event="released")))
                result = f"ok: {new.snap.call_state.value}"
            except InvalidAgentTransition as exc:
                result = f"refused: {exc}"[:2000]
            for changed, _ in changes:
                if not await self.z.persist(changed):
                    return  # no longer master: the command stays pending for the zone's next master
            for changed, _ in changes:
                self.z.agents[changed.snap.agent_id] = changed
            await self.z.fenced(SQL_COMMAND_DONE, r["id"], result)
            for changed, note in changes:
                session = self.z.sessions.get(changed.snap.agent_id)
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
