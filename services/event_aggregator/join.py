"""The join, without I/O: a batch of ATTEMPT records in, the enriched results and dead letters out.

For each attempt ``(job_id, contact_id, attempt_no)``:

* a DIALED event is remembered (bounded, oldest dropped first) until its RESULT arrives;
* a RESULT event produces exactly one :class:`EnrichedAttemptResultEvent`, joined with the remembered
  DIALED event, or — when that was consumed before a takeover, or dropped — with the ``attempts`` row
  (the Campaign Manager writes it before the dial leaves, so it is the system of record for the dial),
  plus the job (campaign, zone) and the contact (phone, timezone, custom fields) from PostgreSQL;
* a record that does not parse as an event goes to the dead-letter list with its offset and reason.

The database part is asked for through :class:`Lookups` (what the batch needs, fetched in three queries),
so this module is tested without a database.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from pom_ha.events.models import (
    AttemptEvent,
    AttemptPhase,
    ContactData,
    EnrichedAttemptResultEvent,
    EventKind,
    MalformedEvent,
    ProducerRef,
    derived_event_id,
    parse_event,
)

AttemptId = tuple[int, str, int]  # (job_id, contact_id, attempt_no)
DialedSource = Literal["event", "database", "none"]


@dataclass(frozen=True)
class InRecord:
    """One consumed record, as the join needs it."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None


@dataclass(frozen=True)
class JobRow:
    job_id: int
    campaign_id: int
    list_id: int
    zone: str


@dataclass(frozen=True)
class DialRow:
    """The ``attempts`` row of an attempt (its dial time and call id)."""

    created_at: datetime
    call_id: str | None


@dataclass
class Lookups:
    """Database facts for one batch (filled by the daemon from :meth:`AttemptJoiner.needs`)."""

    jobs: dict[int, JobRow] = field(default_factory=dict)
    contacts: dict[tuple[int, str], ContactData] = field(default_factory=dict)  # (list_id, contact_id)
    dials: dict[AttemptId, DialRow] = field(default_factory=dict)


@dataclass(frozen=True)
class DeadLetter:
    record: InRecord
    reason: str


@dataclass(frozen=True)
class Needs:
    job_ids: frozenset[int]
    contacts: frozenset[tuple[int, str]]  # (job_id, contact_id)
    dials: frozenset[AttemptId]


@dataclass
class BatchOutcome:
    enriched: list[EnrichedAttemptResultEvent] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    dialed: int = 0  # DIALED events remembered
    duplicates: int = 0  # RESULTs of an attempt already emitted in this session


class AttemptJoiner:
    """Holds the DIALED events waiting for their RESULT (at most ``max_pending``) and the attempts already
    emitted in this session (at most ``max_emitted``: a RESULT published twice yields one output)."""

    def __init__(self, producer: ProducerRef, *, max_pending: int = 100_000, max_emitted: int = 100_000) -> None:
        self.producer = producer
        self.max_pending = max_pending
        self.max_emitted = max_emitted
        self.pending: OrderedDict[AttemptId, AttemptEvent] = OrderedDict()
        self.emitted: OrderedDict[AttemptId, None] = OrderedDict()

    @staticmethod
    def parse(records: Iterable[InRecord]) -> tuple[list[tuple[InRecord, AttemptEvent]], list[DeadLetter]]:
        good: list[tuple[InRecord, AttemptEvent]] = []
        dead: list[DeadLetter] = []
        for rec in records:
            try:
                event = parse_event(rec.value)
            except MalformedEvent as exc:
                dead.append(DeadLetter(rec, str(exc)))
                continue
            if not isinstance(event, AttemptEvent):
                dead.append(DeadLetter(rec, f"{event.kind.value} event on an ATTEMPT topic"))
                continue
            if event.phase is AttemptPhase.RESULT and event.code is None:
                dead.append(DeadLetter(rec, "RESULT event without a completion code"))
                continue
            good.append((rec, event))
        return good, dead

    def needs(self, events: Iterable[AttemptEvent]) -> Needs:
        """What the database must supply for these events' RESULTs."""
        events = list(events)
        dialed_here = {_aid(e) for e in events if e.phase is AttemptPhase.DIALED}
        results = [e for e in events if e.phase is AttemptPhase.RESULT]
        return Needs(
            job_ids=frozenset(e.job_id for e in results),
            contacts=frozenset((e.job_id, e.contact_id) for e in results),
            dials=frozenset(_aid(e) for e in results if _aid(e) not in self.pending and _aid(e) not in dialed_here),
        )

    def join(self, events: Iterable[AttemptEvent], lookups: Lookups) -> BatchOutcome:
        out = BatchOutcome()
        for event in events:
            aid = _aid(event)
            if event.phase is AttemptPhase.DIALED:
                if aid not in self.emitted:
                    self.pending[aid] = event
                    self.pending.move_to_end(aid)
                    out.dialed += 1
                    while len(self.pending) > self.max_pending:
                        self.pending.popitem(last=False)
                continue
            if aid in self.emitted:
                out.duplicates += 1
                continue
            out.enriched.append(enrich(event, self.pending.pop(aid, None), lookups, self.producer))
            self.emitted[aid] = None
            while len(self.emitted) > self.max_emitted:
                self.emitted.popitem(last=False)
        return out

    def reset(self) -> None:
        self.pending.clear()
        self.emitted.clear()


def _aid(event: AttemptEvent) -> AttemptId:
    return (event.job_id, event.contact_id, event.attempt_no)


def enrich(result: AttemptEvent, dialed: AttemptEvent | None, lookups: Lookups,
           producer: ProducerRef) -> EnrichedAttemptResultEvent:
    """One enriched result. Deterministic in its inputs (event id derived from the attempt), so a replay
    after a takeover yields the same event."""
    aid = _aid(result)
    key = result.attempt_key()
    job = lookups.jobs.get(result.job_id)
    contact = lookups.contacts.get((job.list_id, result.contact_id)) if job is not None else None
    dial_row = lookups.dials.get(aid)
    source: DialedSource
    if dialed is not None:
        dialed_at, call_id, source = dialed.occurred_at, dialed.call_id or result.call_id, "event"
    elif dial_row is not None:
        dialed_at, call_id, source = dial_row.created_at, dial_row.call_id or result.call_id, "database"
    else:
        dialed_at, call_id, source = None, result.call_id, "none"
    assert result.code is not None  # parse() dead-letters a RESULT without a code
    return EnrichedAttemptResultEvent(
        event_id=derived_event_id(EventKind.ENRICHEDATTEMPTRESULT, f"{result.org}/{key}"),
        org=result.org,
        occurred_at=result.occurred_at,
        producer=producer,
        job_id=result.job_id,
        contact_id=result.contact_id,
        attempt_no=result.attempt_no,
        attempt=key,
        code=result.code,
        call_id=call_id,
        dialed_at=dialed_at,
        completed_at=result.occurred_at,
        duration_ms=result.duration_ms,
        dialed_source=source,
        campaign_id=job.campaign_id if job is not None else None,
        zone=job.zone if job is not None else None,
        contact=contact,
        source_event_ids=[e.event_id for e in (dialed, result) if e is not None],
    )
