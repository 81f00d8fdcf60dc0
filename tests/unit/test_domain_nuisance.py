"""Nuisance rate = nuisance / live answers over a window; trend buckets; alarm raised and cleared once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pom_ha.domain.attempts import CompletionCode
from pom_ha.domain.nuisance import (
    AlarmAction,
    NuisanceAlarmPolicy,
    NuisanceRate,
    decide_alarm,
    nuisance_trend,
)

CC = CompletionCode
T0 = datetime(2026, 3, 8, 15, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def _outcomes(minute_codes: list[tuple[int, CompletionCode]]) -> list[tuple[datetime, CompletionCode]]:
    return [(T0 + timedelta(minutes=m), code) for m, code in minute_codes]


def test_rate_counts_only_live_answers_inside_the_window() -> None:
    inside = [(1, CC.ANSWER_HUMAN), (2, CC.NUISANCE), (3, CC.BUSY), (4, CC.ANSWER_MACHINE), (5, CC.ANSWER_HUMAN)]
    at_the_end_and_before = [(60, CC.NUISANCE), (-1, CC.NUISANCE)]
    outcomes = _outcomes(inside + at_the_end_and_before)
    rate = NuisanceRate.of(outcomes, T0, T0 + HOUR)
    assert (rate.nuisance, rate.live_answers) == (1, 3)
    assert rate.rate == pytest.approx(1 / 3)
    sale = CC.custom("SALE")
    assert NuisanceRate.of([(T0, sale)], T0, T0 + HOUR).live_answers == 1


def test_no_live_answer_means_no_rate() -> None:
    rate = NuisanceRate.of(_outcomes([(1, CC.BUSY)]), T0, T0 + HOUR)
    assert rate.rate is None
    assert decide_alarm(rate, NuisanceAlarmPolicy(), active=False).action is AlarmAction.NONE


def test_trend_buckets() -> None:
    outcomes = _outcomes([(5, CC.ANSWER_HUMAN), (10, CC.NUISANCE), (70, CC.ANSWER_HUMAN), (150, CC.NUISANCE)])
    trend = nuisance_trend(outcomes, T0, T0 + timedelta(minutes=150), HOUR)
    assert [(b.start, b.end, b.nuisance, b.live_answers) for b in trend] == [
        (T0, T0 + HOUR, 1, 2),
        (T0 + HOUR, T0 + 2 * HOUR, 0, 1),
        (T0 + 2 * HOUR, T0 + timedelta(minutes=150), 0, 0),
    ]
    with pytest.raises(ValueError, match="positive length"):
        nuisance_trend(outcomes, T0, T0 + HOUR, timedelta(0))


def _rate(nuisance: int, live: int) -> NuisanceRate:
    return NuisanceRate(T0, T0 + HOUR, nuisance, live)


def test_alarm_raised_over_the_default_three_percent_cap_and_cleared_once() -> None:
    policy = NuisanceAlarmPolicy()
    assert policy.cap == 0.03
    assert decide_alarm(_rate(3, 100), policy, active=False).action is AlarmAction.NONE  # exactly 3 %: allowed
    raised = decide_alarm(_rate(4, 100), policy, active=False)
    assert raised.action is AlarmAction.RAISE
    assert raised.reason == "nuisance rate 4.00% (4 nuisance of 100 live answers) over cap 3.00%"
    assert decide_alarm(_rate(5, 100), policy, active=True).action is AlarmAction.NONE  # already raised
    assert decide_alarm(_rate(3, 100), policy, active=True).action is AlarmAction.CLEAR


def test_alarm_needs_a_minimum_sample_and_honours_a_custom_cap_and_clear_level() -> None:
    policy = NuisanceAlarmPolicy(cap=0.05, min_live_answers=50, clear_below=0.02)
    assert decide_alarm(_rate(10, 49), policy, active=False).reason == ("only 49 live answers, 50 needed to judge")
    assert decide_alarm(_rate(3, 60), policy, active=False).action is AlarmAction.NONE  # 5 %
    assert decide_alarm(_rate(4, 60), policy, active=False).action is AlarmAction.RAISE
    assert decide_alarm(_rate(2, 60), policy, active=True).action is AlarmAction.NONE  # 3.3 % > 2 %
    assert decide_alarm(_rate(1, 60), policy, active=True).action is AlarmAction.CLEAR


def test_policy_and_counts_are_checked() -> None:
    with pytest.raises(ValueError, match="fraction"):
        NuisanceAlarmPolicy(cap=3)
    with pytest.raises(ValueError, match="clear_below"):
        NuisanceAlarmPolicy(cap=0.03, clear_below=0.05)
    with pytest.raises(ValueError, match=r"within 0\.\.live answers"):
        _rate(5, 4)
