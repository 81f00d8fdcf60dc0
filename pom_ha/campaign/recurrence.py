"""Recurring schedules (pure): RFC 5545 rules (dateutil's ``rrule``) or cron expressions (``croniter``)
in a named time zone, with holiday calendars (the ``holidays`` package by country and region, plus custom
dates) on whose days a schedule does not fire.

Occurrences are computed on the zone's wall clock and only then turned into instants, so ``09:00 every
weekday in America/New_York`` stays 09:00 local across daylight saving time. A wall time that does not
exist (the spring-forward hour) fires at the jump; one that happens twice fires at the first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, croniter
from dateutil.rrule import rrule, rrulestr

from pom_ha.domain.instants import as_utc
from pom_ha.domain.rules import _first_instant_at_wall_time

MAX_SCAN = 2000  # occurrences examined to find the next non-holiday one (bounded: a rule may never fire)
Kind = Literal["rrule", "cron"]


class RecurrenceError(ValueError):
    """A rule, expression, zone or calendar that cannot be used; the message names field and value."""


def zone_named(name: str, field_name: str = "tz") -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise RecurrenceError(f"{field_name}: unknown time zone {name!r}") from None


@dataclass(frozen=True)
class HolidayCalendar:
    """Days on which schedules do not fire: a country's (and region's) public holidays and custom dates."""

    name: str = ""
    country: str | None = None
    subdivision: str | None = None
    custom_dates: frozenset[date] = frozenset()

    def __post_init__(self) -> None:
        if self.country is None:
            if self.subdivision is not None:
                raise RecurrenceError("subdivision: a region needs its country")
            return
        import holidays

        try:
            table = holidays.country_holidays(self.country)
        except NotImplementedError:
            raise RecurrenceError(
                f"country: no holiday calendar for {self.country!r} (ISO 3166 codes such as US, FR)") from None
        known = tuple(getattr(table, "subdivisions", ()) or ())
        if self.subdivision is not None and self.subdivision not in known:
            raise RecurrenceError(f"subdivision: {self.subdivision!r} is not a region of {self.country} "
                                  f"(known: {', '.join(known[:12]) or 'none'}{'...' if len(known) > 12 else ''})")

    def is_holiday(self, day: date) -> bool:
        if day in self.custom_dates:
            return True
        if self.country is None:
            return False
        return day in _country_holidays(self.country, self.subdivision, day.year)

    def holiday_name(self, day: date) -> str | None:
        if day in self.custom_dates:
            return f"custom date of calendar {self.name!r}"
        if self.country is None:
            return None
        name = _country_holidays(self.country, self.subdivision, day.year).get(day)
        return None if name is None else f"{name} ({self.country}{'-' + self.subdivision if self.subdivision else ''})"


@lru_cache(maxsize=256)
def _country_holidays(country: str, subdivision: str | None, year: int) -> dict[date, str]:
    import holidays

    try:
        table = holidays.country_holidays(country, subdiv=subdivision, years=year)
    except NotImplementedError:
        raise RecurrenceError(f"country: no holiday calendar for {country!r}") from None
    except (ValueError, KeyError) as exc:
        raise RecurrenceError(f"subdivision: {subdivision!r} is not a region of {country}: {exc}") from None
    return dict(table.items())


@dataclass(frozen=True)
class Recurrence:
    """``kind`` rrule (``FREQ=WEEKLY;BYDAY=MO;BYHOUR=9``...) or cron (``0 9 * * 1-5``), in ``tz``, from
    ``start`` (the rule's DTSTART: its first possible occurrence)."""

    kind: Kind
    expression: str
    tz: str
    start: datetime
    calendar: HolidayCalendar = field(default_factory=HolidayCalendar)

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", as_utc(self.start, "start"))
        zone_named(self.tz)
        if self.kind == "rrule":
            self._rule()
        elif self.kind == "cron":
            if not croniter.is_valid(self.expression):
                raise RecurrenceError(f"cron: {self.expression!r} is not a valid cron expression")
        else:
            raise RecurrenceError(f"kind: {self.kind!r} is neither rrule nor cron")

    @property
    def zone(self) -> ZoneInfo:
        return zone_named(self.tz)

    def _local_start(self) -> datetime:
        return self.start.astimezone(self.zone).replace(tzinfo=None, microsecond=0)

    def _rule(self) -> rrule:
        text = self.expression.strip()
        if text.upper().startswith("RRULE:"):
            text = text[6:]
        try:
            rule = rrulestr(text, dtstart=self._local_start(), forceset=False)
        except (ValueError, TypeError, KeyError) as exc:
            raise RecurrenceError(f"rrule: {self.expression!r} is not an RFC 5545 rule: {exc}") from None
        if not isinstance(rule, rrule):
            raise RecurrenceError(f"rrule: {self.expression!r}: give one RRULE")
        return rule

    def _local_after(self, local: datetime) -> Iterable[datetime]:
        """Local wall-clock occurrences strictly after ``local`` (naive)."""
        if self.kind == "rrule":
            yield from self._rule().xafter(local, count=MAX_SCAN, inc=False)
        else:
            try:
                it = croniter(self.expression, max(local, self._local_start() - timedelta(seconds=1)))
            except CroniterBadCronError as exc:
                raise RecurrenceError(f"cron: {self.expression!r}: {exc}") from None
            for _ in range(MAX_SCAN):
                yield it.get_next(datetime)

    def _instant(self, local: datetime) -> datetime:
        return _first_instant_at_wall_time(local.date(), local.time(), self.zone)

    def occurrences_after(self, after: datetime, *, skip_holidays: bool = True) -> Iterable[datetime]:
        """Instants (UTC) of the occurrences strictly after ``after``, holidays skipped."""
        after = as_utc(after, "after")
        local = after.astimezone(self.zone).replace(tzinfo=None)
        for occ in self._local_after(local):
            at = self._instant(occ)
            if at <= after:
                continue
            if skip_holidays and self.calendar.is_holiday(occ.date()):
                continue
            yield at

    def next_after(self, after: datetime) -> datetime | None:
        """The first non-holiday occurrence after ``after``; None when the rule has no more (or none within
        :data:`MAX_SCAN` occurrences)."""
        return next(iter(self.occurrences_after(after)), None)

    def first(self) -> datetime | None:
        return self.next_after(self.start - timedelta(seconds=1))

    def count_between(self, after: datetime, until: datetime) -> int:
        """Non-holiday occurrences in ``(after, until]`` (bounded by MAX_SCAN)."""
        n = 0
        for at in self.occurrences_after(after):
            if at > until:
                break
            n += 1
        return n

    def holiday_of(self, at: datetime) -> str | None:
        """The holiday that ``at`` falls on (in the schedule's zone), or None."""
        return self.calendar.holiday_name(as_utc(at).astimezone(self.zone).date())


def utc(at: datetime) -> datetime:
    return at.astimezone(UTC)
