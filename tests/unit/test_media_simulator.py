"""The simulated media platform without sockets: timers are fired by hand, time is a fake clock."""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Hashable

import pytest

from pom_ha.media.protocol import Accepted, Dial, Outcome, Rejected
from pom_ha.media.simulator import DEFAULT_OUTCOMES, MediaPlatform, OutcomeSpec, parse_outcomes


class _Handle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeTimers:
    """``schedule`` + ``clock`` for the platform; :meth:`advance` fires what is due, in time order."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None], _Handle]] = []
        self._seq = itertools.count()

    def schedule(self, delay_s: float, callback: Callable[[], None]) -> _Handle:
        handle = _Handle()
        heapq.heappush(self._heap, (self.now + delay_s, next(self._seq), callback, handle))
        return handle

    def clock(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        until = self.now + seconds
        while self._heap and self._heap[0][0] <= until:
            due, _, callback, handle = heapq.heappop(self._heap)
            self.now = due
            if not handle.cancelled:
                callback()
        self.now = until


class Harness:
    def __init__(self, **kwargs: object) -> None:
        self.timers = FakeTimers()
        self.live: set[Hashable] = {"cm1", "cm2"}
        self.got: list[tuple[Hashable, Outcome]] = []
        self.platform = MediaPlatform(
            self._deliver, schedule=self.timers.schedule, clock=self.timers.clock, **kwargs  # type: ignore[arg-type]
        )

    def _deliver(self, owner: Hashable, outcome: Outcome) -> bool:
        if owner not in self.live:
            return False
        self.got.append((owner, outcome))
        return True

    def dial(self, attempt_id: str, *, epoch: int = 1, scope: str = "job/j1", owner: str = "cm1",
             ) -> Accepted | Rejected:
        return self.platform.dial(Dial(attempt_id, "j1", f"c-{attempt_id}", 1, "+15550001", epoch, scope), owner)


def test_distribution_and_durations_follow_the_weights_over_a_seeded_run() -> None:
    h = Harness(capacity=100_000, seed=42, time_scale=1.0)
    n = 20_000
    assert all(isinstance(h.dial(f"a{i}"), Accepted) for i in range(n))
    h.timers.advance(200.0)
    assert len(h.got) == n and h.platform.in_progress == 0
    counts = Counter(o.code for _, o in h.got)
    total_weight = sum(s.weight for s in DEFAULT_OUTCOMES)
    for spec in DEFAULT_OUTCOMES:
        assert counts[spec.code.name] / n == pytest.approx(spec.weight / total_weight, abs=0.015), spec.code.name
        lo, hi = spec.duration_ms
        assert all(lo <= o.duration_ms <= hi for _, o in h.got if o.code == spec.code.name)
    assert dict(h.platform.counters.completed) == dict(counts)
    assert {o.code: o.answered for _, o in h.got}["ANSWER_MACHINE"] is True
    assert {o.code: o.answered for _, o in h.got}["NO_ANSWER"] is False


def test_the_same_seed_gives_the_same_calls() -> None:
    runs = []
    for _ in range(2):
        h = Harness(seed=7)
        for i in range(50):
            h.dial(f"a{i}")
        h.timers.advance(200.0)
        runs.append([(o.attempt_id, o.code, o.duration_ms) for _, o in h.got])
    assert runs[0] == runs[1]


def test_time_scale_shortens_the_calls() -> None:
    h = Harness(time_scale=0.01, outcomes=(OutcomeSpec(DEFAULT_OUTCOMES[0].code, 1.0, (20_000, 20_000)),))
    h.dial("a1")
    h.timers.advance(0.199)
    assert h.got == []
    h.timers.advance(0.002)
    assert [o.duration_ms for _, o in h.got] == [20_000]  # reported in simulated time


def test_capacity_is_enforced_and_freed_ports_are_reused() -> None:
    h = Harness(capacity=3, seed=1)
    assert [type(h.dial(f"a{i}")).__name__ for i in range(4)] == ["Accepted"] * 3 + ["Rejected"]
    refused = h.dial("a3")
    assert isinstance(refused, Rejected) and refused.reason == "capacity"
    h.timers.advance(200.0)
    assert isinstance(h.dial("a3"), Accepted)  # a refused attempt was never dialed: it may come again
    stats = h.platform.stats()
    assert stats.peak_in_progress == 3 and stats.rejected == {"capacity": 2} and stats.dialed == 4


def test_stale_epochs_are_rejected_and_counted_per_scope() -> None:
    h = Harness()
    assert isinstance(h.dial("a1", epoch=5), Accepted)
    stale = h.dial("a2", epoch=4)
    assert isinstance(stale, Rejected) and stale.reason == "stale_epoch" and "4 < 5" in stale.detail
    assert isinstance(h.dial("a3", epoch=5), Accepted)
    assert isinstance(h.dial("b1", epoch=1, scope="job/j2"), Accepted)  # scopes are fenced separately
    assert isinstance(h.dial("a4", epoch=6), Accepted)
    assert isinstance(h.dial("a5", epoch=5), Rejected)
    assert h.platform.stats().rejected == {"stale_epoch": 2}
    assert h.platform.gate.dropped_total() == 2


def test_an_attempt_is_never_dialed_twice() -> None:
    h = Harness()
    assert isinstance(h.dial("a1"), Accepted)
    dup = h.dial("a1", owner="cm2")
    assert isinstance(dup, Rejected) and dup.reason == "duplicate"
    h.timers.advance(200.0)
    assert isinstance(h.dial("a1"), Rejected)  # also after it completed
    assert h.platform.stats().dialed == 1 and h.platform.stats().rejected == {"duplicate": 2}
    assert [o.attempt_id for _, o in h.got] == ["a1"]


def test_down_mode_rejects_dials_and_can_drop_calls_in_progress() -> None:
    h = Harness(seed=3)
    h.dial("a1")
    h.dial("a2")
    h.platform.set_mode("down")
    refused = h.dial("a3")
    assert isinstance(refused, Rejected) and refused.reason == "down"
    assert h.platform.in_progress == 2  # plain down: calls in progress finish normally
    h.timers.advance(1.0)
    h.platform.set_mode("down", drop_calls=True)
    assert h.platform.in_progress == 0
    assert [(o.code, o.duration_ms) for _, o in h.got] == [("NETWORK_FAILURE", 1000)] * 2
    h.timers.advance(200.0)
    assert len(h.got) == 2  # the dropped calls' timers do not fire again
    h.platform.set_mode("up")
    assert isinstance(h.dial("a3"), Accepted)
    assert h.platform.stats().rejected == {"down": 1}


def test_cancel_ends_a_call_and_unknown_ids_are_counted() -> None:
    h = Harness()
    h.dial("a1")
    h.timers.advance(0.5)
    assert h.platform.cancel("a1") is True
    assert [(o.code, o.duration_ms, o.answered) for _, o in h.got] == [("CANCELLED", 500, False)]
    assert h.platform.cancel("a1") is False and h.platform.cancel("zz") is False
    assert h.platform.stats().cancel_unknown == 2


def test_outcomes_of_a_lost_connection_are_held_for_the_next_dial_of_the_scope() -> None:
    h = Harness(orphan_hold_s=60.0, time_scale=0.001)  # every call ends within 0.1 s
    h.dial("a1")
    h.dial("b1", scope="job/j2")
    h.live.discard("cm1")
    h.platform.disconnect("cm1")
    h.timers.advance(1.0)
    assert h.got == [] and h.platform.stats().orphans_held == 2
    h.dial("a2", owner="cm2")
    assert [(owner, o.attempt_id) for owner, o in h.got] == [("cm2", "a1")]
    stats = h.platform.stats()
    assert stats.orphans_delivered == 1 and stats.orphans_held == 1
    h.timers.advance(61.0)
    assert h.platform.stats().orphans_expired == 1 and h.platform.stats().orphans_held == 0


def test_calls_of_a_lost_connection_report_to_the_next_owner_of_the_scope() -> None:
    h = Harness()
    h.dial("a1")
    h.platform.disconnect("cm1")
    h.dial("a2", owner="cm2")  # the ownerless call a1 now reports to cm2 too
    h.timers.advance(200.0)
    assert sorted((owner, o.attempt_id) for owner, o in h.got) == [("cm2", "a1"), ("cm2", "a2")]


def test_claim_takes_a_scope_over_and_stale_claims_are_refused() -> None:
    h = Harness()
    h.dial("a1", epoch=3)
    h.dial("a2", epoch=3)
    claimed = h.platform.claim("job/j1", 4, "cm2")  # cm1 is alive but its epoch is over
    assert claimed.granted and claimed.in_progress == 2 and claimed.delivered == 0
    h.timers.advance(200.0)
    assert {owner for owner, _ in h.got} == {"cm2"}
    assert h.platform.claim("job/j1", 3, "cm1").granted is False
    assert h.platform.stats().rejected == {"stale_claim": 1}


def test_outcome_configuration_is_validated_with_the_field_named() -> None:
    specs = parse_outcomes('{"ANSWER_HUMAN": 0.5, "BUSY": {"weight": 0.5, "duration_ms": [100, 200]}}')
    assert [(s.code.name, s.weight, s.duration_ms) for s in specs] == [
        ("ANSWER_HUMAN", 0.5, (15_000, 90_000)), ("BUSY", 0.5, (100, 200))]
    for text, message in [
        ('{"NUISANCE": 1}', "outcomes.NUISANCE: not a code"),
        ('{"BUSY": "x"}', "outcomes.BUSY.weight"),
        ('{"BUSY": -1}', "outcomes.BUSY.weight must not be negative"),
        ('{"BUSY": {"weight": 1, "duration_ms": [5, 1]}}', "outcomes.BUSY.duration_ms"),
        ('{"BUSY": 0}', "at least one weight must be positive"),
        ("[1]", "non-empty JSON object"),
        ("{", "not valid JSON"),
    ]:
        with pytest.raises(ValueError, match=message.replace(".", r"\.")):
            parse_outcomes(text)
