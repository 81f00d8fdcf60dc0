"""Event SDK payloads: one versioned pydantic model per topic kind, the envelope every event carries, and
the topic and key rules (``POM.<org>.<KIND>``; keyed by job or agent so one entity's events stay in order).

Wire format: UTF-8 JSON (the vendor's StringSerializer), one event per record; the record key is the
event's :meth:`PomEvent.key`; headers repeat ``event_type`` and ``schema_version`` for routing without
parsing. :func:`parse_event` turns a record value back into its model and raises :class:`MalformedEvent`
for anything that is not a known, valid event.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

DEFAULT_ORG = "Default"
SCHEMA_VERSION = 1
ORG_PATTERN = r"^[A-Za-z0-9_\-]{1,64}$"
_ORG_RE = re.compile(ORG_PATTERN)
#: namespace of the deterministic event ids of derived events (enriched results): same input, same id
DERIVED_EVENT_NS = uuid.UUID("6d0f1c52-5b7e-4f1e-9a38-3c1e0b9f7a21")


class EventKind(StrEnum):
    JOB = "JOB"
    JOBSTATISTICS = "JOBSTATISTICS"
    AGENT = "AGENT"
    AGENTSTATISTICS = "AGENTSTATISTICS"
    ATTEMPT = "ATTEMPT"
    ENRICHEDATTEMPTRESULT = "ENRICHEDATTEMPTRESULT"


class MalformedEvent(ValueError):
    """A record value that is not a valid event of a known type and schema version."""


def org_name(organization_id: str | int | None) -> str:
    """The ``<org>`` part of a topic: "Default" for the default organization (None, "" or "Default"),
    otherwise the organization id."""
    if organization_id is None or str(organization_id) in ("", DEFAULT_ORG):
        return DEFAULT_ORG
    org = str(organization_id)
    if not _ORG_RE.match(org):
        raise ValueError(f"organization id {org!r} cannot be part of a topic name")
    return org


def topic_name(kind: EventKind | str, org: str | int | None = DEFAULT_ORG) -> str:
    """``POM.<org>.<KIND>``, e.g. ``POM.Default.ATTEMPT`` or ``POM.1.ATTEMPT``."""
    return f"POM.{org_name(org)}.{EventKind(kind).value}"


def event_topics(org: str | int | None = DEFAULT_ORG) -> list[str]:
    """The six topics of one organization, in the guide's order."""
    return [topic_name(k, org) for k in EventKind]


def dead_letter_topic(topic: str) -> str:
    """Where a consumer moves records it cannot parse (``<topic>.DLT``)."""
    return f"{topic}.DLT"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProducerRef(_Strict):
    """Who published the event: service, POM server, instance and the epoch under which it acted (the
    lease epoch of a master, or the job's assignment epoch for a Campaign Manager). A consumer that sees a
    lower epoch than one already seen for the same service and entity may drop it (EpochGate)."""

    service: str = Field(min_length=1, max_length=64)
    server: str = Field(min_length=1, max_length=64)
    epoch: int = Field(ge=0)
    instance: str | None = Field(default=None, max_length=64)


def _now() -> datetime:
    return datetime.now(UTC)


def _new_id() -> uuid.UUID:
    return uuid.uuid4()


class PomEvent(_Strict):
    """The envelope. ``producer`` may be left out when the event is built; :class:`EventPublisher` stamps
    it before sending, so on the wire every event carries one."""

    kind: ClassVar[EventKind]
    event_id: uuid.UUID = Field(default_factory=_new_id)
    schema_version: int = SCHEMA_VERSION
    org: str = Field(default=DEFAULT_ORG, pattern=ORG_PATTERN)
    occurred_at: AwareDatetime = Field(default_factory=_now)
    producer: ProducerRef | None = None

    def topic(self) -> str:
        return topic_name(self.kind, self.org)

    def key(self) -> str:
        """The record key: events of one entity share it, so they land in one partition, in order."""
        raise NotImplementedError

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    def headers(self) -> list[tuple[str, str | bytes | None]]:
        return [("event_type", self.kind.value.encode()), ("schema_version", str(self.schema_version).encode())]


class JobEvent(PomEvent):
    """A job changed state (Queued, Filter in Progress, Running, Paused, Stopping, Completed, Stopped)."""

    kind: ClassVar[EventKind] = EventKind.JOB
    event_type: Literal["JOB"] = "JOB"
    job_id: int = Field(ge=1)
    campaign_id: int | None = None
    campaign_name: str | None = None
    zone: str | None = None
    state: str
    previous_state: str | None = None
    reason: str | None = None

    def key(self) -> str:
        return f"job:{self.job_id}"


class JobStatisticsEvent(PomEvent):
    """Periodic counters of one job."""

    kind: ClassVar[EventKind] = EventKind.JOBSTATISTICS
    event_type: Literal["JOBSTATISTICS"] = "JOBSTATISTICS"
    job_id: int = Field(ge=1)
    contacts_total: int = Field(ge=0)
    contacts_done: int = Field(ge=0)
    contacts_pending: int = Field(ge=0)
    attempts: int = Field(ge=0)
    attempts_in_flight: int = Field(ge=0)
    answered: int = Field(default=0, ge=0)
    nuisance: int = Field(default=0, ge=0)
    nuisance_rate: float = Field(default=0.0, ge=0.0, le=1.0)

    def key(self) -> str:
        return f"job:{self.job_id}"


