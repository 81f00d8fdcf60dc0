"""Event models, topic names and the wire format."""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pom_ha.events.models import (
    AgentEvent,
    AgentStatisticsEvent,
    AttemptEvent,
    AttemptPhase,
    EnrichedAttemptResultEvent,
    EventKind,
    JobEvent,
    JobStatisticsEvent,
    MalformedEvent,
    ProducerRef,
    dead_letter_topic,
    derived_event_id,
    event_topics,
    org_name,
    parse_event,
    topic_name,
)
from pom_ha.events.topics import org_topics, topic_specs

PRODUCER = ProducerRef(service="campaign_manager", server="pom1", epoch=3, instance="abc")


def test_topic_names_follow_the_guide() -> None:
    assert event_topics() == ["POM.Default.JOB", "POM.Default.JOBSTATISTICS", "POM.Default.AGENT",
                              "POM.Default.AGENTSTATISTICS", "POM.Default.ATTEMPT", "POM.Default.ENRICHEDATTEMPTRESULT"]
    assert topic_name(EventKind.ATTEMPT, 1) == "POM.1.ATTEMPT"
    assert topic_name("JOB", None) == "POM.Default.JOB"
    assert org_name("") == org_name(None) == org_name("Default") == "Default"
    assert dead_letter_topic("POM.1.ATTEMPT") == "POM.1.ATTEMPT.DLT"
    assert org_topics("7")[-1] == "POM.7.ATTEMPT.DLT" and len(org_topics("7", with_dead_letter=False)) == 6


@pytest.mark.parametrize("bad", ["a.b", "x y", "é", "a" * 65])
def test_an_organization_id_that_cannot_be_a_topic_part_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        topic_name(EventKind.JOB, bad)


def test_topic_specs_have_replication_3_and_min_isr_2() -> None:
    (spec,) = topic_specs(["POM.Default.JOB"])
    assert spec.replication_factor == 3 and spec.num_partitions == 1
    assert spec.config == {"min.insync.replicas": "2"}
    with pytest.raises(ValueError):
        topic_specs(["t"], replication=1, min_isr=2)


ALL_EVENTS = [
    JobEvent(job_id=4, campaign_id=1, zone="Zone1", state="Running", previous_state="Filter in Progress"),
    JobStatisticsEvent(job_id=4, contacts_total=10, contacts_done=2, contacts_pending=8, attempts=3,
                       attempts_in_flight=1, nuisance_rate=0.01),
    AgentEvent(agent_id="a1", zone="Zone1", state="Wrapup"),
    AgentStatisticsEvent(agent_id="a1", zone="Zone1", calls=2, talk_ms=1, wrapup_ms=2, idle_ms=3, total_ha_ms=4),
    AttemptEvent(phase=AttemptPhase.RESULT, job_id=4, contact_id="c1", attempt_no=2, code="BUSY", duration_ms=5),
    EnrichedAttemptResultEvent(job_id=4, contact_id="c1", attempt_no=2, attempt="4:c1:2", code="BUSY",
                               completed_at="2026-01-01T00:00:00Z"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("event", ALL_EVENTS, ids=lambda e: e.kind.value)
def test_every_event_round_trips_and_carries_the_envelope(event: JobEvent) -> None:
    stamped = event.model_copy(update={"producer": PRODUCER, "org": "1"})
    wire = json.loads(stamped.to_json())
    for field in ("event_id", "event_type", "schema_version", "org", "occurred_at", "producer"):
        assert field in wire
    assert wire["event_type"] == event.kind.value and wire["schema_version"] == 1
    assert wire["producer"] == {"service": "campaign_manager", "server": "pom1", "epoch": 3, "instance": "abc"}
    back = parse_event(stamped.to_json())
    assert back == stamped and type(back) is type(event)
    assert stamped.topic() == f"POM.1.{event.kind.value}"
    assert dict(stamped.headers()) == {"event_type": event.kind.value.encode(), "schema_version": b"1"}


def test_keys_keep_one_entity_in_one_partition() -> None:
    assert {e.key() for e in ALL_EVENTS if not isinstance(e, AgentEvent | AgentStatisticsEvent)} == {"job:4"}
    assert ALL_EVENTS[2].key() == ALL_EVENTS[3].key() == "agent:a1"


def test_event_ids_are_unique_and_derived_ids_are_stable() -> None:
    ids = {JobEvent(job_id=1, state="Queued").event_id for _ in range(100)}
    assert len(ids) == 100
    a = derived_event_id(EventKind.ENRICHEDATTEMPTRESULT, "Default/1:c:1")
    assert a == derived_event_id(EventKind.ENRICHEDATTEMPTRESULT, "Default/1:c:1")
    assert a != derived_event_id(EventKind.ENRICHEDATTEMPTRESULT, "Default/1:c:2")


@pytest.mark.parametrize("value,reason", [
    (None, "empty"),
    (b"{not json", "Invalid JSON"),
    (b'{"event_type": "NOPE"}', "event_type"),
    (b'{"event_type": "JOB", "job_id": 0, "state": "Running"}', "job_id"),
    (b'{"event_type": "JOB", "job_id": 1, "state": "Running", "surprise": 1}', "surprise"),
])
def test_malformed_values_are_refused_with_a_reason(value: bytes | None, reason: str) -> None:
    with pytest.raises(MalformedEvent, match=reason):
        parse_event(value)


def test_an_unknown_schema_version_is_refused() -> None:
    wire = json.loads(JobEvent(job_id=1, state="Queued").to_json())
    wire["schema_version"] = 2
    with pytest.raises(MalformedEvent, match="schema_version 2"):
        parse_event(json.dumps(wire))


def test_timestamps_must_carry_a_timezone() -> None:
    wire = json.loads(JobEvent(job_id=1, state="Queued").to_json())
    wire["occurred_at"] = "2026-01-01T00:00:00"
    with pytest.raises(MalformedEvent, match="occurred_at"):
        parse_event(json.dumps(wire))


@given(st.binary(max_size=200))
def test_parse_never_raises_anything_but_malformed(value: bytes) -> None:
    try:
        parse_event(value)
    except MalformedEvent:
        pass


def test_event_id_is_a_uuid_on_the_wire() -> None:
    wire = json.loads(AgentEvent(agent_id="a", zone="z", state="Ready").to_json())
    assert uuid.UUID(wire["event_id"])
