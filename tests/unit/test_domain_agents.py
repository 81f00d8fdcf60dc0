"""Agent states: desktop/call transitions, the guide's Table 9 row by row, and the takeover side rules
(AppServerWaitTimeOut, Desktop Error check, Total HA time)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pom_ha.domain.agents import (
    ON_CALL_STATES,
    TABLE_9,
    AgentEvent,
    AgentJobState,
    AgentSnapshot,
    AgentTimeSummary,
    CallEffect,
    CallRole,
    CallState,
    Column,
    EventKind,
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

S, K, J = CallState, EventKind, AgentJobState
OWNER, PASSIVE = CallRole.OWNER, CallRole.PASSIVE
NUISANCE, DESKTOP_ERROR = CompletionCode.NUISANCE, CompletionCode.DESKTOP_ERROR


def _agent(state: CallState, role: CallRole = OWNER, job: AgentJobState | None = J.JOB_ATTACHED) -> AgentSnapshot:
    has_call = state in ON_CALL_STATES or state in (S.WRAPUP, S.PREVIEW, S.CALLBACK)
    return AgentSnapshot(
        "a1", "zone1", logged_in=True, ready=True, call_state=state,
        job_state=job, job_id="job1" if job else None,
        call_id="call1" if has_call else None, role=role if has_call else None,
    )


# Table 9 transcribed from the guide, independently of the module's table:
# (row, before, role, nailed, call_kept, dial_answered, after)
KEPT_NAILED, KEPT_UNNAILED, DROPPED_NAILED = (True, True), (False, True), (True, False)
ROWS = [
    # row "Idle": Idle | Idle | Idle
    ("Idle", S.IDLE, OWNER, *KEPT_NAILED, False, S.IDLE),
    ("Idle", S.IDLE, OWNER, *KEPT_UNNAILED, False, S.IDLE),
    ("Idle", S.IDLE, OWNER, *DROPPED_NAILED, False, S.IDLE),
    # row "Talking": Talking | Wrapup | Wrapup
    ("Talking", S.TALKING, OWNER, *KEPT_NAILED, False, S.TALKING),
    ("Talking", S.TALKING, OWNER, *KEPT_UNNAILED, False, S.WRAPUP),
    ("Talking", S.TALKING, OWNER, *DROPPED_NAILED, False, S.WRAPUP),
    # row "Wrapup": Wrapup | Wrapup | Wrapup
    ("Wrapup", S.WRAPUP, OWNER, *KEPT_NAILED, False, S.WRAPUP),
    ("Wrapup", S.WRAPUP, OWNER, *KEPT_UNNAILED, False, S.WRAPUP),
    ("Wrapup", S.WRAPUP, OWNER, *DROPPED_NAILED, False, S.WRAPUP),
    # row "Held": Held | Wrapup | Wrapup
    ("Held", S.HELD, OWNER, *KEPT_NAILED, False, S.HELD),
    ("Held", S.HELD, OWNER, *KEPT_UNNAILED, False, S.WRAPUP),
    ("Held", S.HELD, OWNER, *DROPPED_NAILED, False, S.WRAPUP),
    # row "Consult": Consult | Wrapup (Owner) / Idle (Passive) | Wrapup (Owner) / Idle (Passive)
    ("Consult/owner", S.CONSULT, OWNER, *KEPT_NAILED, False, S.CONSULT),
    ("Consult/passive", S.CONSULT, PASSIVE, *KEPT_NAILED, False, S.CONSULT),
    ("Consult/owner", S.CONSULT, OWNER, *KEPT_UNNAILED, False, S.WRAPUP),
    ("Consult/passive", S.CONSULT, PASSIVE, *KEPT_UNNAILED, False, S.IDLE),
    ("Consult/owner", S.CONSULT, OWNER, *DROPPED_NAILED, False, S.WRAPUP),
    ("Consult/passive", S.CONSULT, PASSIVE, *DROPPED_NAILED, False, S.IDLE),
    # row "ConferenceOwner": ConferenceOwner | Wrapup | Wrapup
    ("ConferenceOwner", S.CONFERENCE_OWNER, OWNER, *KEPT_NAILED, False, S.CONFERENCE_OWNER),
    ("ConferenceOwner", S.CONFERENCE_OWNER, OWNER, *KEPT_UNNAILED, False, S.WRAPUP),
    ("ConferenceOwner", S.CONFERENCE_OWNER, OWNER, *DROPPED_NAILED, False, S.WRAPUP),
    # row "ConferencePassive": ConferencePassive | Idle | Preview (as printed)
    ("ConferencePassive", S.CONFERENCE_PASSIVE, PASSIVE, *KEPT_NAILED, False, S.CONFERENCE_PASSIVE),
    ("ConferencePassive", S.CONFERENCE_PASSIVE, PASSIVE, *KEPT_UNNAILED, False, S.IDLE),
    ("ConferencePassive", S.CONFERENCE_PASSIVE, PASSIVE, *DROPPED_NAILED, False, S.PREVIEW),
    # row "Preview": Preview | Idle | Preview
    ("Preview", S.PREVIEW, OWNER, *KEPT_NAILED, False, S.PREVIEW),
    ("Preview", S.PREVIEW, OWNER, *KEPT_UNNAILED, False, S.IDLE),
    ("Preview", S.PREVIEW, OWNER, *DROPPED_NAILED, False, S.PREVIEW),
    # row "Dialing": Talking / Wrapup | Wrapup | Wrapup
    ("Dialing/answered", S.DIALING, OWNER, *KEPT_NAILED, True, S.TALKING),
    ("Dialing/unanswered", S.DIALING, OWNER, *KEPT_NAILED, False, S.WRAPUP),
    ("Dialing", S.DIALING, OWNER, *KEPT_UNNAILED, False, S.WRAPUP),
    ("Dialing/answered", S.DIALING, OWNER, *KEPT_UNNAILED, True, S.WRAPUP),
    ("Dialing", S.DIALING, OWNER, *DROPPED_NAILED, False, S.WRAPUP),
    # row "Callback": Callback | Callback | Callback
    ("Callback", S.CALLBACK, OWNER, *KEPT_NAILED, False, S.CALLBACK),
    ("Callback", S.CALLBACK, OWNER, *KEPT_UNNAILED, False, S.CALLBACK),
    ("Callback", S.CALLBACK, OWNER, *DROPPED_NAILED, False, S.CALLBACK),
    # row "Pending call": Idle | Idle | Idle
    ("Pending call", S.PENDING_CALL, OWNER, *KEPT_NAILED, False, S.IDLE),
    ("Pending call", S.PENDING_CALL, OWNER, *KEPT_UNNAILED, False, S.IDLE),
    ("Pending call", S.PENDING_CALL, OWNER, *DROPPED_NAILED, False, S.IDLE),
]


@pytest.mark.parametrize(("row", "before", "role", "nailed", "call_kept", "dial_answered", "expected"), ROWS,
                         ids=[f"{r[0]}-{'nailed' if r[3] else 'unnailed'}-{'kept' if r[4] else 'dropped'}"
                              f"{'-answered' if r[5] else ''}" for r in ROWS])
@pytest.mark.parametrize("job", list(AgentJobState))
def test_table_9_row(row: str, before: CallState, role: CallRole, nailed: bool, call_kept: bool,
                     dial_answered: bool, expected: CallState, job: AgentJobState) -> None:
    agent = _agent(before, role, job)
    outcome = after_failover(agent, nailed, call_kept=call_kept, dial_answered=dial_answered)
    assert outcome.after.call_state is expected, row
    assert outcome.after.job_state is job  # no detach asked: the job state is kept
    assert outcome.after.logged_in and not outcome.force_logout


def test_every_call_state_has_a_row_and_every_row_has_three_columns() -> None:
    assert set(TABLE_9) == set(CallState)
    assert all(set(cells) == set(Column) for cells in TABLE_9.values())
    assert {r[1] for r in ROWS} == set(CallState)


@pytest.mark.parametrize("state", list(CallState))
def test_unnailed_agent_whose_call_dropped_reads_the_unnailed_column(state: CallState) -> None:
    role = PASSIVE if state is S.CONFERENCE_PASSIVE else OWNER
    dropped = after_failover(_agent(state, role), False, call_kept=False)
    kept = after_failover(_agent(state, role), False, call_kept=True)
    assert dropped.after == kept.after and dropped.column is Column.KEPT_UNNAILED


@pytest.mark.parametrize(("before", "nailed", "call_kept", "dial_answered", "effect", "code"), [
    (S.TALKING, True, True, False, CallEffect.CONTINUES, None),
    (S.TALKING, False, True, False, CallEffect.RELEASED, None),
    (S.TALKING, True, False, False, CallEffect.DISCONNECT_REPORTED, None),
    (S.HELD, True, False, False, CallEffect.DISCONNECT_REPORTED, None),
    (S.PENDING_CALL, True, True, False, CallEffect.NOT_CONNECTED, NUISANCE),
    (S.PENDING_CALL, False, True, False, CallEffect.NOT_CONNECTED, NUISANCE),
    (S.DIALING, True, True, True, CallEffect.CONTINUES, None),
    (S.DIALING, True, True, False, CallEffect.DISCONNECT_REPORTED, None),
    (S.DIALING, False, True, True, CallEffect.RELEASED, NUISANCE),
    (S.IDLE, True, True, False, CallEffect.NONE, None),
    (S.WRAPUP, False, True, False, CallEffect.NONE, None),
    (S.PREVIEW, False, True, False, CallEffect.NONE, None),
])
def test_call_effects_and_nuisance_marks(before: CallState, nailed: bool, call_kept: bool, dial_answered: bool,
                                         effect: CallEffect, code: CompletionCode | None) -> None:
    outcome = after_failover(_agent(before), nailed, call_kept=call_kept, dial_answered=dial_answered)
    assert outcome.call_effect is effect
    assert outcome.completion_code == code


def test_agent_without_a_job_keeps_its_state_in_every_column() -> None:
    agent = AgentSnapshot("a1", "zone1", logged_in=True, ready=True)
    for nailed in (True, False):
        for kept in (True, False):
            outcome = after_failover(agent, nailed, call_kept=kept, detach_job=True)
            assert outcome.after == agent and outcome.column is None and outcome.keeps_state


def test_logged_out_agent_is_untouched() -> None:
    agent = AgentSnapshot("a1", "zone1")
    assert after_failover(agent, False).after == agent


def test_detached_agent_loses_its_job_and_can_still_wrap_up() -> None:
    outcome = after_failover(_agent(S.TALKING), False, detach_job=True)
    after = outcome.after
    assert outcome.job_detached and after.job_state is None and after.call_state is S.WRAPUP
    idle = apply(after, AgentEvent(K.WRAP_UP, completion_code="SALE"))
    assert idle.call_state is S.IDLE and idle.call_id is None
    with pytest.raises(InvalidAgentTransition, match="not attached to a job"):
        apply(idle, AgentEvent(K.OFFERED, call_id="c9"))


def test_desktop_mismatch_closes_the_call_with_desktop_error_and_logs_out() -> None:
    outcome = after_failover(_agent(S.TALKING), True, desktop_state=S.IDLE)
    assert outcome.completion_code is DESKTOP_ERROR and outcome.force_logout
    assert not outcome.after.logged_in and outcome.after.job_state is None
    agreeing = after_failover(_agent(S.TALKING), True, desktop_state=S.TALKING)
    assert agreeing.completion_code is None and not agreeing.force_logout


def test_desktop_mismatch_without_a_call_logs_out_without_a_code() -> None:
    check = check_desktop_state(_agent(S.IDLE), S.PREVIEW)
    assert not check.matches and check.force_logout and check.completion_code is None
    assert "manager says Idle, desktop says Preview" in check.reason
    # Same state on another call is a mismatch too.
    other = check_desktop_state(_agent(S.TALKING), S.TALKING, "call2")
    assert not other.matches and other.completion_code is DESKTOP_ERROR and "on call call2" in other.reason
    assert check_desktop_state(_agent(S.TALKING), S.TALKING, "call1").matches
    # A desktop that still shows a call the manager believes gone: Desktop Error too.
    assert check_desktop_state(_agent(S.IDLE), S.TALKING).completion_code is DESKTOP_ERROR


def test_sdk_connection_loss_logs_out_and_closes_calls_with_desktop_error() -> None:
    busy = after_sdk_connection_lost(_agent(S.TALKING))
    assert busy.completion_code is DESKTOP_ERROR and busy.logout_after_call and not busy.logout_now
    idle = after_sdk_connection_lost(_agent(S.IDLE))
    assert idle.completion_code is None and idle.logout_now
    wrapping = after_sdk_connection_lost(_agent(S.WRAPUP))
    assert wrapping.completion_code is DESKTOP_ERROR and wrapping.logout_now


# ---- normal transitions -------------------------------------------------------------------------------
def _ready_agent() -> AgentSnapshot:
    agent = apply(AgentSnapshot("a1", "zone1"), AgentEvent(K.LOGIN))
    agent = apply(agent, AgentEvent(K.JOB_ATTACH, job_id="job1"))
    return apply(agent, AgentEvent(K.READY))


def test_predictive_call_flow() -> None:
    agent = _ready_agent()
    agent = apply(agent, AgentEvent(K.OFFERED, call_id="c1"))
    assert agent.call_state is S.PENDING_CALL and agent.call_id == "c1"
    for kind, state in [(K.ANSWERED, S.TALKING), (K.HELD, S.HELD), (K.RETRIEVED, S.TALKING),
                        (K.CONSULT, S.CONSULT), (K.CONFERENCE, S.CONFERENCE_OWNER), (K.RELEASED, S.WRAPUP)]:
        agent = apply(agent, AgentEvent(kind))
        assert agent.call_state is state
    assert agent.call_id == "c1"
    agent = apply(agent, AgentEvent(K.WRAP_UP, completion_code="SALE"))
    assert agent.call_state is S.IDLE and agent.call_id is None and agent.role is None


def test_preview_and_callback_flows() -> None:
    agent = apply(_ready_agent(), AgentEvent(K.PREVIEW_OFFERED, call_id="p1"))
    agent = apply(agent, AgentEvent(K.PREVIEW_ACCEPT))
    assert agent.call_state is S.DIALING
    agent = apply(agent, AgentEvent(K.RELEASED))  # no answer
    assert agent.call_state is S.WRAPUP
    agent = apply(agent, AgentEvent(K.WRAP_UP, completion_code="NO_ANSWER"))
    agent = apply(agent, AgentEvent(K.CALLBACK_OFFERED, call_id="cb1"))
    agent = apply(agent, AgentEvent(K.CALLBACK_ACCEPT))
    assert apply(agent, AgentEvent(K.ANSWERED)).call_state is S.TALKING


def test_consulted_agent_is_passive_and_leaves_to_idle() -> None:
    agent = apply(_ready_agent(), AgentEvent(K.CONSULT_JOINED, call_id="c1"))
    assert agent.call_state is S.CONSULT and agent.role is PASSIVE
    conf = apply(agent, AgentEvent(K.CONFERENCE))
    assert conf.call_state is S.CONFERENCE_PASSIVE
    assert apply(conf, AgentEvent(K.RELEASED)).call_state is S.IDLE
    assert apply(agent, AgentEvent(K.CONSULT_ENDED)).call_state is S.IDLE
    with pytest.raises(InvalidAgentTransition, match="does not own the customer call"):
        apply(agent, AgentEvent(K.HELD))


def test_job_states() -> None:
    agent = _ready_agent()
    agent = apply(agent, AgentEvent(K.INBOUND_REQUESTED))
    assert agent.job_state is J.PENDING_INBOUND
    with pytest.raises(InvalidAgentTransition, match="takes no new calls"):
        apply(agent, AgentEvent(K.OFFERED, call_id="c1"))
    agent = apply(agent, AgentEvent(K.INBOUND_STARTED))
    assert agent.job_state is J.JOB_MANUAL_INBOUND
    assert apply(agent, AgentEvent(K.OFFERED, call_id="c1")).call_state is S.PENDING_CALL
    agent = apply(agent, AgentEvent(K.INBOUND_ENDED))
    agent = apply(agent, AgentEvent(K.JOB_MOVE_REQUESTED, job_id="job2"))
    assert agent.job_state is J.PENDING_MANUAL_JOB_MOVEMENT
    agent = apply(agent, AgentEvent(K.JOB_ATTACH, job_id="job2"))
    assert (agent.job_state, agent.job_id) == (J.JOB_ATTACHED, "job2")
    agent = apply(agent, AgentEvent(K.JOB_END))
    assert agent.job_state is J.JOB_END
    agent = apply(agent, AgentEvent(K.JOB_DETACH))
    assert agent.job_state is None
    assert apply(agent, AgentEvent(K.LOGOUT)) == AgentSnapshot("a1", "zone1")


@pytest.mark.parametrize(("agent", "event", "message"), [
    (AgentSnapshot("a1", "z"), AgentEvent(K.READY), "not logged in"),
    (AgentSnapshot("a1", "z", logged_in=True), AgentEvent(K.LOGIN), "already logged in"),
    (AgentSnapshot("a1", "z", logged_in=True, ready=True), AgentEvent(K.OFFERED, call_id="c"),
     "not attached to a job"),
    (_agent(S.IDLE), AgentEvent(K.OFFERED), "needs a call_id"),
    (_agent(S.TALKING), AgentEvent(K.LOGOUT), "finish the Talking call first"),
    (_agent(S.TALKING), AgentEvent(K.OFFERED, call_id="c2"), "not allowed in call state Talking"),
    (_agent(S.WRAPUP), AgentEvent(K.WRAP_UP), "needs a completion code"),
    (_agent(S.IDLE), AgentEvent(K.ANSWERED), "not allowed in call state Idle"),
    (_agent(S.TALKING), AgentEvent(K.JOB_DETACH), "finish the Talking call first"),
    (_agent(S.IDLE), AgentEvent(K.JOB_ATTACH, job_id="j2"), "detach from the current job first"),
    (_agent(S.IDLE), AgentEvent(K.INBOUND_STARTED), "not allowed in job state Job Attached"),
])
def test_invalid_transitions_name_agent_state_and_event(agent: AgentSnapshot, event: AgentEvent,
                                                        message: str) -> None:
    with pytest.raises(InvalidAgentTransition, match=message) as info:
        apply(agent, event)
    assert "agent a1" in str(info.value) and event.kind.value in str(info.value)


def test_not_ready_agent_gets_no_call() -> None:
    agent = apply(_ready_agent(), AgentEvent(K.NOT_READY))
    with pytest.raises(InvalidAgentTransition, match="not ready"):
        apply(agent, AgentEvent(K.OFFERED, call_id="c1"))


# ---- properties --------------------------------------------------------------------------------------
_EVENTS = st.sampled_from([
    AgentEvent(K.LOGIN), AgentEvent(K.LOGOUT), AgentEvent(K.READY), AgentEvent(K.NOT_READY),
    AgentEvent(K.JOB_ATTACH, job_id="job1"), AgentEvent(K.JOB_ATTACH, job_id="job2"), AgentEvent(K.JOB_END),
    AgentEvent(K.JOB_DETACH), AgentEvent(K.INBOUND_REQUESTED), AgentEvent(K.INBOUND_STARTED),
    AgentEvent(K.INBOUND_ENDED), AgentEvent(K.JOB_MOVE_REQUESTED, job_id="job2"),
    AgentEvent(K.PREVIEW_OFFERED, call_id="p"), AgentEvent(K.PREVIEW_ACCEPT), AgentEvent(K.PREVIEW_CANCEL),
    AgentEvent(K.CALLBACK_OFFERED, call_id="cb"), AgentEvent(K.CALLBACK_ACCEPT), AgentEvent(K.CALLBACK_CANCEL),
    AgentEvent(K.DIAL_STARTED, call_id="d"), AgentEvent(K.OFFERED, call_id="o"), AgentEvent(K.ANSWERED),
    AgentEvent(K.HELD), AgentEvent(K.RETRIEVED), AgentEvent(K.CONSULT), AgentEvent(K.CONSULT_JOINED, call_id="x"),
    AgentEvent(K.CONSULT_ENDED), AgentEvent(K.CONFERENCE), AgentEvent(K.RELEASED),
    AgentEvent(K.WRAP_UP, completion_code="SALE"),
])


def _run(events: list[AgentEvent]) -> list[AgentSnapshot]:
    agent = AgentSnapshot("a1", "zone1")
    seen = [agent]
    for event in events:
        try:
            agent = apply(agent, event)
        except InvalidAgentTransition:
            continue
        seen.append(agent)
    return seen


@settings(max_examples=300, deadline=None)
@given(st.lists(_EVENTS, max_size=40), st.booleans(), st.booleans(), st.booleans(), st.booleans())
def test_every_reachable_state_has_a_failover_outcome(events: list[AgentEvent], nailed: bool, call_kept: bool,
                                                      dial_answered: bool, detach: bool) -> None:
    for agent in _run(events):
        outcome = after_failover(agent, nailed, call_kept=call_kept, dial_answered=dial_answered, detach_job=detach)
        # The snapshot's own checks ran when it was built; the agent stays logged in without a desktop check.
        assert outcome.after.logged_in == agent.logged_in and not outcome.force_logout
        if agent.job_state is None:
            assert outcome.after == agent
        else:
            assert outcome.column is not None
            if outcome.after.call_state in ON_CALL_STATES:
                assert outcome.after.call_id == agent.call_id
            # The outcome can be reproduced by the desktop check that agrees with it.
            again = after_failover(agent, nailed, call_kept=call_kept, dial_answered=dial_answered,
                                   detach_job=detach, desktop_state=outcome.after.call_state)
            assert again == outcome


@settings(max_examples=200, deadline=None)
@given(st.lists(_EVENTS, max_size=40), st.booleans(), st.booleans(), st.booleans())
def test_agents_without_a_job_keep_their_state(events: list[AgentEvent], nailed: bool, call_kept: bool,
                                               detach: bool) -> None:
    for agent in _run(events):
        if agent.job_state is None:
            assert after_failover(agent, nailed, call_kept=call_kept, detach_job=detach).after == agent


@settings(max_examples=100, deadline=None)
@given(st.lists(_EVENTS, max_size=40))
def test_reachable_states_respect_the_snapshot_rules(events: list[AgentEvent]) -> None:
    for agent in _run(events):
        if agent.call_state in ON_CALL_STATES:
            assert agent.call_id is not None and agent.role is not None
        if agent.role is PASSIVE:
            assert agent.call_state in (S.CONSULT, S.CONFERENCE_PASSIVE)


# ---- AppServerWaitTimeOut, Total HA time -----------------------------------------------------------------
def test_app_server_wait_timeout_setting() -> None:
    assert app_server_wait_timeout_s(None) == 30.0
    assert app_server_wait_timeout_s("12.5") == 12.5
    for bad in ("soon", "-1", "nan", "inf"):
        with pytest.raises(ValueError, match="AppServerWaitTimeOut"):
            app_server_wait_timeout_s(bad)


def test_nailing_sessions_that_miss_the_timeout_are_unnailed_and_detached() -> None:
    result = resolve_nailing(
        {"on_time": True, "late": True, "never": True, "unnailed": False, "edge": True},
        {"on_time": 105.0, "late": 131.0, "edge": 130.0},
        takeover_at_s=100.0, timeout_s=30.0,
    )
    assert (result["on_time"].nailed, result["on_time"].detach_job) == (True, False)
    assert (result["edge"].nailed, result["edge"].detach_job) == (True, False)
    assert (result["late"].nailed, result["late"].detach_job) == (False, True)
    assert (result["never"].nailed, result["never"].detach_job) == (False, True)
    assert "never reported" in result["never"].reason
    assert (result["unnailed"].nailed, result["unnailed"].detach_job) == (False, False)


def test_total_ha_time_is_the_outage_within_the_login_session() -> None:
    assert ha_time_s(100.0, 101.5, logged_in_s=50.0) == 1.5
    assert ha_time_s(100.0, 101.5, logged_in_s=100.5) == 1.0
    assert ha_time_s(100.0, 101.5, logged_in_s=50.0, logged_out_s=100.25) == 0.25
    assert ha_time_s(100.0, 101.5, logged_in_s=102.0) == 0.0
    with pytest.raises(ValueError, match="before it starts"):
        ha_time_s(2.0, 1.0, 0.0)
    summary = AgentTimeSummary("a1", talk_s=60.0).with_ha_time(1.5).with_ha_time(0.5).with_ha_time(0.0)
    assert (summary.total_ha_s, summary.failovers, summary.talk_s) == (2.0, 2, 60.0)
    with pytest.raises(ValueError, match="agent a1"):
        summary.with_ha_time(-1.0)
