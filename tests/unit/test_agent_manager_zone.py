"""The Agent Manager's per-zone request logic without sockets or a database (services/agent_manager/zone.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import pytest
import structlog

from pom_ha.desktop.protocol import CallEvent, JobAttach, Logout, Ready, WrapUp
from pom_ha.domain.agents import AgentJobState, AgentSnapshot, CallRole, CallState, InvalidAgentTransition
from pom_ha.ha.ports import DaemonPorts, TermPorts
from pom_ha.ha.settings import HATimings
from pom_ha.ha.term import MasterTerm
from services.agent_manager.zone import AgentRecord, ZoneRuntime, state_frame


def runtime() -> ZoneRuntime:
    ports = DaemonPorts("pom1", "i1", HATimings(), structlog.get_logger("test"), cast(Any, None), cast(Any, None))
    return ZoneRuntime(TermPorts(MasterTerm("agent_manager", "Default", 3), ports))


def attached(agent_id: str, **kw: Any) -> AgentRecord:
    snap = AgentSnapshot(agent_id, "Default", logged_in=True, ready=True, job_state=AgentJobState.JOB_ATTACHED,
                         job_id="j1", **kw)
    return AgentRecord(snap, nailed=True, login_time=datetime.now(UTC))


def test_consult_conference_and_release_carry_the_passive_agent() -> None:
    z = runtime()
    z.agents["a"] = attached("a", call_state=CallState.TALKING, call_id="c1", role=CallRole.OWNER)
    z.agents["b"] = attached("b")
    out = z.desktops.changes(z.agents["a"], CallEvent(req=1, call_id="c1", event="consult", consult_agent_id="b"))
    states = [(r.snap.agent_id, r.snap.call_state) for r, _ in out]
    assert states == [("a", CallState.CONSULT), ("b", CallState.CONSULT)]
    assert out[1][0].snap.role is CallRole.PASSIVE and isinstance(out[1][1], CallEvent)
    assert out[1][1].event == "consult_joined"
    for rec, _ in out:
        z.agents[rec.snap.agent_id] = rec
    out = z.desktops.changes(z.agents["a"], CallEvent(req=2, call_id="c1", event="conference"))
    assert [r.snap.call_state for r, _ in out] == [CallState.CONFERENCE_OWNER, CallState.CONFERENCE_PASSIVE]
    for rec, _ in out:
        z.agents[rec.snap.agent_id] = rec
    out = z.desktops.changes(z.agents["a"], CallEvent(req=3, call_id="c1", event="released"))
    assert [r.snap.call_state for r, _ in out] == [CallState.WRAPUP, CallState.IDLE]
    z.agents["a"] = out[0][0]
    (wrapped, _), = z.desktops.changes(z.agents["a"], WrapUp(req=4, call_id="c1", completion_code="SALE"))
    assert wrapped.snap.call_state is CallState.IDLE
    assert (wrapped.last_completion_code, wrapped.last_closed_call_id) == ("SALE", "c1")


def test_refusals_name_the_agent_and_the_reason() -> None:
    z = runtime()
    z.agents["a"] = attached("a", call_state=CallState.TALKING, call_id="c1", role=CallRole.OWNER)
    with pytest.raises(InvalidAgentTransition, match="call c2 is not the agent's call c1"):
        z.desktops.changes(z.agents["a"], CallEvent(req=1, call_id="c2", event="held"))
    with pytest.raises(InvalidAgentTransition, match="'nobody' is not in zone Default"):
        z.desktops.changes(z.agents["a"], CallEvent(req=1, call_id="c1", event="consult", consult_agent_id="nobody"))
    with pytest.raises(InvalidAgentTransition, match="finish the Talking call first"):
        z.desktops.changes(z.agents["a"], Logout(req=2))
    with pytest.raises(InvalidAgentTransition, match="detach from the current job first"):
        z.desktops.changes(z.agents["a"], JobAttach(req=3, job_id="j2"))


def test_logout_clears_nailing_and_login_time() -> None:
    z = runtime()
    z.agents["a"] = attached("a")
    (rec, _), = z.desktops.changes(z.agents["a"], Logout(req=1))
    assert not rec.snap.logged_in and rec.login_time is None and not rec.nailed
    (rec, _), = z.desktops.changes(attached("b"), Ready(req=2))
    assert state_frame(rec.snap).ready is True


def test_record_from_row() -> None:
    row = {
        "agent_id": "a", "zone": "Default", "logged_in": True, "ready": False, "call_state": "ConferencePassive",
        "job_state": "Job Attached", "job_id": "j1", "call_id": "c9", "call_role": "passive", "nailed": False,
        "login_time": None, "ha_time_s": 1.5, "failovers": 1, "nuisance_calls": 0, "desktop_errors": 2,
        "last_completion_code": "DESKTOP_ERROR", "last_closed_call_id": "c8",
    }
    rec = AgentRecord.from_row(row)
    assert rec.snap.call_state is CallState.CONFERENCE_PASSIVE and rec.snap.role is CallRole.PASSIVE
    assert (rec.nailed, rec.ha_time_s, rec.desktop_errors) == (False, 1.5, 2)
