"""Pacing: how many new dials a job may start at a given moment.

Every pacer has the same small interface (``Pacer``), so the Campaign Manager's dial loop does not care
which kind drives it. ``permits`` grants dials and counts them as spent; dials granted but not placed
(no contact was ready) go back with ``refund``. ``now`` is the caller's monotonic clock in seconds.

Only the time-based pacer of agentless jobs lives here now. The agent-driven kinds (preview,
progressive, predictive with its nuisance-rate cap) need the Agent Manager's view of free agents and
arrive with it; they will implement the same ``Pacer`` protocol.
"""

from __future__ import annotations

import math
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


class Pacer(Protocol):
    def permits(self, now: float, in_flight: int, stats: JobStats) -> int:
        """How many new dials may start at ``now``; the grant is spent when returned."""
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

    def permits(self, now: float, in_flight: int, stats: JobStats) -> int:
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


if TYPE_CHECKING:
    _time_based_is_a_pacer: type[Pacer] = TimeBasedPacer
