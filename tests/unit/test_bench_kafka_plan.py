"""The kafka-bytes benchmark's event mix: the counts per attempt it documents, in time order, valid events."""

from __future__ import annotations

from collections import Counter

import pytest

from pom_ha.bench.kafka import GUIDE_BYTES_PER_ATTEMPT, MIX, plan_events
from pom_ha.events import parse_event


def test_the_plan_has_the_documented_mix_in_time_order() -> None:
    attempts = 2000
    plan = plan_events(attempts, 67_000, "Default")
    counts = Counter(p.event.kind.value for p in plan)
    for kind, per_attempt in MIX.items():
        assert counts[kind] == pytest.approx(per_attempt * attempts, rel=0.08, abs=2), kind
    assert [p.at_s for p in plan] == sorted(p.at_s for p in plan)
    assert {p.service for p in plan} == {"campaign_manager", "agent_manager", "event_aggregator"}
    for p in plan[:200]:  # what goes on the wire parses back (producer stamped, versioned)
        again = parse_event(p.event.to_json())
        assert again.producer is not None and again.topic() == p.event.topic()


def test_the_guides_figure() -> None:
    assert GUIDE_BYTES_PER_ATTEMPT == 12821  # 859 MB/h / 67,000 attempts/h
