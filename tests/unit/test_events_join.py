"""The aggregator's join: DIALED + RESULT + database facts -> one enriched result per attempt."""

from __future__ import annotations

from datetime import UTC, datetime

from pom_ha.events.models import (
    AgentEvent,
    AttemptEvent,
    AttemptPhase,
    ContactData,
    EventKind,
    ProducerRef,
    derived_event_id,
)
from services.event_aggregator.daemon import orgs_of
from services.event_aggregator.join import AttemptJoiner, DialRow, InRecord, JobRow, Lookups

AGG = ProducerRef(service="event_aggregator", server="pom2", epoch=9)
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
T1 = datetime(2026, 1, 1, 12, 1, tzinfo=UTC)


def dialed(contact: str = "c1", n: int = 1, job: int = 4) -> AttemptEvent:
    return AttemptEvent(phase=AttemptPhase.DIALED, job_id=job, contact_id=contact, attempt_no=n, call_id="k1",
                        occurred_at=T0)


def result(contact: str = "c1", n: int = 1, job: int = 4, code: str = "ANSWER_HUMAN") -> AttemptEvent:
    return AttemptEvent(phase=AttemptPhase.RESULT, job_id=job, contact_id=contact, attempt_no=n, code=code,
                        duration_ms=42, occurred_at=T1)


def facts() -> Lookups:
    return Lookups(
        jobs={4: JobRow(4, campaign_id=2, list_id=3, zone="Zone1")},
        contacts={(3, "c1"): ContactData(list_id=3, phone="+33123456789", timezone="Europe/Paris", custom={"a": 1})},
    )


def rec(offset: int, value: bytes | None) -> InRecord:
    return InRecord("POM.Default.ATTEMPT", 0, offset, value)


def test_a_result_joins_its_dialed_event_the_job_and_the_contact() -> None:
    j = AttemptJoiner(AGG)
    d, r = dialed(), result()
    assert j.join([d], facts()).dialed == 1
    out = j.join([r], facts())
    (e,) = out.enriched
    assert (e.job_id, e.contact_id, e.attempt_no, e.attempt, e.code) == (4, "c1", 1, "4:c1:1", "ANSWER_HUMAN")
    assert e.dialed_at == T0 and e.completed_at == T1 and e.duration_ms == 42 and e.call_id == "k1"
    assert e.dialed_source == "event" and e.campaign_id == 2 and e.zone == "Zone1"
    assert e.contact is not None and e.contact.phone == "+33123456789" and e.contact.custom == {"a": 1}
    assert e.source_event_ids == [d.event_id, r.event_id] and e.producer == AGG
    assert e.event_id == derived_event_id(EventKind.ENRICHEDATTEMPTRESULT, "Default/4:c1:1")
    assert e.topic() == "POM.Default.ENRICHEDATTEMPTRESULT" and e.key() == "job:4"
    assert not j.pending


def test_without_the_dialed_event_the_attempts_row_is_used_then_nothing() -> None:
    j = AttemptJoiner(AGG)
    assert j.needs([result()]).dials == frozenset({(4, "c1", 1)})
    lk = facts()
    lk.dials[(4, "c1", 1)] = DialRow(T0, "db-call")
    (e,) = j.join([result()], lk).enriched
    assert e.dialed_source == "database" and e.dialed_at == T0 and e.call_id == "db-call"
    (e2,) = AttemptJoiner(AGG).join([result()], Lookups()).enriched
    assert e2.dialed_source == "none" and e2.contact is None and e2.zone is None


def test_needs_skips_attempts_whose_dialed_event_is_known() -> None:
    j = AttemptJoiner(AGG)
    j.join([dialed("c1")], Lookups())
    needs = j.needs([dialed("c2"), result("c1"), result("c2"), result("c3")])
    assert needs.dials == frozenset({(4, "c3", 1)})
    assert needs.job_ids == frozenset({4}) and needs.contacts == frozenset({(4, "c1"), (4, "c2"), (4, "c3")})


def test_the_same_result_twice_yields_one_output_and_the_same_id_after_a_replay() -> None:
    j = AttemptJoiner(AGG)
    out = j.join([dialed(), result(), result()], facts())
    assert len(out.enriched) == 1 and out.duplicates == 1
    replayed = AttemptJoiner(AGG).join([dialed(), result()], facts()).enriched[0]
    assert replayed.event_id == out.enriched[0].event_id


def test_a_dialed_event_after_its_result_is_not_kept_waiting() -> None:
    j = AttemptJoiner(AGG)
    j.join([result()], facts())
    j.join([dialed()], facts())
    assert not j.pending


def test_pending_dialed_events_are_bounded_oldest_first() -> None:
    j = AttemptJoiner(AGG, max_pending=2)
    j.join([dialed("a"), dialed("b"), dialed("c")], Lookups())
    assert list(j.pending) == [(4, "b", 1), (4, "c", 1)]


def test_bad_records_go_to_the_dead_letter_list_with_their_reason() -> None:
    good, dead = AttemptJoiner.parse([
        rec(1, dialed().to_json()),
        rec(2, b"{oops"),
        rec(3, AgentEvent(agent_id="a", zone="z", state="Ready").to_json()),
        rec(4, AttemptEvent(phase=AttemptPhase.RESULT, job_id=1, contact_id="c", attempt_no=1).to_json()),
        rec(5, None),
    ])
    assert [r.offset for r, _e in good] == [1]
    reasons = {d.record.offset: d.reason for d in dead}
    assert set(reasons) == {2, 3, 4, 5}
    assert "AGENT event" in reasons[3] and "completion code" in reasons[4] and "empty" in reasons[5]


def test_organizations_come_from_the_arguments_else_the_zones() -> None:
    assert orgs_of(["Default", "1", "Default"], []) == ("1", "Default")
    assert orgs_of(["Default"], ["7", "7"]) == ("7",)
    assert orgs_of([], []) == ("Default",)
