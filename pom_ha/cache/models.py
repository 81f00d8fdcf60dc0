"""Typed values of the operational caches, stored as compact JSON strings (any thin client can read them).

Every write is a whole value under a stable key (``put``), never an increment: a write that is retried
after a lost reply lands the same value again, so every client operation is idempotent.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Self

# cache names: the ``pom-*`` template of config/templates/ignite.xml makes each REPLICATED and FULL_SYNC
JOBS = "pom-jobs"
AGENTS = "pom-agents"
CALLBACKS = "pom-callbacks"
CONTACTS = "pom-contacts"
META = "pom-meta"
ALL_CACHES = (JOBS, AGENTS, CALLBACKS, CONTACTS, META)

#: META key: the generation written at the end of a rebuild; absent = the cache was lost and not rebuilt yet
GENERATION_KEY = "generation"
#: META key: who is rebuilding now (JSON {"owner", "at"}), so only one cache service rebuilds at a time
REBUILD_LOCK_KEY = "rebuild-lock"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


class _JsonValue:
    """A cache value as compact JSON: its dataclass fields, encoded whole (subclasses are slotted dataclasses)."""

    __slots__ = ()

    def encode(self) -> str:
        return _dumps(asdict(self))  # type: ignore[call-overload]

    @classmethod
    def decode(cls, raw: str) -> Self:
        return cls(**json.loads(raw))


@dataclass(frozen=True, slots=True)
class JobCounters:
    """A job's statistics as the monitor shows them (contacts by state, attempts, completion codes)."""

    contacts_total: int = 0
    contacts_pending: int = 0
    contacts_dialing: int = 0
    contacts_done: int = 0
    contacts_filtered_out: int = 0
    attempts_total: int = 0
    attempts_in_flight: int = 0
    attempts_completed: int = 0
    by_code: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobCounters:
        return cls(**{**d, "by_code": dict(d.get("by_code") or {})})


@dataclass(frozen=True, slots=True)
class JobEntry(_JsonValue):
    """A job in the cache: its state (display name of ``pom_ha.domain.jobs.JobState``) and statistics.

    ``counters`` is None while statistics are not loaded: a paused job after a rebuild (they come back
    when it resumes). ``refilter`` marks a paused job that must pass through Filter in Progress on resume.
    """

    job_id: int
    campaign_id: int
    zone: str
    state: str
    counters: JobCounters | None = None
    refilter: bool = False
    updated_at: float = 0.0  # unix seconds of the write
    source: str = "live"  # "live" (a daemon wrote it) or "rebuild" (loaded from PostgreSQL)

    @classmethod
    def decode(cls, raw: str) -> JobEntry:
        d = json.loads(raw)
        counters = d.get("counters")
        return cls(**{**d, "counters": JobCounters.from_dict(counters) if counters is not None else None})


@dataclass(frozen=True, slots=True)
class AgentEntry(_JsonValue):
    agent_id: str
    state: str  # e.g. Ready, Busy, Wrapup, Not Ready (guide Table 9 names)
    zone: str = "default"
    job_id: int | None = None
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Callback(_JsonValue):
    """A callback an agent set for a contact of a job, due at ``due_at`` (ISO 8601 with offset)."""

    callback_id: str
    job_id: int
    contact_id: str
    agent_id: str | None
    due_at: str
    note: str = ""


@dataclass(frozen=True, slots=True)
class ContactAdd(_JsonValue):
    """A contact added by web service to a list (and so to that list's running jobs)."""

    list_id: int
    contact_id: str
    phone: str
    timezone: str
    custom: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.list_id}:{self.contact_id}"
