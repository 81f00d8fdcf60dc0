"""What an instant is in the domain: a timezone-aware ``datetime``, normalised to UTC.

Naive datetimes are refused at the boundary of every domain call because a naive "now" silently means
the host's local time, which is exactly the bug the calling-window rule exists to prevent.
"""

from __future__ import annotations

from datetime import UTC, datetime


def as_utc(value: datetime, name: str = "time") -> datetime:
    """Return ``value`` converted to UTC; raise ``ValueError`` naming ``name`` if it is naive."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {value.isoformat()}")
    return value.astimezone(UTC)
