"""When a schedule fires (pure): on time or late, and where a recurring schedule goes next.

A schedule whose time passed while no Common CD master was up fires ONCE when a master is back, late,
and says so; a recurring one then moves to its first occurrence after now, so the occurrences it missed
are collapsed into that one firing instead of being replayed one after another.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from pom_ha.domain.instants import as_utc

DEFAULT_LATE_TOLERANCE = timedelta(seconds=2)


@dataclass(frozen=True, slots=True)
class Firing:
    due_at: datetime
    now: datetime
    late_by: timedelta
    late: bool  # later than the tolerance: the schedule was missed (no master was up at its time)
    next_due: datetime | None  # recurring: the next occurrence (> now); one-shot: None
    missed_occurrences: int  # recurring: occurrences between due_at and now collapsed into this firing

    @property
    def late_ms(self) -> int:
        return round(self.late_by.total_seconds() * 1000)

    def describe(self, what: str) -> str:
        if not self.late:
            return f"{what} fired on time"
        text = f"{what} fired late by {self.late_by.total_seconds():.1f} s: no Common CD master was up at " \
               f"{self.due_at.isoformat()}; firing once now"
        if self.missed_occurrences:
            text += f" ({self.missed_occurrences} later occurrence(s) also missed, not replayed)"
        return text


def plan_firing(
    due_at: datetime, now: datetime, *, interval: timedelta | None = None,
    late_tolerance: timedelta = DEFAULT_LATE_TOLERANCE, master_since: datetime | None = None,
) -> Firing | None:
    """The firing of a schedule due at ``due_at`` seen at ``now``; ``None`` when it is not due yet.

    ``master_since``: when the current master's term began. A schedule that came due after that was not
    missed for want of a master (it only waited behind other work), so it is never reported late."""
    due_at, now = as_utc(due_at, "due_at"), as_utc(now, "now")
    missed_gap = master_since is None or due_at < as_utc(master_since, "master_since")
    if interval is not None and interval <= timedelta(0):
        raise ValueError("a recurring schedule needs a positive interval")
    if due_at > now:
        return None
    late_by = now - due_at
    next_due: datetime | None = None
    missed = 0
    if interval is not None:
        steps = late_by // interval + 1
        next_due = due_at + steps * interval
        missed = steps - 1
    return Firing(due_at, now, late_by, late_by > late_tolerance and missed_gap, next_due, missed)
