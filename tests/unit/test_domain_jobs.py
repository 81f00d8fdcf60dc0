"""Job states: every (state, event) pair is either the expected transition or refused with a clear error."""

from __future__ import annotations

import itertools

import pytest

from pom_ha.domain.jobs import InvalidTransition, JobEvent, JobState, JobStatus, transition

Q, F, R, P, S, C, X = (
    JobState.QUEUED,
    JobState.FILTER_IN_PROGRESS,
    JobState.RUNNING,
    JobState.PAUSED,
    JobState.STOPPING,
    JobState.COMPLETED,
    JobState.STOPPED,
)
E = JobEvent

# Written out from the lifecycle, independently of the module's table.
EXPECTED: dict[tuple[JobState, JobEvent], JobState] = {
    (Q, E.START): F,
    (Q, E.STOP): X,
    (Q, E.FINISH_CRITERIA_MET): C,
    (Q, E.TAKEOVER): Q,
    (Q, E.CACHE_REBUILT): Q,
    (F, E.FILTER_DONE): R,
    (F, E.STOP): S,
    (F, E.FINISH_CRITERIA_MET): S,
    (F, E.TAKEOVER): F,
    (F, E.CACHE_REBUILT): F,
    (R, E.PAUSE): P,
    (R, E.STOP): S,
    (R, E.FINISH_CRITERIA_MET): S,
    (R, E.TAKEOVER): F,
    (R, E.CACHE_REBUILT): F,
    (P, E.RESUME): R,
    (P, E.STOP): S,
    (P, E.FINISH_CRITERIA_MET): S,
    (P, E.TAKEOVER): P,
    (P, E.CACHE_REBUILT): P,
    (S, E.STOP): S,
    (S, E.FINISH_CRITERIA_MET): S,
    (S, E.TAKEOVER): S,
    (S, E.CACHE_REBUILT): S,
}


def _status(state: JobState) -> JobStatus:
    return JobStatus(state, ending=JobState.STOPPED if state is S else None)


@pytest.mark.parametrize(("state", "event"), list(itertools.product(JobState, JobEvent)))
def test_every_pair_follows_the_table(state: JobState, event: JobEvent) -> None:
    if (state, event) in EXPECTED:
        assert transition(_status(state), event).state is EXPECTED[(state, event)]
    elif (state, event) == (S, E.ALL_ATTEMPTS_SETTLED):
        assert transition(_status(state), event).state is X
    else:
        with pytest.raises(InvalidTransition) as info:
            transition(_status(state), event)
        assert f"state {state.display_name!r} cannot take {event.value!r}" in str(info.value)


def test_refusal_lists_the_allowed_events() -> None:
    with pytest.raises(InvalidTransition, match=r"cannot take 'pause'; allowed: start, stop, finish_criteria_met"):
        transition(JobStatus(Q), E.PAUSE)
    with pytest.raises(InvalidTransition, match="allowed: none, the state is final"):
        transition(JobStatus(C), E.TAKEOVER)


def test_terminal_states_and_display_names() -> None:
    assert {s for s in JobState if s.is_terminal} == {C, X}
    assert [s.display_name for s in JobState] == [
        "Queued",
        "Filter in Progress",
        "Running",
        "Paused",
        "Stopping",
        "Completed",
        "Stopped",
    ]


def _run(*events: JobEvent, start: JobStatus | None = None) -> JobStatus:
    status = start or JobStatus()
    for event in events:
        status = transition(status, event)
    return status


def test_finish_criteria_lead_to_completed_and_operator_stop_to_stopped() -> None:
    assert _run(E.START, E.FILTER_DONE, E.FINISH_CRITERIA_MET, E.ALL_ATTEMPTS_SETTLED) == JobStatus(C)
    assert _run(E.START, E.FILTER_DONE, E.PAUSE, E.STOP, E.ALL_ATTEMPTS_SETTLED) == JobStatus(X)


def test_a_stop_racing_the_finish_check_keeps_the_first_ending() -> None:
    assert _run(E.START, E.FILTER_DONE, E.FINISH_CRITERIA_MET, E.STOP, E.ALL_ATTEMPTS_SETTLED) == JobStatus(C)
    assert _run(E.START, E.FILTER_DONE, E.STOP, E.FINISH_CRITERIA_MET, E.ALL_ATTEMPTS_SETTLED) == JobStatus(X)


def test_takeover_of_a_running_job_refilters_then_runs() -> None:
    running = _run(E.START, E.FILTER_DONE)
    taken = transition(running, E.TAKEOVER)
    assert taken == JobStatus(F)
    assert transition(taken, E.FILTER_DONE) == JobStatus(R)


def test_a_paused_job_taken_over_stays_paused_and_refilters_on_resume() -> None:
    paused = _run(E.START, E.FILTER_DONE, E.PAUSE)
    assert transition(paused, E.RESUME) == JobStatus(R)
    for event in (E.TAKEOVER, E.CACHE_REBUILT):
        moved = transition(paused, event)
        assert moved == JobStatus(P, refilter=True)
        assert transition(moved, E.RESUME) == JobStatus(F)


def test_job_status_refuses_inconsistent_memory() -> None:
    with pytest.raises(ValueError, match="ending"):
        JobStatus(S)
    with pytest.raises(ValueError, match="ending"):
        JobStatus(R, ending=C)
    with pytest.raises(ValueError, match="Completed or Stopped"):
        JobStatus(S, ending=R)
    with pytest.raises(ValueError, match="refilter"):
        JobStatus(R, refilter=True)
