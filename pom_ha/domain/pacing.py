"""Pacing: how many new dials a job may start at a given moment.

Every pacer has the same small interface (``Pacer``), so the Campaign Manager's dial loop does not care
which kind drives it. ``permits`` grants dials and counts them as spent; dials granted but not placed
(no contact was ready) go back with ``refund``. ``now`` is the caller's monotonic clock in seconds.

Agentless jobs use ``TimeBasedPacer`` (a rate). Agent-based jobs pass the zone's agents as the Campaign
Manager read them from the Agent Manager's tables (``AgentView``: free agents of the job, busy ones, and
whether the zone has an Agent Manager master at all) and use one of:

* ``PreviewPacer``: one preview per free agent; a preview's call is dialed only after the agent accepted
  it (``accepted`` / ``may_dial``).
* ``ProgressivePacer``: one dial per free agent: dials in flight never exceed the free agents.
* ``PredictivePacer``: several dials per free agent from the measured answer rate (live answers /
  attempts) and handle time, under an abandon (nuisance) cap it never exceeds (see its docstring).

No pacer grants anything while ``AgentView.available`` is false (an Agent Manager failover gap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from pom_ha.domain.stats import JobStats

# Float accumulation may leave a bucket at 2.9999999999 where exact arithmetic gives 3; this tolerance
# stops it from withholding a whole dial, and is far too small to grant one that was not earned.
_EPSILON = 1e-9


class PacingKind(Enum):
    TIME_BASED = "time_based"
    PREVIEW = "preview"
    PROGRESSIVE = "progressive"
    PREDICTIVE = "predictive"

    @property
    def needs_agents(self) -> bool:
        return self is not PacingKind.TIME_BASED


@dataclass(frozen=True, slots=True)
class AgentView:
    """The agents of one job as the Campaign Manager sees them at one tick.

    ``free``: logged in, ready, Idle, attached to the job, and not already promised a call (an offer the
    Agent Manager has not applied yet). ``busy``: on a call of the job or wrapping one up. ``available``:
    the zone has a working Agent Manager master (``agent_zone_status.available``).
    """

    free: int = 0
    busy: int = 0
    available: bool = True

    def __post_init__(self) -> None:
        if self.free < 0 or self.busy < 0:
            raise ValueError(f"agent counts must not be negative, got free={self.free} busy={self.busy}")


class Pacer(Protocol):
    def permits(self, now: float, in_flight: int, stats: JobStats, agents: AgentView | None = None) -> int:
        """How many new dials may start at ``now``; the grant is spent when returned. ``in_flight``: dials
        placed and not yet answered or ended. ``agents``: None for agentless jobs."""
        ...

    def refund(self, unused: int) -> None:
        """Give back dials granted by the last ``permits`` call but not placed."""
        ...


class TimeBasedPacer:
    """A token bucket: ``rate`` dials per second on average, at most ``burst`` at once.

    Over any interval of length ``T`` it grants at most ``burst + rate * T`` dials. ``burst`` defaults to
    a quarter second's worth (at least one), enough for a dial loop that wakes a few times a second to
    keep the rate without sending a whole second's calls in one go. ``max_in_flight`` caps concurrent
    calls (ports) on top of the rate.
    """

    def __init__(
        self,
        *,
        calls_per_second: float | None = None,
        calls_per_minute: float | None = None,
        burst: int | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        if (calls_per_second is None) == (calls_per_minute is None):
            raise ValueError("give exactly one of calls_per_second and calls_per_minute")
        rate = calls_per_second if calls_per_second is not None else (calls_per_minute or 0.0) / 60.0
        if not rate > 0 or not math.isfinite(rate):
            raise ValueError(f"the dialing rate must be a positive number, got {rate} per second")
        self.rate = rate
        self.burst = burst if burst is not None else max(1, math.floor(rate * 0.25))
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, got {self.burst}")
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.max_in_flight = max_in_flight
        self._tokens = float(self.burst)
        self._last: float | None = None
        self._last_grant = 0

    def permits(self, now: float, in_flight: int, stats: JobStats, agents: AgentView | None = None) -> int:
        if self._last is not None and now > self._last:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        if self._last is None or now > self._last:
            self._last = now
        grant = math.floor(self._tokens + _EPSILON)
        if self.max_in_flight is not None:
            grant = min(grant, max(0, self.max_in_flight - in_flight))
        grant = max(0, grant)
        self._tokens = max(0.0, self._tokens - grant)
        self._last_grant = grant
        return grant

    def refund(self, unused: int) -> None:
        if not 0 <= unused <= self._last_grant:
            raise ValueError(f"cannot refund {unused} dials, the last grant was {self._last_grant}")
        self._last_grant -= unused
        self._tokens = min(float(self.burst), self._tokens + unused)


DEFAULT_ABANDON_CAP = 0.03
DEFAULT_MAX_RATIO = 3.0


class _AgentPacer:
    """What the agent pacers share: no refunds to keep (their grant is recomputed from the agents each
    tick), nothing while the zone has no Agent Manager master."""

    def __init__(self) -> None:
        self._last_grant = 0

    def refund(self, unused: int) -> None:
        if not 0 <= unused <= self._last_grant:
            raise ValueError(f"cannot refund {unused} dials, the last grant was {self._last_grant}")
        self._last_grant -= unused

    def _grant(self, n: int) -> int:
        self._last_grant = max(0, n)
        return self._last_grant


class ProgressivePacer(_AgentPacer):
    """One dial per free agent: after the grant, dials in flight never exceed the free agents, so every
    call a person answers has an agent waiting (no abandon while the agents stay)."""

    def permits(self, now: float, in_flight: int, stats: JobStats, agents: AgentView | None = None) -> int:
        if agents is None or not agents.available:
            return self._grant(0)
        return self._grant(agents.free - in_flight)


@dataclass
class PreviewPacer(_AgentPacer):
    """Preview: each free agent is offered one contact (``permits`` = how many previews to offer now:
    one per free agent); the call of a preview is dialed only once its agent accepted it.

    The Campaign Manager records each preview it offers (``offered``), what the agent did (``accepted``
    / ``cancelled``) and the dial (``dialed``, refused unless ``may_dial``)."""

    offered_calls: set[str] = field(default_factory=set)
    accepted_calls: set[str] = field(default_factory=set)
    dialed_calls: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        _AgentPacer.__init__(self)

    def permits(self, now: float, in_flight: int, stats: JobStats, agents: AgentView | None = None) -> int:
        if agents is None or not agents.available:
            return self._grant(0)
        return self._grant(agents.free)

    def offered(self, call_id: str) -> None:
        self.offered_calls.add(call_id)

    def accepted(self, call_id: str) -> None:
        if call_id not in self.offered_calls:
            raise ValueError(f"preview {call_id} was never offered")
        self.accepted_calls.add(call_id)

    def cancelled(self, call_id: str) -> None:
        self.offered_calls.discard(call_id)
        self.accepted_calls.discard(call_id)

    def may_dial(self, call_id: str) -> bool:
        return call_id in self.accepted_calls and call_id not in self.dialed_calls

    def dialed(self, call_id: str) -> None:
        if not self.may_dial(call_id):
            raise ValueError(f"preview {call_id} may not be dialed: its agent has not accepted it")
        self.dialed_calls.add(call_id)

    def ended(self, call_id: str) -> None:
        self.offered_calls.discard(call_id)
        self.accepted_calls.discard(call_id)
        self.dialed_calls.discard(call_id)


class PredictivePacer(_AgentPacer):
    """Dials ahead of the agents, never past the abandon cap.

    Measured (``record``): attempts, live answers, abandons (live answers that found no agent:
    NUISANCE), the mean handle time (talk + wrap-up) and the mean time a dial takes to be answered.
    The answer rate ``p`` starts from ``prior_answer_rate`` (weighted as ``prior_weight`` attempts) and
    converges to live answers / attempts.

    Each tick, with ``F`` free agents, ``B`` busy agents and ``D`` dials in flight:

    * wanted: ``ratio x (F + B x min(1, ring / handle)) - D`` with ``ratio = min(max_ratio, 1 / p)``: enough
      dials for the free agents plus those expected to free up while the new dials ring;
    * allowed: ``F + budget - D`` where ``budget = ⌊cap x (1 - margin) x live - abandons⌋``. A dial beyond
      the free agents ("surplus") can abandon at most one call, so abandons + surplus in flight ≤ cap x
      live answers holds after every grant, and therefore over the whole day: abandons ≤ cap x live
      answers. As the running abandon rate approaches the cap the budget shrinks to 0 and the pacer is
      progressive (one dial per free agent); early in the day (few live answers) too.

    The grant is the smaller of the two, never below zero. Abandons that no surplus dial explains (agents
    who logged out while their call rang, an Agent Manager failover) still count: they eat the budget.
    """

    def __init__(self, *, abandon_cap: float = DEFAULT_ABANDON_CAP, max_ratio: float = DEFAULT_MAX_RATIO,
                 margin: float = 0.1, prior_answer_rate: float = 0.3, prior_weight: float = 20.0,
                 prior_ring_s: float = 10.0, prior_handle_s: float = 60.0) -> None:
        super().__init__()
        if not 0 < abandon_cap < 1 or not math.isfinite(abandon_cap):
            raise ValueError(f"abandon_cap must be a fraction between 0 and 1, got {abandon_cap}")
        if not 1 <= max_ratio <= 20 or not math.isfinite(max_ratio):
            raise ValueError(f"max_ratio must be between 1 and 20 dials per free agent, got {max_ratio}")
        if not 0 <= margin < 1:
            raise ValueError(f"margin must be within [0, 1), got {margin}")
        if not 0 < prior_answer_rate <= 1:
            raise ValueError(f"prior_answer_rate must be within (0, 1], got {prior_answer_rate}")
        self.abandon_cap = abandon_cap
        self.max_ratio = max_ratio
        self.margin = margin
        self.prior_answer_rate = prior_answer_rate
        self.prior_weight = prior_weight
        self.attempts = 0
        self.live_answers = 0
        self.abandons = 0
        self._ring = _Mean(prior_ring_s)
        self._handle = _Mean(prior_handle_s)

    # ---- measurements --------------------------------------------------------------------------------------
    def record(self, *, live: bool, abandoned: bool = False, ring_s: float | None = None) -> None:
        """One dialed attempt ended (or was answered): ``live`` a person answered, ``abandoned`` and no
        agent took the call (NUISANCE; it is a live answer too)."""
        if abandoned and not live:
            raise ValueError("an abandoned call is a live answer")
        self.attempts += 1
        self.live_answers += live
        self.abandons += abandoned
        if live and ring_s is not None and ring_s >= 0:
            self._ring.add(ring_s)

    def record_handle_time(self, seconds: float) -> None:
        if seconds >= 0 and math.isfinite(seconds):
            self._handle.add(seconds)

    def seed(self, *, attempts: int, live_answers: int, abandons: int) -> None:
        """The day so far (a job taken over, or restarted): the cap is over the whole day."""
        if not 0 <= abandons <= live_answers <= attempts:
            raise ValueError(f"need 0 <= abandons ({abandons}) <= live answers ({live_answers}) <= attempts "
                             f"({attempts})")
        self.attempts, self.live_answers, self.abandons = attempts, live_answers, abandons

    @property
    def answer_rate(self) -> float:
        w = self.prior_weight
        return (self.live_answers + self.prior_answer_rate * w) / (self.attempts + w)

    @property
    def abandon_rate(self) -> float | None:
        return self.abandons / self.live_answers if self.live_answers else None

    @property
    def budget(self) -> int:
        """How many dials beyond the free agents may be in flight now."""
        return max(0, math.floor(self.abandon_cap * (1 - self.margin) * self.live_answers - self.abandons
                                 + _EPSILON))

    @property
    def ratio(self) -> float:
        return min(self.max_ratio, 1.0 / max(self.answer_rate, 1e-6))

    def permits(self, now: float, in_flight: int, stats: JobStats, agents: AgentView | None = None) -> int:
        if agents is None or not agents.available:
            return self._grant(0)
        free, busy = agents.free, agents.busy
        handle = self._handle.value
        soon = busy * min(1.0, self._ring.value / handle) if handle > 0 else float(busy)
        wanted = math.floor(self.ratio * (free + soon) + _EPSILON) - in_flight
        allowed = free + self.budget - in_flight
        return self._grant(min(wanted, allowed))


@dataclass
class _Mean:
    """A running mean that starts at a prior (weight 1) so early samples do not swing it wildly."""

    value: float
    n: int = 1

    def add(self, x: float) -> None:
        self.n += 1
        self.value += (x - self.value) / self.n


if TYPE_CHECKING:
    _time_based_is_a_pacer: type[Pacer] = TimeBasedPacer
    _progressive_is_a_pacer: type[Pacer] = ProgressivePacer
    _preview_is_a_pacer: type[Pacer] = PreviewPacer
    _predictive_is_a_pacer: type[Pacer] = PredictivePacer
