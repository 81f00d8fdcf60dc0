"""Rule Engine rules: DNC, max attempts, calling window in the contact's own zone (DST-correct), min gap."""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, time, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pom_ha.domain.attempts import CompletionCode, ContactHistory
from pom_ha.domain.contacts import Contact
from pom_ha.domain.rules import CallingWindow, RuleSet, RuleVerdict

CC = CompletionCode
NEVER = ContactHistory()
RULES = RuleSet()  # 08:00-21:00 local, 3 attempts, no gap


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def contact(zone: str, phone: str = "+14155550100") -> Contact:
    return Contact.create("c1", phone, zone)


NEW_YORK, SYDNEY = contact("America/New_York"), contact("Australia/Sydney")


@pytest.mark.parametrize(
    ("who", "now", "retry_at"),
    [
        # New York, the day before clocks go forward: 08:00 EST is 13:00 UTC.
        (NEW_YORK, utc(2026, 3, 7, 12, 30), utc(2026, 3, 7, 13, 0)),
        (NEW_YORK, utc(2026, 3, 7, 13, 0), None),
        # 2026-03-08, clocks go forward at 02:00 local: 08:00 EDT is 12:00 UTC.
        (NEW_YORK, utc(2026, 3, 8, 12, 30), None),
        (NEW_YORK, utc(2026, 3, 8, 6, 0), utc(2026, 3, 8, 12, 0)),
        # 21:00 EST on the 7th: the window closed; it reopens at 08:00 EDT, only 10 hours later.
        (NEW_YORK, utc(2026, 3, 8, 1, 59), None),
        (NEW_YORK, utc(2026, 3, 8, 2, 0), utc(2026, 3, 8, 12, 0)),
        # The evening of the change closes at 21:00 EDT = 01:00 UTC.
        (NEW_YORK, utc(2026, 3, 9, 0, 59), None),
        (NEW_YORK, utc(2026, 3, 9, 1, 0), utc(2026, 3, 9, 12, 0)),
        # Sydney, 2026-04-05 clocks go back at 03:00 AEDT: 08:00 AEST on the 5th is 22:00 UTC on the 4th.
        (SYDNEY, utc(2026, 4, 4, 10, 30), utc(2026, 4, 4, 22, 0)),
        (SYDNEY, utc(2026, 4, 4, 21, 30), utc(2026, 4, 4, 22, 0)),  # 07:30 AEST (08:30 with a stale offset)
        (SYDNEY, utc(2026, 4, 3, 21, 0), None),  # 08:00 AEDT the day before
        # Sydney, 2026-10-04 clocks go forward: 08:00 AEDT is 21:00 UTC on the 3rd.
        (SYDNEY, utc(2026, 10, 3, 20, 59), utc(2026, 10, 3, 21, 0)),
    ],
)
def test_calling_window_in_the_contacts_zone_across_dst(who: Contact, now: datetime, retry_at: datetime | None) -> None:
    verdict = RULES.evaluate(who, NEVER, now)
    if retry_at is None:
        assert verdict == RuleVerdict(True, None, None, "allowed")
    else:
        assert (verdict.allowed, verdict.code, verdict.retry_at) == (False, CC.OUTSIDE_CALLING_WINDOW, retry_at)
        assert "outside calling window 08:00-21:00" in verdict.reason


def test_same_instant_different_zones() -> None:
    now = utc(2026, 3, 8, 14, 0)
    assert RULES.evaluate(contact("America/New_York"), NEVER, now).allowed  # 10:00
    assert RULES.evaluate(contact("Asia/Kolkata"), NEVER, now).allowed  # 19:30
    tokyo = RULES.evaluate(contact("Asia/Tokyo"), NEVER, now)  # 23:00
    assert tokyo.retry_at == utc(2026, 3, 8, 23, 0)
    assert tokyo.reason == (
        "outside calling window 08:00-21:00 Asia/Tokyo (local 23:00); retry at 2026-03-09T08:00:00+09:00"
    )


def test_window_opening_inside_a_dst_gap_opens_at_the_jump() -> None:
    window = CallingWindow(time(2, 30), time(21, 0))
    zone = zoneinfo.ZoneInfo("America/New_York")
    assert window.earliest_at_or_after(utc(2026, 3, 8, 6, 0), zone) == utc(2026, 3, 8, 7, 0)


