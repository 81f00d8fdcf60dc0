"""Retry strategy (next action per contact) and finish criteria (when a job is done, and why)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pom_ha.domain.attempts import Attempt, CompletionCode
from pom_ha.domain.stats import JobStats
from pom_ha.domain.strategy import Dial, Done, FinishCriteria, RetryStrategy, Wait

T0 = datetime(2026, 3, 8, 15, 0, tzinfo=UTC)
CC = CompletionCode
STRATEGY = RetryStrategy(
    max_attempts=3,
    default_retry_interval=timedelta(hours=1),
    retry_intervals={"BUSY": timedelta(minutes=5), "CALL_FAILOVER": timedelta(0)},
)


def _done(no: int, code: CompletionCode, ended: datetime) -> Attempt:
    attempt = Attempt("j", "c", no, epoch=1)
    if code.dialed:
        attempt = attempt.dialing(ended - timedelta(seconds=30))
    return attempt.completed(code, ended)


def test_first_attempt_dials_now() -> None:
    assert STRATEGY.next_action([], T0) == Dial(T0, 1)


@pytest.mark.parametrize(
    ("code", "interval"),
    [(CC.BUSY, timedelta(minutes=5)), (CC.NO_ANSWER, timedelta(hours=1)), (CC.CALL_FAILOVER, timedelta(0))],
)
def test_retry_interval_per_code(code: CompletionCode, interval: timedelta) -> None:
    history = [_done(1, code, T0)]
    if interval:
        assert STRATEGY.next_action(history, T0 + interval - timedelta(seconds=1)) == Wait(
            T0 + interval, f"retry after {code.name} at {(T0 + interval).isoformat()}"
        )
    assert STRATEGY.next_action(history, T0 + interval) == Dial(T0 + interval, 2)


def test_final_and_non_retryable_codes_end_the_contact() -> None:
    assert STRATEGY.next_action([_done(1, CC.ANSWER_HUMAN, T0)], T0 + timedelta(days=1)) == Done(CC.ANSWER_HUMAN)
    assert STRATEGY.next_action([_done(1, CC.DNC_BLOCKED, T0)], T0) == Done(CC.DNC_BLOCKED)
    survey = CC.custom("SURVEY_DECLINED", is_final=False, retryable=False)
    assert STRATEGY.next_action([_done(1, survey, T0)], T0) == Done(survey)


def test_max_attempts_counts_dialed_attempts_only() -> None:
    later = T0 + timedelta(days=1)
    three = [_done(1, CC.BUSY, T0), _done(2, CC.NO_ANSWER, T0), _done(3, CC.BUSY, T0)]
    assert STRATEGY.next_action(three, later) == Done(CC.MAX_ATTEMPTS_REACHED)
    two_and_a_rule = [_done(1, CC.BUSY, T0), _done(2, CC.OUTSIDE_CALLING_WINDOW, T0), _done(3, CC.BUSY, T0)]
    assert STRATEGY.next_action(two_and_a_rule, later) == Dial(later, 4)


def test_an_attempt_in_flight_waits_for_its_outcome() -> None:
    history = [_done(1, CC.BUSY, T0), Attempt("j", "c", 2, epoch=1).dialing(T0 + timedelta(minutes=6))]
    assert STRATEGY.next_action(list(reversed(history)), T0 + timedelta(hours=2)) == Wait(
        None, "attempt 2 is in flight"
    )


def test_strategy_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryStrategy(max_attempts=0)
    with pytest.raises(ValueError, match="BUSY must not be negative"):
        RetryStrategy(retry_intervals={"BUSY": timedelta(seconds=-1)})
    with pytest.raises(ValueError, match="timezone-aware"):
        STRATEGY.next_action([], datetime(2026, 1, 1))


def test_finish_when_all_contacts_done() -> None:
    criteria = FinishCriteria()
    assert criteria.is_met(JobStats(1000, 999), T0) == (False, "not met: 999 of 1000 contacts done")
    assert criteria.is_met(JobStats(1000, 1000), T0) == (True, "all contacts done (1000 of 1000 contacts done)")
    assert criteria.is_met(JobStats(0, 0), T0).met


def test_finish_at_end_time() -> None:
    end = datetime(2026, 3, 8, 17, 0, tzinfo=UTC)
    criteria = FinishCriteria(all_contacts_done=False, end_time=end)
    assert not criteria.is_met(JobStats(10, 10), end - timedelta(microseconds=1)).met
    assert criteria.is_met(JobStats(10, 0), end) == (True, "end time 2026-03-08T17:00:00+00:00 reached")


def test_finish_on_completion_code_goal() -> None:
    criteria = FinishCriteria(code_goals={"ANSWER_HUMAN": 500})
    assert not criteria.is_met(JobStats(10_000, 600, {"ANSWER_HUMAN": 499, "BUSY": 900}), T0).met
    verdict = criteria.is_met(JobStats(10_000, 601, {"ANSWER_HUMAN": 500}), T0)
    assert verdict == (True, "goal reached: 500 ANSWER_HUMAN (goal 500)")


def test_finish_criteria_need_at_least_one_criterion() -> None:
    with pytest.raises(ValueError, match="at least one finish criterion"):
        FinishCriteria(all_contacts_done=False)
    with pytest.raises(ValueError, match="at least 1"):
        FinishCriteria(code_goals={"ANSWER_HUMAN": 0})
