"""Rule Engine protocol: request validation, verdicts of bad contacts, VERDICT round trip, rule settings."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any

import pytest

from pom_ha.clients.rule_engine import Verdict, evaluate_body
from pom_ha.domain.attempts import CompletionCode, ContactHistory
from pom_ha.domain.contacts import Contact
from pom_ha.domain.rules import RuleSet, RuleVerdict
from services.rule_engine.protocol import (
    EvaluateRequest,
    PingRequest,
    ProtocolError,
    judge,
    parse_request,
    verdict_frame,
)
from services.rule_engine.rules_source import rules_from_rows

NOON_UTC = datetime(2024, 3, 5, 12, 0, tzinfo=UTC)


def _evaluate(**over: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "v": 1, "type": "EVALUATE", "req": 1, "job": "j1",
        "contact": {"id": "c1", "phone": "+14155550100", "timezone": "Europe/London"},
        "history": {"dialed_attempts": 0, "last_dial_at": None}, "now": "2024-03-05T12:00:00Z",
    }
    frame.update(over)
    return frame


def test_a_well_formed_evaluate_is_parsed() -> None:
    req = parse_request(_evaluate(history={"dialed_attempts": 2, "last_dial_at": "2024-03-05T11:00:00+01:00"}))
    assert isinstance(req, EvaluateRequest)
    assert (req.req, req.job, req.contact_id, req.timezone) == (1, "j1", "c1", "Europe/London")
    assert req.history == ContactHistory(2, datetime(2024, 3, 5, 10, 0, tzinfo=UTC))
    assert req.now == NOON_UTC
    assert parse_request({"v": 1, "type": "PING", "req": "p-1"}) == PingRequest("p-1")
    assert parse_request(_evaluate(now=None)).now is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (_evaluate(v=2), "protocol version"),
        ({k: v for k, v in _evaluate().items() if k != "v"}, "protocol version"),
        (_evaluate(type="DIAL"), "unknown request type"),
        (_evaluate(req=None), "req must be"),
        (_evaluate(req=True), "req must be"),
        (_evaluate(req=[1]), "req must be"),
        (_evaluate(job=7), "job must be a string"),
        (_evaluate(contact="c1"), "contact must be an object"),
        (_evaluate(contact={"id": "c1", "phone": 14155550100, "timezone": "UTC"}), "contact.phone"),
        (_evaluate(contact={"id": "c1", "phone": "+14155550100"}), "contact.timezone"),
        (_evaluate(history={"dialed_attempts": -1}), "non-negative integer"),
        (_evaluate(history={"dialed_attempts": "2"}), "non-negative integer"),
        (_evaluate(history={"dialed_attempts": 1, "last_dial_at": "yesterday"}), "history.last_dial_at"),
        (_evaluate(history={"dialed_attempts": 1, "last_dial_at": "2024-03-05T11:00:00"}), "timezone-aware"),
        (_evaluate(now=1709640000), "now must be an ISO 8601"),
        (_evaluate(now="2024-03-05T12:00:00"), "timezone-aware"),
    ],
)
def test_malformed_requests_are_refused_with_the_field(frame: dict[str, Any], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_request(frame)


def _judge(contact: dict[str, str], rules: RuleSet | None = None) -> RuleVerdict:
    req = parse_request(_evaluate(contact=contact))
    assert isinstance(req, EvaluateRequest)
    return judge(rules or RuleSet(), req, NOON_UTC)


def test_an_unknown_time_zone_is_a_refusal_not_an_error() -> None:
    v = _judge({"id": "c1", "phone": "+14155550100", "timezone": "Mars/Olympus_Mons"})
    assert (v.allowed, v.code, v.retry_at) == (False, None, None)
    assert "unknown time zone 'Mars/Olympus_Mons'" in v.reason


def test_a_bad_phone_is_refused_as_invalid_number() -> None:
    v = _judge({"id": "c1", "phone": "555-0100", "timezone": "UTC"})
    assert (v.allowed, v.code) == (False, CompletionCode.INVALID_NUMBER)
    assert "bad phone" in v.reason


def test_rules_apply_to_a_valid_contact() -> None:
    assert _judge({"id": "c1", "phone": "+1 415 555 0100", "timezone": "Europe/London"}).allowed
    dnc = RuleSet(dnc=frozenset({"+14155550100"}))
    v = _judge({"id": "c1", "phone": "+1 415 555 0100", "timezone": "Europe/London"}, dnc)
    assert v.code is CompletionCode.DNC_BLOCKED


def test_verdict_round_trips_through_its_frame() -> None:
    contact = Contact.create("c1", "+14155550100", "America/New_York")
    rule = RuleSet().evaluate(contact, ContactHistory(), NOON_UTC)  # 07:00 in New York
    req = parse_request(_evaluate())
    assert isinstance(req, EvaluateRequest)
    frame = verdict_frame(req, 42, rule)
    assert frame["type"] == "VERDICT" and frame["epoch"] == 42 and frame["code"] == "OUTSIDE_CALLING_WINDOW"
    assert frame["retry_at"] == "2024-03-05T13:00:00+00:00"
    back = Verdict.from_frame(frame)
    assert back == Verdict(1, 42, False, "OUTSIDE_CALLING_WINDOW", datetime(2024, 3, 5, 13, 0, tzinfo=UTC), rule.reason)
    assert back.completion_code is CompletionCode.OUTSIDE_CALLING_WINDOW
    allowed = Verdict.from_rule("r", 1, RuleVerdict(True, None, None, "allowed"))
    assert Verdict.from_frame(allowed.to_frame()) == allowed


@pytest.mark.parametrize(
    ("field", "value"), [("epoch", "7"), ("allowed", 1), ("code", 3), ("retry_at", 5), ("type", "PONG")]
)
def test_a_bad_verdict_frame_is_rejected(field: str, value: object) -> None:
    frame = Verdict(1, 7, True, None, None, "allowed").to_frame()
    frame[field] = value
    with pytest.raises(ValueError):
        Verdict.from_frame(frame)


def test_the_client_builds_a_request_the_server_accepts() -> None:
    contact = Contact.create("c9", "+33 1 23 45 67 89", "Europe/Paris")
    body = evaluate_body(contact, ContactHistory(1, NOON_UTC - timedelta(hours=1)), NOON_UTC, "job-7")
    req = parse_request({**body, "req": 5})
    assert isinstance(req, EvaluateRequest)
    assert (req.phone, req.job, req.history.dialed_attempts, req.now) == ("+33123456789", "job-7", 1, NOON_UTC)


def test_rule_settings_from_rows_and_their_problems() -> None:
    rules, problems = rules_from_rows(
        {"RuleEngineCallingWindowStart": "09:30", "RuleEngineCallingWindowEnd": "20:00",
         "RuleEngineMinGapBetweenAttemptsMs": "120000", "RuleEngineMaxAttempts": "5"},
        ["+14155550100", "0033 1 23 45 67 89"],
    )
    assert problems == []
    assert (rules.calling_window.start, rules.calling_window.end) == (time(9, 30), time(20, 0))
    assert rules.min_gap_between_attempts == timedelta(minutes=2) and rules.max_attempts == 5
    assert rules.dnc == {"+14155550100", "+33123456789"}
    bad, problems = rules_from_rows(
        {"RuleEngineCallingWindowStart": "22:00", "RuleEngineCallingWindowEnd": "21:00",
         "RuleEngineMaxAttempts": "zero", "RuleEngineMinGapBetweenAttemptsMs": "-5"},
        ["not a phone", "+14155550100"],
    )
    assert bad.calling_window == RuleSet().calling_window and bad.max_attempts == 3
    assert bad.min_gap_between_attempts == RuleSet().min_gap_between_attempts and bad.dnc == {"+14155550100"}
    assert len(problems) == 4, problems