def test_window_opening_inside_a_repeated_hour_uses_its_first_occurrence() -> None:
    window = CallingWindow(time(1, 30), time(21, 0))
    zone = zoneinfo.ZoneInfo("America/New_York")
    assert window.earliest_at_or_after(utc(2026, 11, 1, 4, 0), zone) == utc(2026, 11, 1, 5, 30)  # 01:30 EDT


def test_dnc_blocks_for_good_whatever_the_hour() -> None:
    rules = RuleSet(dnc={"+1 (415) 555-0100"})
    for now in (utc(2026, 6, 10, 16, 0), utc(2026, 6, 10, 4, 0)):
        verdict = rules.evaluate(NEW_YORK, NEVER, now)
        assert verdict == RuleVerdict(False, CC.DNC_BLOCKED, None, "+14*******00 is on a do-not-call list")
    assert rules.evaluate(contact("America/New_York", "+14155550199"), NEVER, utc(2026, 6, 10, 16, 0)).allowed


def test_bad_dnc_entry_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="do-not-call list: bad phone '555'"):
        RuleSet(dnc={"555"})


def test_max_attempts_is_final() -> None:
    rules = RuleSet(max_attempts=3)
    now = utc(2026, 6, 10, 16, 0)
    assert rules.evaluate(NEW_YORK, ContactHistory(2, now - timedelta(hours=3)), now).allowed
    verdict = rules.evaluate(NEW_YORK, ContactHistory(3, now - timedelta(hours=3)), now)
    assert verdict == RuleVerdict(False, CC.MAX_ATTEMPTS_REACHED, None, "3 attempts made, at most 3 allowed")


def test_min_gap_between_attempts() -> None:
    rules = RuleSet(min_gap_between_attempts=timedelta(hours=4))
    last = utc(2026, 6, 10, 14, 0)  # 10:00 EDT
    verdict = rules.evaluate(NEW_YORK, ContactHistory(1, last), utc(2026, 6, 10, 15, 0))
    assert (verdict.allowed, verdict.code, verdict.retry_at) == (False, None, utc(2026, 6, 10, 18, 0))
    assert verdict.reason.startswith("minimum gap 4:00:00 since the last attempt not over")
    assert rules.evaluate(NEW_YORK, ContactHistory(1, last), utc(2026, 6, 10, 18, 0)).allowed


def test_min_gap_ending_after_the_window_closes_waits_for_the_next_opening() -> None:
    rules = RuleSet(min_gap_between_attempts=timedelta(hours=4))
    verdict = rules.evaluate(NEW_YORK, ContactHistory(1, utc(2026, 6, 10, 23, 0)), utc(2026, 6, 10, 23, 30))
    assert (verdict.allowed, verdict.code, verdict.retry_at) == (False, None, utc(2026, 6, 11, 12, 0))
    assert "the gap ends outside calling window" in verdict.reason


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="now_utc must be timezone-aware"):
        RULES.evaluate(NEW_YORK, NEVER, datetime(2026, 6, 10, 12, 0))


def test_window_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="before its end"):
        CallingWindow(time(21), time(8))


ZONES = sorted(zoneinfo.available_timezones())


@settings(max_examples=400, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    now=st.datetimes(datetime(2025, 1, 1), datetime(2028, 1, 1), timezones=st.just(UTC)),
)
def test_any_zone_any_instant_verdict_matches_local_time(zone: str, now: datetime) -> None:
    who = contact(zone)
    local = now.astimezone(who.zone)
    verdict = RULES.evaluate(who, NEVER, now)
    assert verdict.allowed == (time(8) <= local.time() < time(21))
    if not verdict.allowed:
        assert verdict.retry_at is not None
        opening = verdict.retry_at.astimezone(who.zone)
        assert now < verdict.retry_at <= now + timedelta(hours=26)
        assert time(8) <= opening.time() < time(21)
        assert not (time(8) <= (verdict.retry_at - timedelta(seconds=1)).astimezone(who.zone).time() < time(21))
