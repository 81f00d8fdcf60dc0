"""The zone reset: every logged-in agent of the zone forced out, persisted first (``zone_reset`` for "Save and
Apply", ``sdk_connection_lost`` when the agent SDK's link broke; :mod:`.zone_config` asks for it)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pom_ha.desktop.protocol import ForcedLogout
from pom_ha.domain.agents import AgentSnapshot, CallState, after_sdk_connection_lost
from pom_ha.domain.takeover import AgentRecord
from services.agent_manager.zone_state import ZoneState


async def reset_zone(z: ZoneState, reason: Any, detail: str, *, keep_closed: bool) -> int | None:
    """Force every logged-in agent of the zone out (``FORCED_LOGOUT reason``), persisted first (one
    statement); with ``keep_closed`` logins stay refused afterwards (the zone is about to be released). The
    number of agents logged out, or None when the fence was lost (no longer master).

    ``zone_reset`` ("Save and Apply"): a call in progress is recorded closed with ``ZONE_RESET``.
    ``sdk_connection_lost`` (workspaces: the agent SDK's link broke, ``after_sdk_connection_lost``): a call
    the agent was on is closed ``DESKTOP_ERROR`` (counted in ``desktop_errors``), an answered call still
    pending for the agent is marked ``NUISANCE``; the agent is logged out at once (the guide logs a busy
    agent out when its call ends, but with the SDK link gone the AM cannot follow the call to its end; the
    platform's later ``released`` of it is recorded as refused, not lost)."""
    async with z.lock:
        z.resetting = True
        changed: list[AgentRecord] = []
        for agent_id, rec in list(z.agents.items()):
            if not rec.snap.logged_in:
                continue
            new = replace(rec, snap=AgentSnapshot(agent_id, z.zone), nailed=False, login_time=None)
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
        if not await z.persist_many(changed):
            return None
        for new in changed:
            z.agents[new.snap.agent_id] = new
        for agent_id, session in list(z.sessions.items()):
            z.sessions.pop(agent_id, None)
            await session.send(ForcedLogout(reason=reason, detail=detail[:2000]))
            session.detach()
            session.close()
        if not keep_closed:
            z.resetting = False
        return len(changed)
