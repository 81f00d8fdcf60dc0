"""The Agent Manager takeover's plan per agent (pom_ha.domain.takeover): pure logic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pom_ha.domain.agents import AgentJobState, AgentSnapshot, CallRole, CallState
from pom_ha.domain.takeover import AgentPlan, AgentRecord, app_server_wait_timeout_from_config_s, plan_agent

END = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
START = END - timedelta(seconds=4)


def talking(agent_id: str = "a1", call_id: str = "c1") -> AgentRecord:
    snap = AgentSnapshot(agent_id, "Z", logged_in=True, ready=True, call_state=CallState.TALKING,
                         job_state=AgentJobState.JOB_ATTACHED, job_id="7", call_id=call_id, role=CallRole.OWNER)
    return AgentRecord(snap, nailed=True, login_time=END - timedelta(hours=1), ha_time_s=1.5, failovers=2)


def plan(rec: AgentRecord, **kw: object) -> AgentPlan:
    args: dict[str, object] = dict(zone="Z", nailed=True, detach_job=False, released=set(), answered=set(),
                                   desk=None, outage_start=START, end=END)
    args.update(kw)
    return plan_agent(rec, **args)  # type: ignore[arg-type]


def test_a_nailed_agent_keeps_its_call_and_gains_the_outage() -> None:
    p = plan(talking(), desk=(CallState.TALKING, "c1"))
    assert p.record.snap.call_state is CallState.TALKING and p.record.nailed
    assert p.record.ha_time_s == pytest.approx(5.5) and p.record.failovers == 3
    assert p.mismatch is None and p.ended_call is None
    row = p.log_row
    assert row[0] == "a1" and row[1] == row[2] == "Talking" and row[8] == "Talking" and row[-1] == pytest.approx(4.0)


def test_a_call_released_in_the_gap_is_ended_and_told() -> None:
    p = plan(talking(), released={"c1"})
    assert p.record.snap.call_state is CallState.WRAPUP
    assert p.ended_call == "c1"


def test_a_desktop_that_disagrees_forces_a_logout_with_desktop_error() -> None:
    p = plan(talking(), desk=(CallState.IDLE, None))
    rec = p.record
    assert p.mismatch and p.outcome.force_logout
    assert not rec.snap.logged_in and rec.login_time is None and rec.desktop_errors == 1
    assert rec.last_completion_code == "DESKTOP_ERROR" and rec.last_closed_call_id == "c1"


def test_the_input_record_is_left_as_it_was() -> None:
    rec = talking()
    plan(talking(), desk=(CallState.IDLE, None))
    assert rec.snap.logged_in and rec.desktop_errors == 0 and rec.ha_time_s == 1.5


def test_app_server_wait_timeout_is_read_in_milliseconds() -> None:
    assert app_server_wait_timeout_from_config_s(None) == 30.0
    assert app_server_wait_timeout_from_config_s("2500") == 2.5
    assert app_server_wait_timeout_from_config_s(0) == 0.0
    for bad in ("soon", "-1", "nan"):
        with pytest.raises(ValueError, match="AppServerWaitTimeOut"):
            app_server_wait_timeout_from_config_s(bad)
