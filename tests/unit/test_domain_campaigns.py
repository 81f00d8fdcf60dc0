"""Campaign definitions: a valid one builds the runtime objects; an invalid one is refused naming each field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pom_ha.domain.campaigns import FieldError, InvalidCampaign, validate_campaign
from pom_ha.domain.pacing import TimeBasedPacer
from pom_ha.domain.strategy import FinishCriteria, RetryStrategy


def _definition(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "Spring renewals",
        "contact_list": "renewals-2026",
        "pacing": {"calls_per_second": 50},
        "custom_codes": [{"name": "SALE"}],
        "strategy": {"max_attempts": 4, "retry_intervals_s": {"BUSY": 300, "SALE": 0}},
        "finish": {"end_time": "2026-03-31T21:00:00+00:00", "code_goals": {"ANSWER_HUMAN": 500}},
        "schedule_start": "2026-03-09T08:00:00-05:00",
    }
    base.update(changes)
    return base


def test_valid_definition_builds_the_runtime_objects() -> None:
    campaign = validate_campaign(_definition())
    assert campaign.org == "Default"
    assert campaign.retry_strategy() == RetryStrategy(
        max_attempts=4,
        default_retry_interval=timedelta(hours=1),
        retry_intervals={"BUSY": timedelta(minutes=5), "SALE": timedelta(0)},
    )
    assert campaign.finish_criteria() == FinishCriteria(
        True, datetime(2026, 3, 31, 21, tzinfo=UTC), {"ANSWER_HUMAN": 500}
    )
    pacer = campaign.pacer()
    assert isinstance(pacer, TimeBasedPacer) and pacer.rate == 50
    assert [c.name for c in campaign.custom_completion_codes()] == ["SALE"]


def test_minimal_definition_uses_defaults() -> None:
    campaign = validate_campaign({"name": "demo", "contact_list": "demo", "pacing": {"calls_per_minute": 600}})
    assert campaign.retry_strategy() == RetryStrategy()
    assert campaign.finish_criteria() == FinishCriteria()
    assert campaign.schedule_start is None


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"name": ""}, "name", "String should match pattern"),
        ({"org": "Org One"}, "org", "String should match pattern"),
        ({"pacing": {}}, "pacing", "exactly one of calls_per_second and calls_per_minute"),
        ({"pacing": {"calls_per_second": -1}}, "pacing.calls_per_second", "greater than 0"),
        ({"pacing": {"kind": "predictive", "calls_per_second": 5}}, "pacing",
         "'predictive' pacing is driven by the free agents: remove calls_per_second"),
        ({"pacing": {"kind": "progressive", "abandon_cap": 0.03}}, "pacing",
         "abandon_cap only apply to predictive pacing, not 'progressive'"),
        ({"pacing": {"calls_per_second": 5, "max_ratio": 2}}, "pacing", "max_ratio only apply to predictive"),
        ({"pacing": {"kind": "predictive", "abandon_cap": 1.5}}, "pacing.abandon_cap", "less than 1"),
        ({"pacing": {"kind": "predictive", "abandon_cap": 0}}, "pacing.abandon_cap", "greater than 0"),
        ({"pacing": {"kind": "predictive", "max_ratio": 0.5}}, "pacing.max_ratio", "greater than or equal to 1"),
        ({"strategy": {"max_attempts": 0}}, "strategy.max_attempts", "greater than or equal to 1"),
        (
            {"strategy": {"retry_intervals_s": {"BUSYY": 60}}},
            "strategy",
            "unknown completion code(s) in retry_intervals_s: BUSYY",
        ),
        ({"strategy": {"retry_intervals_s": {"BUSY": -5}}}, "strategy.retry_intervals_s.BUSY", "greater than or equal"),
        ({"finish": {"all_contacts_done": False}}, "finish", "at least one finish criterion"),
        ({"finish": {"code_goals": {"ANSWER_HUMAN": 0}}}, "finish.code_goals.ANSWER_HUMAN", "greater than or equal"),
        ({"finish": {"end_time": "2026-03-09T12:00:00"}}, "finish.end_time", "timezone info"),
        ({"finish": {"end_time": "2026-03-09T12:00:00+00:00"}}, "finish", "is not after schedule_start"),
        ({"custom_codes": [{"name": "BUSY"}]}, "custom_codes.0", "is a system code"),
        ({"custom_codes": [{"name": "SALE"}, {"name": "SALE"}]}, "custom_codes", "defined twice: SALE"),
        ({"colour": "red"}, "colour", "Extra inputs are not permitted"),
    ],
)
def test_invalid_definition_names_the_field(changes: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(InvalidCampaign) as info:
        validate_campaign(_definition(**changes))
    errors = info.value.errors
    assert any(e.field == field and message in e.message for e in errors), errors
    assert f"  {field}: " in str(info.value)


def test_every_bad_field_is_reported_at_once() -> None:
    with pytest.raises(InvalidCampaign) as info:
        validate_campaign({"name": "x", "pacing": {"calls_per_second": 0}})
    assert [e.field for e in info.value.errors] == ["contact_list", "pacing.calls_per_second"]
    assert info.value.errors[0] == FieldError("contact_list", "Field required")