class AgentEvent(PomEvent):
    """An agent changed state in a zone (logged in, ready, on call, wrap-up, POMNotAvailable, ...)."""

    kind: ClassVar[EventKind] = EventKind.AGENT
    event_type: Literal["AGENT"] = "AGENT"
    agent_id: str = Field(min_length=1, max_length=128)
    zone: str
    state: str
    previous_state: str | None = None
    job_id: int | None = None
    reason: str | None = None

    def key(self) -> str:
        return f"agent:{self.agent_id}"


class AgentStatisticsEvent(PomEvent):
    """One agent's time summary (milliseconds), including the time spent in HA failovers."""

    kind: ClassVar[EventKind] = EventKind.AGENTSTATISTICS
    event_type: Literal["AGENTSTATISTICS"] = "AGENTSTATISTICS"
    agent_id: str = Field(min_length=1, max_length=128)
    zone: str
    calls: int = Field(ge=0)
    talk_ms: int = Field(ge=0)
    wrapup_ms: int = Field(ge=0)
    idle_ms: int = Field(ge=0)
    total_ha_ms: int = Field(default=0, ge=0)

    def key(self) -> str:
        return f"agent:{self.agent_id}"


class AttemptPhase(StrEnum):
    DIALED = "DIALED"  # the dial command left (the attempts row exists, state 'dialing')
    RESULT = "RESULT"  # the attempt completed with a completion code


class AttemptEvent(PomEvent):
    """One dialing attempt: a DIALED event when the dial leaves, a RESULT event with its completion code.
    Both carry the attempt's identity ``(job_id, contact_id, attempt_no)``."""

    kind: ClassVar[EventKind] = EventKind.ATTEMPT
    event_type: Literal["ATTEMPT"] = "ATTEMPT"
    phase: AttemptPhase
    job_id: int = Field(ge=1)
    contact_id: str = Field(min_length=1, max_length=128)
    attempt_no: int = Field(ge=1)
    call_id: str | None = None
    code: str | None = None  # the completion code, RESULT only
    duration_ms: int | None = Field(default=None, ge=0)

    def key(self) -> str:
        return f"job:{self.job_id}"

    def attempt_key(self) -> str:
        return attempt_key(self.job_id, self.contact_id, self.attempt_no)


def attempt_key(job_id: int, contact_id: str, attempt_no: int) -> str:
    return f"{job_id}:{contact_id}:{attempt_no}"


class ContactData(_Strict):
    list_id: int
    phone: str
    timezone: str
    custom: dict[str, Any] = Field(default_factory=dict)


class EnrichedAttemptResultEvent(PomEvent):
    """One per attempt: its RESULT joined with its DIALED event (or the attempts row when the DIALED event
    was consumed before a takeover), the job and the contact data. ``event_id`` is derived from the attempt
    key, so a reader can also deduplicate on it."""

    kind: ClassVar[EventKind] = EventKind.ENRICHEDATTEMPTRESULT
    event_type: Literal["ENRICHEDATTEMPTRESULT"] = "ENRICHEDATTEMPTRESULT"
    job_id: int = Field(ge=1)
    contact_id: str
    attempt_no: int = Field(ge=1)
    attempt: str  # "<job>:<contact>:<attempt_no>"
    code: str
    call_id: str | None = None
    dialed_at: AwareDatetime | None = None
    completed_at: AwareDatetime
    duration_ms: int | None = None
    dialed_source: Literal["event", "database", "none"] = "none"
    campaign_id: int | None = None
    zone: str | None = None
    contact: ContactData | None = None
    source_event_ids: list[uuid.UUID] = Field(default_factory=list)

    def key(self) -> str:
        return f"job:{self.job_id}"


AnyEvent = Annotated[
    JobEvent | JobStatisticsEvent | AgentEvent | AgentStatisticsEvent | AttemptEvent | EnrichedAttemptResultEvent,
    Field(discriminator="event_type"),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyEvent)
MODELS: dict[EventKind, type[PomEvent]] = {
    m.kind: m for m in (JobEvent, JobStatisticsEvent, AgentEvent, AgentStatisticsEvent, AttemptEvent,
                        EnrichedAttemptResultEvent)
}

def parse_event(value: bytes | str | None) -> PomEvent:
    """A record value back into its model; MalformedEvent for bad JSON, unknown types, a schema version
    this code does not read, or invalid fields."""
    if value is None:
        raise MalformedEvent("empty record value")
    try:
        event: PomEvent = _ADAPTER.validate_json(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "value"
        raise MalformedEvent(f"{where}: {first.get('msg')}") from None
    if event.schema_version != SCHEMA_VERSION:
        raise MalformedEvent(f"schema_version {event.schema_version} not supported (this reader: {SCHEMA_VERSION})")
    return event


def derived_event_id(kind: EventKind, key: str) -> uuid.UUID:
    """The id of an event derived from ``key`` (an attempt key): stable across replays and takeovers."""
    return uuid.uuid5(DERIVED_EVENT_NS, f"{kind.value}/{key}")
