"""Contact strategies: calling windows per day of week, per-region overrides, gaps, attempt caps, retry
treatments per outcome — validated (pydantic) and turned into what the Rule Engine evaluates.

A window is judged on the contact's local wall clock in its own time zone (``zoneinfo``, so it follows
daylight saving time). ``windows`` gives each day of the week its open intervals (a day absent is
closed); ``region_overrides`` replaces the whole week for contacts whose number belongs to a region (an
ISO country such as ``US``; a state rule ``US-CA`` applies to contacts that carry that region).
``treatments`` says how long to wait before a retry after busy, no answer or an answering machine.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pom_ha.domain.instants import as_utc
from pom_ha.domain.rules import _first_instant_at_wall_time

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
OUTCOME_CODES = {"busy": "BUSY", "no_answer": "NO_ANSWER", "answering_machine": "ANSWER_MACHINE"}
Outcome = Literal["busy", "no_answer", "answering_machine"]
END_OF_DAY = "24:00"


class InvalidSpec(ValueError):
    """A rejected specification; ``errors`` is a list of (field path, message) naming field and value."""

    def __init__(self, what: str, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__(f"invalid {what}: " + "; ".join(f"{f}: {m}" for f, m in errors))


def validation_errors(what: str, exc: ValidationError) -> InvalidSpec:
    errors = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(body)"
        msg = err["msg"].removeprefix("Value error, ")
        if "input" in err and not isinstance(err["input"], dict | list):
            msg += f" (got {err['input']!r})"
        errors.append((path, msg))
    return InvalidSpec(what, errors)


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True, allow_inf_nan=False)


def _wall(raw: str) -> time:
    if raw == END_OF_DAY:
        return time.max
    try:
        value = time.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"{raw!r} is not a HH:MM wall-clock time") from None
    if value.tzinfo is not None:
        raise ValueError(f"{raw!r}: a calling window time is local, without a zone")
    return value


class WindowSpec(_Spec):
    start: str = Field(examples=["08:00"])
    end: str = Field(examples=["21:00"], description="exclusive; 24:00 for the end of the day")

    @model_validator(mode="after")
    def _ordered(self) -> WindowSpec:
        start, end = _wall(self.start), _wall(self.end)
        if not start < end:
            raise ValueError(f"window start {self.start} must be before its end {self.end}")
        return self


Week = dict[Day, list[WindowSpec]]


def _check_week(week: Mapping[Any, list[WindowSpec]]) -> None:
    for day, spans in week.items():
        ordered = sorted(spans, key=lambda w: _wall(w.start))
        for a, b in itertools.pairwise(ordered):
            if _wall(b.start) < _wall(a.end):
                raise ValueError(f"{day}: windows {a.start}-{a.end} and {b.start}-{b.end} overlap")


class TreatmentSpec(_Spec):
    retry: bool = True
    delay_s: int = Field(3600, ge=0, le=30 * 86400)


def default_week(start: str = "08:00", end: str = "21:00") -> dict[Day, list[WindowSpec]]:
    return {d: [WindowSpec(start=start, end=end)] for d in DAYS}  # type: ignore[misc]


class StrategySpec(_Spec):
    """A contact strategy as the operator defines it (every field has a default: pim_config's rules)."""

    windows: Week = Field(default_factory=default_week)
    region_overrides: dict[Annotated[str, Field(pattern=r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$")], Week] = \
        Field(default_factory=dict)
    min_gap_s: int = Field(60, ge=0, le=30 * 86400)
    max_attempts_per_contact: int = Field(3, ge=1, le=100)
    max_attempts_per_number: int | None = Field(None, ge=1, le=1000)
    treatments: dict[Outcome, TreatmentSpec] = Field(default_factory=dict)

    @field_validator("windows")
    @classmethod
    def _week(cls, week: Week) -> Week:
        _check_week(week)
        return week

    @field_validator("region_overrides")
    @classmethod
    def _overrides(cls, overrides: dict[str, Week]) -> dict[str, Week]:
        for region, week in overrides.items():
            try:
                _check_week(week)
            except ValueError as exc:
                raise ValueError(f"{region}: {exc}") from None
        return overrides

    def retry_intervals_s(self) -> dict[str, int]:
        return {OUTCOME_CODES[o]: t.delay_s for o, t in self.treatments.items() if t.retry}

    def no_retry_codes(self) -> list[str]:
        return sorted(OUTCOME_CODES[o] for o, t in self.treatments.items() if not t.retry)


def validate_strategy(data: Mapping[str, Any]) -> StrategySpec:
    try:
        return StrategySpec.model_validate(dict(data))
    except ValidationError as exc:
        raise validation_errors("contact strategy", exc) from None


# ---- evaluation -------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WeeklyWindows:
    """Open local intervals per weekday (0 = Monday); quacks like :class:`pom_ha.domain.rules.CallingWindow`."""

    days: tuple[tuple[tuple[time, time], ...], ...]

    @classmethod
    def from_week(cls, week: Mapping[Any, list[WindowSpec]]) -> WeeklyWindows:
        days = []
        for name in DAYS:
            spans = sorted((_wall(w.start), _wall(w.end)) for w in week.get(name, []))
            days.append(tuple(spans))
        return cls(tuple(days))

    def __str__(self) -> str:
        parts = []
        for name, spans in zip(DAYS, self.days, strict=True):
            text = ",".join(f"{a:%H:%M}-{'24:00' if b == time.max else f'{b:%H:%M}'}" for a, b in spans)
            parts.append(f"{name} {text or 'closed'}")
        return "; ".join(parts)

    def _open_local(self, local: datetime) -> bool:
        t = local.time()
        return any(a <= t < b for a, b in self.days[local.weekday()])

    def contains(self, at: datetime, zone: ZoneInfo) -> bool:
        return self._open_local(as_utc(at).astimezone(zone))

    def earliest_at_or_after(self, at: datetime, zone: ZoneInfo) -> datetime:
        """The first instant not before ``at`` inside a window in ``zone`` (a never-open week: ``at`` + 1
        year, so the contact waits rather than being dialed)."""
        at = as_utc(at)
        if self.contains(at, zone):
            return at
        local = at.astimezone(zone)
        for offset in range(8):
            day: date = local.date() + timedelta(days=offset)
            for start, _end in self.days[day.weekday()]:
                if offset == 0 and start <= local.time():
                    continue
                candidate = _first_instant_at_wall_time(day, start, zone)
                if candidate >= at and self.contains(candidate, zone):
                    return candidate
        return at + timedelta(days=366)


def windows_of(spec: StrategySpec) -> tuple[WeeklyWindows, dict[str, WeeklyWindows]]:
    return WeeklyWindows.from_week(spec.windows), {r: WeeklyWindows.from_week(w)
                                                   for r, w in spec.region_overrides.items()}


def utc_now() -> datetime:
    return datetime.now(UTC)


def strategy_rules(spec: StrategySpec | None, base: Any, dnc_lists: tuple[Any, ...]) -> Any:
    """The :class:`pom_ha.domain.rules.RuleSet` a campaign's contacts are judged by: ``base`` (pim_config's
    rules and the legacy DNC table) with the campaign's strategy, and its DNC sets (global + attached)."""
    from dataclasses import replace

    if spec is None:
        return replace(base, dnc_lists=dnc_lists)
    default, regions = windows_of(spec)
    return replace(base, calling_window=default, region_windows=regions, max_attempts=spec.max_attempts_per_contact,
                   min_gap_between_attempts=timedelta(seconds=spec.min_gap_s), dnc_lists=dnc_lists,
                   max_attempts_per_number=spec.max_attempts_per_number)
