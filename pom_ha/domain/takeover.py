"""The plan of an Agent Manager takeover, agent by agent: pure logic, no I/O.

A new master of a zone loads the stored agents, waits for their desktops, reads the platform's call events of
the gap and asks each desktop for its state (``services/agent_manager/takeover.py``). Then, for every stored
logged-in agent, :func:`plan_agent` decides — from the stored record, the nailing resolution, the gap's events
and the desktop's report — the agent's record after the takeover, its Table 9 outcome and its
``agent_failover_log`` row. The service persists every plan in one transaction and then announces it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from pom_ha.domain.agents import (
    APP_SERVER_WAIT_TIMEOUT_KEY,
    AgentJobState,
    AgentSnapshot,
    CallEffect,
    CallRole,
    CallState,
    FailoverOutcome,
    after_failover,
    app_server_wait_timeout_s,
    check_desktop_state,
    ha_time_s,
)
from pom_ha.domain.attempts import CompletionCode


@dataclass
class AgentRecord:
    """One agent of the zone: its state machine snapshot plus what the ``agents`` table keeps beside it."""

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
    def from_row(r: Mapping[str, Any]) -> AgentRecord:
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


def app_server_wait_timeout_from_config_s(raw_ms: object | None) -> float:
    """AppServerWaitTimeOut in seconds from its ``pim_config`` value, which is kept in milliseconds (migration
    0001); default 30 s; a ValueError naming the key for a bad value."""
    if raw_ms is None:
        return app_server_wait_timeout_s(None)
    try:
        ms = float(str(raw_ms))
    except ValueError:
        raise ValueError(f"{APP_SERVER_WAIT_TIMEOUT_KEY}: must be a number of milliseconds, got {raw_ms!r}") from None
    if not math.isfinite(ms) or ms < 0:
        raise ValueError(f"{APP_SERVER_WAIT_TIMEOUT_KEY}: must be >= 0 milliseconds, got {raw_ms!r}")
    return ms / 1000


@dataclass(frozen=True)
class AgentPlan:
    """One agent after the takeover: its new record, its outcome, and its ``agent_failover_log`` row."""

    record: AgentRecord
    outcome: FailoverOutcome
    log_row: tuple[Any, ...]
    mismatch: str | None  # why the desktop's report did not match the stored state (a forced logout)

    @property
    def ended_call(self) -> str | None:
        """The call the takeover ended for the agent (its desktop is told ``released``)."""
        o = self.outcome
        return o.before.call_id if o.call_effect in (CallEffect.DISCONNECT_REPORTED, CallEffect.RELEASED) else None


def plan_agent(rec: AgentRecord, *, zone: str, nailed: bool, detach_job: bool, released: set[str],
               answered: set[str], desk: tuple[CallState, str | None] | None, outage_start: datetime,
               end: datetime) -> AgentPlan:
    """Table 9 for one stored logged-in agent (``after_failover``), overruled by a desktop whose report does not
    match (``check_desktop_state``: the call closed DESKTOP_ERROR, the agent logged out); the outage is added to
    the agent's Total HA time. ``desk``: the desktop's (call state, call id), None when it did not answer."""
    before = rec.snap
    call_kept = before.call_id is None or before.call_id not in released
    outcome = after_failover(before, nailed, call_kept=call_kept, dial_answered=before.call_id in answered,
                             detach_job=detach_job)
    mismatch = None
    if desk is not None:
        check = check_desktop_state(before, desk[0], desk[1])
        if not check.matches:
            outcome = replace(outcome, after=AgentSnapshot(before.agent_id, zone), force_logout=True,
                              completion_code=check.completion_code)
            mismatch = check.reason
    ha = ha_time_s(outage_start.timestamp(), end.timestamp(),
                   rec.login_time.timestamp() if rec.login_time else outage_start.timestamp())
    new = replace(rec, snap=outcome.after, ha_time_s=rec.ha_time_s + ha, failovers=rec.failovers + (1 if ha > 0 else 0))
    new.nailed = nailed and new.snap.logged_in
    if outcome.completion_code is not None:
        new.last_completion_code = outcome.completion_code.name
        new.last_closed_call_id = before.call_id
    if outcome.completion_code is CompletionCode.NUISANCE:
        new.nuisance_calls += 1
    if outcome.force_logout:
        new.desktop_errors += 1
        new.login_time = None
    row = (
        before.agent_id, before.call_state.value, new.snap.call_state.value,
        new.snap.job_state.value if new.snap.job_state else None,
        outcome.column.name if outcome.column else None, outcome.call_effect.name, nailed,
        outcome.job_detached, desk[0].value if desk else None,
        outcome.completion_code.name if outcome.completion_code else None, outcome.force_logout,
        before.call_id, ha,
    )
    return AgentPlan(new, outcome, row, mismatch)
