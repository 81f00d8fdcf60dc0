"""Time-based pacing: the token bucket never grants more than its rate allows over any window."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pom_ha.domain.pacing import Pacer, PacingKind, TimeBasedPacer
from pom_ha.domain.stats import JobStats

STATS = JobStats()


@settings(max_examples=300, deadline=None)
@given(
    rate=st.one_of(st.integers(1, 500).map(float), st.floats(0.05, 500.0)),
    per_minute=st.booleans(),
    burst=st.one_of(st.none(), st.integers(1, 20)),
    steps=st.lists(
        st.tuples(st.floats(0.0, 2.0), st.integers(0, 30)),  # (time since previous call, dials left unused)
        min_size=1,
        max_size=60,
    ),
)
def test_grants_never_exceed_burst_plus_rate_over_any_window(
    rate: float, per_minute: bool, burst: int | None, steps: list[tuple[float, int]]
) -> None:
    pacer: Pacer
    if per_minute:
        pacer = bucket = TimeBasedPacer(calls_per_minute=rate * 60, burst=burst)
    else:
        pacer = bucket = TimeBasedPacer(calls_per_second=rate, burst=burst)
    now = 1000.0
    placed: list[tuple[float, int]] = []
    for gap, unused in steps:
        now += gap
        granted = pacer.permits(now, 0, STATS)
        giveback = min(unused, granted)
        pacer.refund(giveback)
        placed.append((now, granted - giveback))
    for (i, (t_i, _)), (j, (t_j, _)) in itertools.combinations_with_replacement(enumerate(placed), 2):
        window_dials = sum(n for _, n in placed[i : j + 1])
        assert window_dials <= bucket.burst + bucket.rate * (t_j - t_i) + 1e-6


def test_steady_polling_reaches_the_rate() -> None:
    pacer = TimeBasedPacer(calls_per_second=100)
    total = sum(pacer.permits(tick * 0.01, 0, STATS) for tick in range(1001))  # 10 s polled every 10 ms
    assert 100 * 10 <= total <= 100 * 10 + pacer.burst


def test_calls_per_minute_and_default_burst() -> None:
    pacer = TimeBasedPacer(calls_per_minute=30)
    assert pacer.rate == pytest.approx(0.5)
    assert pacer.burst == 1
    assert [pacer.permits(t, 0, STATS) for t in (0.0, 1.0, 2.0, 3.0, 4.0)] == [1, 0, 1, 0, 1]
    assert TimeBasedPacer(calls_per_second=100).burst == 25


def test_max_in_flight_caps_the_grant() -> None:
    pacer = TimeBasedPacer(calls_per_second=100, burst=50, max_in_flight=10)
    assert pacer.permits(0.0, 7, STATS) == 3
    assert pacer.permits(0.0, 10, STATS) == 0
    assert pacer.permits(0.0, 0, STATS) == 10  # tokens not spent on a capped grant stay in the bucket


def test_time_going_backwards_grants_nothing_new() -> None:
    pacer = TimeBasedPacer(calls_per_second=10, burst=1)
    assert pacer.permits(100.0, 0, STATS) == 1
    assert pacer.permits(50.0, 0, STATS) == 0
    assert pacer.permits(100.1, 0, STATS) == 1


def test_refund_is_limited_to_the_last_grant() -> None:
    pacer = TimeBasedPacer(calls_per_second=10, burst=5)
    assert pacer.permits(0.0, 0, STATS) == 5
    pacer.refund(2)
    with pytest.raises(ValueError, match="last grant was 3"):
        pacer.refund(4)
    assert pacer.permits(0.0, 0, STATS) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one"),
        ({"calls_per_second": 1, "calls_per_minute": 60}, "exactly one"),
        ({"calls_per_second": 0}, "positive"),
        ({"calls_per_second": float("inf")}, "positive"),
        ({"calls_per_second": 1, "burst": 0}, "burst"),
        ({"calls_per_second": 1, "max_in_flight": 0}, "max_in_flight"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TimeBasedPacer(**kwargs)  # type: ignore[arg-type]


def test_only_time_based_pacing_works_without_agents() -> None:
    assert [k for k in PacingKind if not k.needs_agents] == [PacingKind.TIME_BASED]
