"""A campaign's strategy: what to do next with each contact, and when the whole job is finished.

``RetryStrategy.next_action`` looks at one contact's attempts in a job and answers ``Dial`` (now, with the
next attempt number), ``Wait`` (until a retry interval has passed, or until an in-flight attempt
settles) or ``Done`` (with the code that ended the contact). ``FinishCriteria.is_met`` looks at the job's
counters and answers whether the Campaign Director should finish the job, and why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple

from pom_ha.domain.attempts import Attempt, CompletionCode
from pom_ha.domain.instants import as_utc
from pom_ha.domain.stats import JobStats


@dataclass(frozen=True, slots=True)
class Dial:
    at: datetime
    attempt_no: int


@dataclass(frozen=True, slots=True)
class Wait:
    """Not yet: ``until`` is when the contact is due, ``None`` while an attempt is still in flight."""

    until: datetime | None
    reason: str


@dataclass(frozen=True, slots=True)
class Done:
    code: CompletionCode


NextAction = Dial | Wait | Done


@dataclass(frozen=True, slots=True)
class RetryStrategy:
    """At most ``max_attempts`` dialed attempts per contact; after a retryable code, wait its interval."""

    max_attempts: int = 3
    default_retry_interval: timedelta = timedelta(hours=1)
    retry_intervals: Mapping[str, timedelta] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        for name, interval in {"default": self.default_retry_interval, **self.retry_intervals}.items():
            if interval < timedelta(0):
                raise ValueError(f"retry interval for {name} must not be negative")

    def retry_interval(self, code: CompletionCode) -> timedelta:
        return self.retry_intervals.get(code.name, self.default_retry_interval)

    def next_action(self, attempts: Sequence[Attempt], now: datetime) -> NextAction:
        """Decide for one contact given all its attempts in this job (any order)."""
        now = as_utc(now, "now")
        if not attempts:
            return Dial(now, 1)
        ordered = sorted(attempts, key=lambda a: a.attempt_no)
        last = ordered[-1]
        in_flight = [a.attempt_no for a in ordered if a.in_flight]
        if in_flight:
            return Wait(None, f"attempt {in_flight[-1]} is in flight")
        assert last.code is not None and last.ended_at is not None
        if last.code.is_final or not last.code.retryable:
            return Done(last.code)
        dialed = sum(1 for a in ordered if a.dialed)
        if dialed >= self.max_attempts:
            return Done(CompletionCode.MAX_ATTEMPTS_REACHED)
        due = last.ended_at + self.retry_interval(last.code)
        if due > now:
            return Wait(due, f"retry after {last.code.name} at {due.isoformat()}")
        return Dial(now, last.attempt_no + 1)


class FinishVerdict(NamedTuple):
    met: bool
    reason: str


@dataclass(frozen=True, slots=True)
class FinishCriteria:
    """Finish a job when all contacts are done, at ``end_time``, or once any completion-code goal is reached."""

    all_contacts_done: bool = True
    end_time: datetime | None = None
    code_goals: Mapping[str, int] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not self.all_contacts_done and self.end_time is None and not self.code_goals:
            raise ValueError("a job needs at least one finish criterion")
        if self.end_time is not None:
            object.__setattr__(self, "end_time", as_utc(self.end_time, "end_time"))
        for name, goal in self.code_goals.items():
            if goal < 1:
                raise ValueError(f"goal for {name} must be at least 1, got {goal}")

    def is_met(self, stats: JobStats, now: datetime) -> FinishVerdict:
        now = as_utc(now, "now")
        if self.end_time is not None and now >= self.end_time:
            return FinishVerdict(True, f"end time {self.end_time.isoformat()} reached")
        for name, goal in self.code_goals.items():
            if stats.count(name) >= goal:
                return FinishVerdict(True, f"goal reached: {stats.count(name)} {name} (goal {goal})")
        done = f"{stats.contacts_done} of {stats.contacts_total} contacts done"
        if self.all_contacts_done and stats.contacts_done >= stats.contacts_total:
            return FinishVerdict(True, f"all contacts done ({done})")
        return FinishVerdict(False, f"not met: {done}")
