"""Nuisance (abandoned-call) rate: its value over a window, its trend, and when to raise or clear the alarm.

The rate is nuisance calls divided by live answers (a nuisance call is itself a live answer: a person
picked up and no agent was there), the regulators' definition. The Common Campaign Director computes it
periodically, either from call outcomes (``NuisanceRate.of``) or from counts it aggregated in SQL, and
writes an alarm row only when ``decide_alarm`` says the state changes, so a rate that stays high does
not raise a new alarm every cycle.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

from pom_ha.domain.attempts import CompletionCode
from pom_ha.domain.instants import as_utc

DEFAULT_CAP = 0.03
# Below this many live answers one abandoned call would swing the rate by several percent.
DEFAULT_MIN_LIVE_ANSWERS = 30

CallOutcome = tuple[datetime, CompletionCode]


@dataclass(frozen=True, slots=True)
class NuisanceRate:
    start: datetime
    end: datetime
    nuisance: int
    live_answers: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", as_utc(self.start, "start"))
        object.__setattr__(self, "end", as_utc(self.end, "end"))
        if not self.start < self.end:
            raise ValueError("a nuisance window must end after it starts")
        if not 0 <= self.nuisance <= self.live_answers:
            raise ValueError(f"nuisance {self.nuisance} must be within 0..live answers {self.live_answers}")

    @property
    def rate(self) -> float | None:
        """Nuisance / live answers, or ``None`` when nobody answered (no rate, not a zero rate)."""
        return self.nuisance / self.live_answers if self.live_answers else None

    @classmethod
    def of(cls, outcomes: Iterable[CallOutcome], start: datetime, end: datetime) -> NuisanceRate:
        """Count the outcomes that ended in ``[start, end)``."""
        start, end = as_utc(start, "start"), as_utc(end, "end")
        nuisance = live = 0
        for at, code in outcomes:
            if start <= as_utc(at, "outcome time") < end and code.is_live_answer:
                live += 1
                nuisance += code.name == CompletionCode.NUISANCE.name
        return cls(start, end, nuisance, live)

    def describe(self) -> str:
        if self.rate is None:
            return "no live answers"
        return f"{self.rate:.2%} ({self.nuisance} nuisance of {self.live_answers} live answers)"


def nuisance_trend(
    outcomes: Iterable[CallOutcome], start: datetime, end: datetime, bucket: timedelta
) -> list[NuisanceRate]:
    """The rate per ``bucket`` from ``start`` to ``end``; the last bucket may be shorter."""
    start, end = as_utc(start, "start"), as_utc(end, "end")
    if bucket <= timedelta(0):
        raise ValueError("trend buckets must have a positive length")
    if not start < end:
        raise ValueError("a trend must end after it starts")
    count = -(-(end - start) // bucket)
    nuisance = [0] * count
    live = [0] * count
    for at, code in outcomes:
        at = as_utc(at, "outcome time")
        if start <= at < end and code.is_live_answer:
            index = (at - start) // bucket
            live[index] += 1
            nuisance[index] += code.name == CompletionCode.NUISANCE.name
    return [
        NuisanceRate(start + i * bucket, min(end, start + (i + 1) * bucket), nuisance[i], live[i]) for i in range(count)
    ]


class AlarmAction(Enum):
    RAISE = "raise"
    CLEAR = "clear"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class AlarmDecision:
    action: AlarmAction
    reason: str


@dataclass(frozen=True, slots=True)
class NuisanceAlarmPolicy:
    """Raise when the rate exceeds ``cap`` over at least ``min_live_answers``; clear at ``clear_below``."""

    cap: float = DEFAULT_CAP
    min_live_answers: int = DEFAULT_MIN_LIVE_ANSWERS
    clear_below: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.cap < 1:
            raise ValueError(f"nuisance cap must be between 0 and 1 (a fraction), got {self.cap}")
        if self.min_live_answers < 1:
            raise ValueError("min_live_answers must be at least 1")
        if self.clear_below is not None and not 0 <= self.clear_below <= self.cap:
            raise ValueError(f"clear_below must be within 0..cap {self.cap}, got {self.clear_below}")

    @property
    def clear_threshold(self) -> float:
        return self.cap if self.clear_below is None else self.clear_below


def decide_alarm(rate: NuisanceRate, policy: NuisanceAlarmPolicy, *, active: bool) -> AlarmDecision:
    """Whether the alarm changes state; ``active`` says whether it is raised now."""
    cap = f"cap {policy.cap:.2%}"
    if rate.rate is None or rate.live_answers < policy.min_live_answers:
        sample = f"only {rate.live_answers} live answers, {policy.min_live_answers} needed to judge"
        return AlarmDecision(AlarmAction.NONE, sample)
    if not active and rate.rate > policy.cap:
        return AlarmDecision(AlarmAction.RAISE, f"nuisance rate {rate.describe()} over {cap}")
    if active and rate.rate <= policy.clear_threshold:
        return AlarmDecision(AlarmAction.CLEAR, f"nuisance rate {rate.describe()} back within {cap}")
    if active:
        threshold = f"clear threshold {policy.clear_threshold:.2%}"
        return AlarmDecision(AlarmAction.NONE, f"nuisance rate {rate.describe()} still above the {threshold}")
    return AlarmDecision(AlarmAction.NONE, f"nuisance rate {rate.describe()} within {cap}")
