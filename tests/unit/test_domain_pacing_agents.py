"""Agent-based pacing: preview dials only after accept, progressive never exceeds the free agents,
predictive stays under its abandon cap over a simulated day (a seeded discrete-event call model)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pom_ha.bench.pacing import PacingModel, simulate
from pom_ha.domain.campaigns import validate_campaign
from pom_ha.domain.pacing import (
    AgentView,
    PacingKind,
    PredictivePacer,
    PreviewPacer,
    ProgressivePacer,
)
from pom_ha.domain.stats import JobStats

STATS = JobStats()


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, 50), st.integers(0, 80), st.booleans()), min_size=1, max_size=50))
def test_progressive_never_exceeds_free_agents(steps: list[tuple[int, int, bool]]) -> None:
    pacer = ProgressivePacer()
    for free, in_flight, available in steps:
        grant = pacer.permits(0.0, in_flight, STATS, AgentView(free=free, busy=3, available=available))
        assert grant >= 0
        assert in_flight + grant <= max(free, in_flight), (free, in_flight, grant)
        if available and in_flight < free:
            assert grant == free - in_flight  # and it does use every free agent
        if not available:
            assert grant == 0


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["offer", "accept", "cancel", "dial", "end"]), st.integers(0, 6)),
                    max_size=80))
def test_preview_dials_only_after_accept(ops: list[tuple[str, int]]) -> None:
    pacer = PreviewPacer()
    accepted: set[str] = set()
    dialed: list[str] = []
    for op, n in ops:
        call = f"c{n}"
        if op == "offer":
            pacer.offered(call)
        elif op == "accept":
            if call in pacer.offered_calls:
                pacer.accepted(call)
                accepted.add(call)
            else:
                with pytest.raises(ValueError, match="never offered"):
                    pacer.accepted(call)
        elif op == "cancel":
            pacer.cancelled(call)
            accepted.discard(call)
        elif op == "end":
            pacer.ended(call)
            accepted.discard(call)
        elif pacer.may_dial(call):
            assert call in accepted
            pacer.dialed(call)
            dialed.append(call)
        else:
            with pytest.raises(ValueError, match="has not accepted"):
                pacer.dialed(call)
    assert PreviewPacer().permits(0, 0, STATS, AgentView(free=4)) == 4
    assert PreviewPacer().permits(0, 0, STATS, AgentView(free=4, available=False)) == 0


def test_no_agent_pacer_dials_without_agents_or_zone() -> None:
    for pacer in (PreviewPacer(), ProgressivePacer(), PredictivePacer()):
        assert pacer.permits(0.0, 0, STATS, None) == 0
        assert pacer.permits(0.0, 0, STATS, AgentView(free=10, available=False)) == 0


def test_predictive_is_progressive_until_answers_earn_a_budget() -> None:
    pacer = PredictivePacer(abandon_cap=0.03)
    assert pacer.permits(0.0, 0, STATS, AgentView(free=10)) == 10  # no live answers yet: no surplus
    pacer.seed(attempts=3000, live_answers=1000, abandons=0)
    assert pacer.budget == 27  # 3 % x 0.9 margin x 1000
    grant = pacer.permits(1.0, 0, STATS, AgentView(free=10))
    assert 10 < grant <= 10 + 27
    assert grant == min(int(pacer.ratio * 10), 37)
    pacer.seed(attempts=3000, live_answers=1000, abandons=27)  # at the (margined) cap: progressive
    assert pacer.permits(2.0, 0, STATS, AgentView(free=10)) == 10
    assert pacer.permits(2.0, 4, STATS, AgentView(free=10)) == 6


@settings(max_examples=200, deadline=None)
@given(live=st.integers(0, 5000), extra=st.integers(0, 5000), abandons_frac=st.floats(0, 0.1),
       free=st.integers(0, 200), busy=st.integers(0, 200), in_flight=st.integers(0, 400),
       cap=st.floats(0.005, 0.2), ratio=st.floats(1, 10))
def test_predictive_surplus_never_exceeds_the_budget(live: int, extra: int, abandons_frac: float, free: int,
                                                     busy: int, in_flight: int, cap: float, ratio: float) -> None:
    pacer = PredictivePacer(abandon_cap=cap, max_ratio=ratio)
    pacer.seed(attempts=live + extra, live_answers=live, abandons=min(live, int(live * abandons_frac)))
    grant = pacer.permits(0.0, in_flight, STATS, AgentView(free=free, busy=busy))
    assert grant >= 0
    if grant:
        surplus = in_flight + grant - free
        assert surplus <= pacer.budget
        if pacer.abandons <= cap * live:  # the invariant the grant keeps (an earlier excess only stops surplus)
            assert pacer.abandons + max(0, surplus) <= cap * live + 1e-6
        else:
            assert surplus <= 0
        assert in_flight + grant <= max(ratio * (free + busy), free)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("agents", [10, 50])
def test_predictive_respects_the_cap_over_a_simulated_day(seed: int, agents: int) -> None:
    model = PacingModel(agents=agents, seconds=4 * 3600, seed=seed)
    result = simulate(model, PacingKind.PREDICTIVE)
    assert result.live_answers > 500
    assert result.abandon_rate <= model.abandon_cap, result
    progressive = simulate(model, PacingKind.PROGRESSIVE)
    assert progressive.abandons == 0
    assert result.occupancy > progressive.occupancy  # dialing ahead pays


def test_predictive_backs_off_when_abandons_come_from_elsewhere() -> None:
    pacer = PredictivePacer(abandon_cap=0.03)
    pacer.seed(attempts=3000, live_answers=1000, abandons=40)  # over the cap already (an AM failover)
    assert pacer.budget == 0
    assert pacer.permits(0.0, 0, STATS, AgentView(free=7)) == 7


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"abandon_cap": 0}, "abandon_cap"), ({"abandon_cap": 1.2}, "abandon_cap"), ({"max_ratio": 0.5}, "max_ratio"),
    ({"margin": 1}, "margin"), ({"prior_answer_rate": 0}, "prior_answer_rate"),
])
def test_bad_predictive_settings_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PredictivePacer(**kwargs)


def test_campaign_definitions_build_agent_pacers() -> None:
    base = {"name": "p", "contact_list": "l"}
    pred = validate_campaign({**base, "pacing": {"kind": "predictive", "abandon_cap": 0.02, "max_ratio": 2.5}}).pacer()
    assert isinstance(pred, PredictivePacer) and pred.abandon_cap == 0.02 and pred.max_ratio == 2.5
    default = validate_campaign({**base, "pacing": {"kind": "predictive"}}).pacer()
    assert isinstance(default, PredictivePacer) and default.abandon_cap == 0.03
    assert isinstance(validate_campaign({**base, "pacing": {"kind": "progressive"}}).pacer(), ProgressivePacer)
    assert isinstance(validate_campaign({**base, "pacing": {"kind": "preview"}}).pacer(), PreviewPacer)
