"""Job lifecycle: the states a campaign job goes through and the only transitions allowed between them.

    Queued -> Filter in Progress -> Running <-> Paused -> Stopping -> Completed | Stopped

``TRANSITIONS`` is the whole table; ``transition`` applies one event to a ``JobStatus`` and raises
``InvalidTransition`` for anything the table does not list. Two facts outlive a single state and are kept
on ``JobStatus``: which end a Stopping job is heading for (Completed when its finish criteria were met,
Stopped when an operator stopped it), and whether a Paused job must be filtered again before it runs
(its Campaign Manager died or the cache was rebuilt while it was paused).

HA events: ``takeover`` (the job's Campaign Manager died and another took it) and ``cache_rebuilt`` send a
running job back through Filter in Progress, since the taker's view of the contacts must be rebuilt
before it dials; a stopping job stays Stopping (the taker settles the in-flight attempts); a queued job
stays Queued.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class JobState(Enum):
    QUEUED = "Queued"
    FILTER_IN_PROGRESS = "Filter in Progress"
    RUNNING = "Running"
    PAUSED = "Paused"
    STOPPING = "Stopping"
    COMPLETED = "Completed"
    STOPPED = "Stopped"

    @property
    def display_name(self) -> str:
        return self.value

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


class JobEvent(Enum):
    START = "start"
    FILTER_DONE = "filter_done"
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    FINISH_CRITERIA_MET = "finish_criteria_met"
    ALL_ATTEMPTS_SETTLED = "all_attempts_settled"
    TAKEOVER = "takeover"
    CACHE_REBUILT = "cache_rebuilt"


TERMINAL_STATES = frozenset({JobState.COMPLETED, JobState.STOPPED})

_S, _E = JobState, JobEvent

# (state, event) -> next state. Stopping -> all_attempts_settled goes to the end chosen on entering
# Stopping (see JobStatus.ending); the table names Completed there only as a placeholder for "an end".
TRANSITIONS: dict[tuple[JobState, JobEvent], JobState] = {
    (_S.QUEUED, _E.START): _S.FILTER_IN_PROGRESS,
    (_S.QUEUED, _E.STOP): _S.STOPPED,
    (_S.QUEUED, _E.FINISH_CRITERIA_MET): _S.COMPLETED,
    (_S.QUEUED, _E.TAKEOVER): _S.QUEUED,
    (_S.QUEUED, _E.CACHE_REBUILT): _S.QUEUED,
    (_S.FILTER_IN_PROGRESS, _E.FILTER_DONE): _S.RUNNING,
    (_S.FILTER_IN_PROGRESS, _E.STOP): _S.STOPPING,
    (_S.FILTER_IN_PROGRESS, _E.FINISH_CRITERIA_MET): _S.STOPPING,
    (_S.FILTER_IN_PROGRESS, _E.TAKEOVER): _S.FILTER_IN_PROGRESS,
    (_S.FILTER_IN_PROGRESS, _E.CACHE_REBUILT): _S.FILTER_IN_PROGRESS,
    (_S.RUNNING, _E.PAUSE): _S.PAUSED,
    (_S.RUNNING, _E.STOP): _S.STOPPING,
    (_S.RUNNING, _E.FINISH_CRITERIA_MET): _S.STOPPING,
    (_S.RUNNING, _E.TAKEOVER): _S.FILTER_IN_PROGRESS,
    (_S.RUNNING, _E.CACHE_REBUILT): _S.FILTER_IN_PROGRESS,
    (_S.PAUSED, _E.RESUME): _S.RUNNING,
    (_S.PAUSED, _E.STOP): _S.STOPPING,
    (_S.PAUSED, _E.FINISH_CRITERIA_MET): _S.STOPPING,
    (_S.PAUSED, _E.TAKEOVER): _S.PAUSED,
    (_S.PAUSED, _E.CACHE_REBUILT): _S.PAUSED,
    # An operator stop racing the Director's finish check (or a retried command after a takeover) must
    # not fail: both leave a stopping job as it is.
    (_S.STOPPING, _E.STOP): _S.STOPPING,
    (_S.STOPPING, _E.FINISH_CRITERIA_MET): _S.STOPPING,
    (_S.STOPPING, _E.ALL_ATTEMPTS_SETTLED): _S.COMPLETED,
    (_S.STOPPING, _E.TAKEOVER): _S.STOPPING,
    (_S.STOPPING, _E.CACHE_REBUILT): _S.STOPPING,
}

_ENDING_FOR = {JobEvent.STOP: JobState.STOPPED, JobEvent.FINISH_CRITERIA_MET: JobState.COMPLETED}


class InvalidTransition(ValueError):
    """An event the job's current state does not accept."""

    def __init__(self, state: JobState, event: JobEvent) -> None:
        self.state = state
        self.event = event
        allowed = ", ".join(e.value for e in allowed_events(state)) or "none, the state is final"
        super().__init__(f"a job in state {state.display_name!r} cannot take {event.value!r}; allowed: {allowed}")


def allowed_events(state: JobState) -> list[JobEvent]:
    return [event for (s, event) in TRANSITIONS if s is state]


@dataclass(frozen=True, slots=True)
class JobStatus:
    """A job's state plus what it must remember: ``ending`` while Stopping, ``refilter`` while Paused."""

    state: JobState = JobState.QUEUED
    ending: JobState | None = None
    refilter: bool = False

    def __post_init__(self) -> None:
        if (self.ending is not None) != (self.state is JobState.STOPPING):
            raise ValueError("ending is set exactly when the state is Stopping")
        if self.ending is not None and self.ending not in TERMINAL_STATES:
            raise ValueError(f"ending must be Completed or Stopped, not {self.ending.display_name}")
        if self.refilter and self.state is not JobState.PAUSED:
            raise ValueError("refilter is only kept while Paused")


def transition(current: JobStatus, event: JobEvent) -> JobStatus:
    """Apply ``event`` to ``current``; raise ``InvalidTransition`` if the table does not allow it."""
    target = TRANSITIONS.get((current.state, event))
    if target is None:
        raise InvalidTransition(current.state, event)
    if current.state is JobState.STOPPING:
        if event is JobEvent.ALL_ATTEMPTS_SETTLED:
            assert current.ending is not None
            return JobStatus(current.ending)
        return current
    if target is JobState.STOPPING:
        return JobStatus(JobState.STOPPING, ending=_ENDING_FOR[event])
    if current.state is JobState.PAUSED:
        if event in (JobEvent.TAKEOVER, JobEvent.CACHE_REBUILT):
            return JobStatus(JobState.PAUSED, refilter=True)
        if event is JobEvent.RESUME and current.refilter:
            return JobStatus(JobState.FILTER_IN_PROGRESS)
    return JobStatus(target)
