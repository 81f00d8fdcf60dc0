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

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

from pom_ha.domain.attempts import CompletionCode, ContactHistory
from pom_ha.domain.contacts import Contact, ContactRejected, normalize_phone
from pom_ha.domain.instants import as_utc


class Window(Protocol):
    """What the rules need of a calling window (a daily :class:`CallingWindow`, or a strategy's weekly one)."""

    def contains(self, at: datetime, zone: ZoneInfo) -> bool: ...
    def earliest_at_or_after(self, at: datetime, zone: ZoneInfo) -> datetime: ...


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
    """The rules one Rule Engine applies; ``dnc`` phones are normalised like contacts' phones.

    ``dnc_lists``: further do-not-call sets, already E.164 (named lists loaded from the database, shared by
    every campaign's rule set, never copied). ``region_windows``: a contact whose region (ISO country of its
    number, via :func:`pom_ha.domain.phones.region_of`) has an entry is judged by that window instead.
    ``max_attempts_per_number``: checked when the history says how often the number was dialed."""

    dnc: AbstractSet[str] = frozenset()
    calling_window: Window = CallingWindow()
    max_attempts: int = 3
    min_gap_between_attempts: timedelta = timedelta(0)
    dnc_lists: tuple[AbstractSet[str], ...] = ()
    region_windows: Mapping[str, Window] = field(default_factory=dict, hash=False)
    max_attempts_per_number: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dnc", normalize_dnc(self.dnc))
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.min_gap_between_attempts < timedelta(0):
            raise ValueError("min_gap_between_attempts must not be negative")

    def evaluate(self, contact: Contact, history: ContactHistory, now_utc: datetime) -> RuleVerdict:
        now = as_utc(now_utc, "now_utc")
        if self.is_dnc(contact.phone):
            return RuleVerdict(False, CompletionCode.DNC_BLOCKED, None,
                               f"{_mask(contact.phone)} is on a do-not-call list")
        if history.dialed_attempts >= self.max_attempts:
            reason = f"{history.dialed_attempts} attempts made, at most {self.max_attempts} allowed"
            return RuleVerdict(False, CompletionCode.MAX_ATTEMPTS_REACHED, None, reason)
        number_attempts = history.number_attempts
        if self.max_attempts_per_number is not None and number_attempts is not None \
                and number_attempts >= self.max_attempts_per_number:
            reason = f"{number_attempts} attempts made on this number, at most {self.max_attempts_per_number} allowed"
            return RuleVerdict(False, CompletionCode.MAX_ATTEMPTS_REACHED, None, reason)
        earliest = now
        reasons: list[str] = []
        if history.last_dialed_at is not None:
            gap_ends = history.last_dialed_at + self.min_gap_between_attempts
            if gap_ends > now:
                earliest = gap_ends
                reasons.append(f"minimum gap {self.min_gap_between_attempts} since the last attempt not over")
        zone = contact.zone
        window = self.window_for(contact.phone)
        in_window_now = window.contains(now, zone)
        if not in_window_now:
            local = now.astimezone(zone)
            reasons.append(f"outside calling window {window} {zone.key} (local {local:%H:%M})")
        retry_at = window.earliest_at_or_after(earliest, zone)
        if retry_at == now:
            return ALLOWED
        if in_window_now and retry_at != earliest:
            reasons.append(f"the gap ends outside calling window {window} {zone.key}")
        code = None if in_window_now else CompletionCode.OUTSIDE_CALLING_WINDOW
        opens = retry_at.astimezone(zone).isoformat()
        return RuleVerdict(False, code, retry_at, f"{'; '.join(reasons)}; retry at {opens}")


    def is_dnc(self, phone: str) -> bool:
        return phone in self.dnc or any(phone in s for s in self.dnc_lists)

    def window_for(self, phone: str) -> Window:
        if not self.region_windows:
            return self.calling_window
        from pom_ha.domain.phones import region_of

        region = region_of(phone)
        return self.region_windows.get(region or "", self.calling_window)


def _mask(phone: str) -> str:
    from pom_ha.domain.phones import mask

    return mask(phone)


def normalize_dnc(phones: Iterable[str]) -> frozenset[str]:
    """Normalise a do-not-call list; raise ``ValueError`` naming the first entry that is not a phone."""
    normalized: set[str] = set()
    for phone in phones:
        try:
            normalized.add(normalize_phone(phone))
        except ContactRejected as exc:
            raise ValueError(f"do-not-call list: {exc}") from None
    return frozenset(normalized)
