"""The Rule Engine's rules, evaluated purely: may this contact be dialed now, and if not, when?

Rules in order: do-not-call list (final: DNC_BLOCKED), max attempts (final: MAX_ATTEMPTS_REACHED),
calling window in the contact's own time zone (OUTSIDE_CALLING_WINDOW, retry at the next opening), and
the minimum gap since the contact's last dialed attempt (retry when the gap has passed). When both the
gap and the window hold a contact back, ``retry_at`` is the first instant that satisfies both.

The window is judged on the contact's local wall clock through ``zoneinfo``, so it moves with daylight
saving time: 08:00 in New York is 13:00 UTC in winter and 12:00 UTC in summer, and on the day the
clocks change the window opens at the right instant.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from pom_ha.domain.attempts import CompletionCode, ContactHistory
from pom_ha.domain.contacts import Contact, ContactRejected, normalize_phone
from pom_ha.domain.instants import as_utc


@dataclass(frozen=True, slots=True)
class CallingWindow:
    """Local wall-clock hours ``[start, end)`` in which a contact may be called."""

    start: time = time(8, 0)
    end: time = time(21, 0)

    def __post_init__(self) -> None:
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("calling window times are local wall-clock times, without a zone")
        if not self.start < self.end:
            raise ValueError(f"calling window start {self.start} must be before its end {self.end}")

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"

    def contains(self, at: datetime, zone: ZoneInfo) -> bool:
        local = as_utc(at).astimezone(zone).time()
        return self.start <= local < self.end

    def earliest_at_or_after(self, at: datetime, zone: ZoneInfo) -> datetime:
        """The first instant not before ``at`` (UTC) that lies inside the window in ``zone``."""
        at = as_utc(at)
        if self.contains(at, zone):
            return at
        local = at.astimezone(zone)
        day = local.date() if local.time() < self.start else local.date() + timedelta(days=1)
        return _first_instant_at_wall_time(day, self.start, zone)


def _first_instant_at_wall_time(day: date, wall: time, zone: ZoneInfo) -> datetime:
    """The first UTC instant whose local time in ``zone`` on ``day`` is ``wall`` or later.

    Usually that is ``wall`` itself (the earlier one if the clocks go back through it). If the clocks
    jump forward over ``wall``, the wall time never happens and the answer is the instant of the jump.
    """
    naive = datetime.combine(day, wall)
    earlier = naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if earlier.astimezone(zone).replace(tzinfo=None) == naive:
        return earlier
    # In a gap fold=0 reads the wall time with the old offset (late), fold=1 with the new one (early);
    # the jump lies between them. Bisect on whole seconds: zone transitions fall on whole seconds.
    lo = int(naive.replace(tzinfo=zone, fold=1).timestamp())
    hi = int(earlier.timestamp())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, zone).replace(tzinfo=None) >= naive:
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, UTC)


@dataclass(frozen=True, slots=True)
class RuleVerdict:
    allowed: bool
    code: CompletionCode | None
    retry_at: datetime | None
    reason: str


ALLOWED = RuleVerdict(True, None, None, "allowed")


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The rules one Rule Engine applies; ``dnc`` phones are normalised like contacts' phones."""

    dnc: AbstractSet[str] = frozenset()
    calling_window: CallingWindow = CallingWindow()
    max_attempts: int = 3
    min_gap_between_attempts: timedelta = timedelta(0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dnc", normalize_dnc(self.dnc))
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.min_gap_between_attempts < timedelta(0):
            raise ValueError("min_gap_between_attempts must not be negative")

    def evaluate(self, contact: Contact, history: ContactHistory, now_utc: datetime) -> RuleVerdict:
        now = as_utc(now_utc, "now_utc")
        if contact.phone in self.dnc:
            return RuleVerdict(False, CompletionCode.DNC_BLOCKED, None, f"{contact.phone} is on the do-not-call list")
        if history.dialed_attempts >= self.max_attempts:
            reason = f"{history.dialed_attempts} attempts made, at most {self.max_attempts} allowed"
            return RuleVerdict(False, CompletionCode.MAX_ATTEMPTS_REACHED, None, reason)
        earliest = now
        reasons: list[str] = []
        if history.last_dialed_at is not None:
            gap_ends = history.last_dialed_at + self.min_gap_between_attempts
            if gap_ends > now:
                earliest = gap_ends
                reasons.append(f"minimum gap {self.min_gap_between_attempts} since the last attempt not over")
        zone = contact.zone
        in_window_now = self.calling_window.contains(now, zone)
        if not in_window_now:
            local = now.astimezone(zone)
            reasons.append(f"outside calling window {self.calling_window} {zone.key} (local {local:%H:%M})")
        retry_at = self.calling_window.earliest_at_or_after(earliest, zone)
        if retry_at == now:
            return ALLOWED
        if in_window_now and retry_at != earliest:
            reasons.append(f"the gap ends outside calling window {self.calling_window} {zone.key}")
        code = None if in_window_now else CompletionCode.OUTSIDE_CALLING_WINDOW
        opens = retry_at.astimezone(zone).isoformat()
        return RuleVerdict(False, code, retry_at, f"{'; '.join(reasons)}; retry at {opens}")


def normalize_dnc(phones: Iterable[str]) -> frozenset[str]:
    """Normalise a do-not-call list; raise ``ValueError`` naming the first entry that is not a phone."""
    normalized: set[str] = set()
    for phone in phones:
        try:
            normalized.add(normalize_phone(phone))
        except ContactRejected as exc:
            raise ValueError(f"do-not-call list: {exc}") from None
    return frozenset(normalized)
