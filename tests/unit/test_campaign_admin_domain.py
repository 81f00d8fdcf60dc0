"""Pure parts of campaign administration: phone numbers (libphonenumber), contact strategies and their
weekly windows, recurrences with holiday calendars, imports with the phone policy — and a property test:
no contact is ever allowed outside the calling window of its own zone."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pom_ha.campaign.recurrence import HolidayCalendar, Recurrence, RecurrenceError
from pom_ha.campaign.service import DncNumbers, ListCreate, ScheduleCreate, parse
from pom_ha.domain.attempts import CompletionCode as CC
from pom_ha.domain.attempts import ContactHistory
from pom_ha.domain.contact_import import PhonePolicy, import_csv
from pom_ha.domain.contact_strategy import (
    DAYS,
    InvalidSpec,
    StrategySpec,
    WeeklyWindows,
    strategy_rules,
    validate_strategy,
)
from pom_ha.domain.contacts import Contact, ContactRejected
from pom_ha.domain.phones import _fast_e164, mask, parse_phone
from pom_ha.domain.rules import RuleSet


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


# ---- phone numbers --------------------------------------------------------------------------------------
def test_national_numbers_take_the_list_region_and_become_e164() -> None:
    assert parse_phone("(415) 555-0100", "US").e164 == "+14155550100"
    assert parse_phone("06 12 34 56 78", "FR").e164 == "+33612345678"
    assert parse_phone("0044 20 7946 0958").e164 == "+442079460958"
    assert parse_phone("+1 212 200 0001").e164 == "+12122000001"


@pytest.mark.parametrize(("raw", "region", "why"), [
    ("(415) 555-0100", None, "no default region"),
    ("+1555000", None, "impossible (too short)"),
    ("+15550000001", None, "not a valid number"),
    ("hello", "US", "bad phone"),
    ("+999123456789", None, "bad phone"),
])
def test_bad_numbers_are_refused_with_the_reason_and_masked(raw: str, region: str | None, why: str) -> None:
    with pytest.raises(ContactRejected) as exc:
        parse_phone(raw, region)
    assert why in str(exc.value)
    digits = "".join(c for c in raw if c.isdigit())
    if len(digits) > 6:
        assert digits not in str(exc.value).replace(" ", "")  # never the whole number


def test_zone_from_the_number_only_where_it_fixes_one() -> None:
    assert parse_phone("+33123456789", want_zone=True).zone == "Europe/Paris"
    assert parse_phone("+12122000001", want_zone=True).zone == "America/New_York"
    assert parse_phone("+18005550100", want_zone=True).zone is None  # toll free: no zone


def test_fast_path_never_accepts_what_libphonenumber_refuses() -> None:
    import random

    import phonenumbers

    rng = random.Random(19)
    codes = [1, 1, 1, 7, 33, 39, 44, 49, 55, 61, 81, 86, 91, 352, 358, 590, 971]
    accepted = 0
    for _ in range(4000):
        raw = f"+{rng.choice(codes)}{rng.randrange(10**5, 10**11)}"
        fast = _fast_e164(raw)
        if fast is None:
            continue
        accepted += 1
        number = phonenumbers.parse(raw, None)
        assert phonenumbers.is_valid_number(number), raw
        assert fast.region == phonenumbers.region_code_for_number(number), raw
    assert accepted > 50


def test_fast_path_agrees_with_libphonenumber_and_mask_hides_digits() -> None:
    assert _fast_e164("+12122000001") is not None and _fast_e164("+15550000001") is None
    assert _fast_e164("+390612345678") is None  # Italian leading zero: the general parser decides
    assert parse_phone("+390612345678").e164 == "+390612345678"
    assert mask("+14155550100") == "+14*******00"


# ---- strategies -----------------------------------------------------------------------------------------
def test_strategy_errors_name_the_field_and_value() -> None:
    with pytest.raises(InvalidSpec) as exc:
        validate_strategy({"windows": {"mon": [{"start": "25:00", "end": "21:00"}]}, "min_gap_s": -5})
    text = str(exc.value)
    assert "windows.mon.0" in text and "'25:00'" in text and "min_gap_s" in text and "-5" in text
    with pytest.raises(InvalidSpec, match="overlap"):
        validate_strategy({"windows": {"tue": [{"start": "08:00", "end": "12:00"},
                                               {"start": "11:00", "end": "13:00"}]}})
    with pytest.raises(InvalidSpec, match="funday"):
        validate_strategy({"windows": {"funday": []}})
    with pytest.raises(InvalidSpec, match=r"treatments\.voicemail"):
        validate_strategy({"treatments": {"voicemail": {"delay_s": 5}}})


def test_weekly_window_and_region_override() -> None:
    spec = validate_strategy({
        "windows": {"mon": [{"start": "09:00", "end": "12:00"}, {"start": "14:00", "end": "18:00"}]},
        "region_overrides": {"FR": {"sat": [{"start": "10:00", "end": "11:00"}]}},
        "treatments": {"busy": {"delay_s": 120}, "answering_machine": {"retry": False}},
    })
    rules = strategy_rules(spec, RuleSet(), ())
    ny = Contact.create("a", "+12122000001", "America/New_York")
    paris = Contact.create("b", "+33123456789", "Europe/Paris")
    monday_1pm_ny = utc(2026, 12, 7, 18, 0)  # Mon 13:00 in New York: the lunch gap
    verdict = rules.evaluate(ny, ContactHistory(), monday_1pm_ny)
    assert not verdict.allowed and verdict.code is CC.OUTSIDE_CALLING_WINDOW
    assert verdict.retry_at == utc(2026, 12, 7, 19, 0)  # 14:00 New York
    assert rules.evaluate(ny, ContactHistory(), utc(2026, 12, 7, 19, 30)).allowed
    # Paris (region FR) follows its override: only Saturday 10-11
    assert not rules.evaluate(paris, ContactHistory(), utc(2026, 12, 7, 9, 30)).allowed
    sat = rules.evaluate(paris, ContactHistory(), utc(2026, 12, 7, 9, 30)).retry_at
    assert sat == utc(2026, 12, 12, 9, 0)  # Saturday 10:00 Paris
    assert spec.retry_intervals_s() == {"BUSY": 120} and spec.no_retry_codes() == ["ANSWER_MACHINE"]


def test_max_attempts_per_number_and_dnc_lists() -> None:
    spec = validate_strategy({"max_attempts_per_number": 2, "windows": {d: [{"start": "00:00", "end": "24:00"}]
                                                                          for d in DAYS}})
    rules = strategy_rules(spec, RuleSet(), (frozenset({"+33123456789"}),))
    paris = Contact.create("b", "+33123456789", "Europe/Paris")
    ny = Contact.create("a", "+12122000001", "America/New_York")
    assert rules.evaluate(paris, ContactHistory(), utc(2026, 12, 7, 12)).code is CC.DNC_BLOCKED
    assert rules.evaluate(ny, ContactHistory(0, None, 1), utc(2026, 12, 7, 12)).allowed
    assert rules.evaluate(ny, ContactHistory(0, None, 2), utc(2026, 12, 7, 12)).code is CC.MAX_ATTEMPTS_REACHED


# ---- property: never outside the window of the contact's zone --------------------------------------------
ZONES = ["America/New_York", "America/Los_Angeles", "Europe/Paris", "Asia/Kolkata", "Australia/Lord_Howe",
         "Pacific/Chatham", "America/St_Johns", "Asia/Tokyo", "UTC", "Europe/London"]


@st.composite
def weeks(draw: st.DrawFn) -> dict[str, list[dict[str, str]]]:
    week: dict[str, list[dict[str, str]]] = {}
    for day in DAYS:
        if draw(st.booleans()):
            a = draw(st.integers(0, 23 * 60 - 1))
            b = draw(st.integers(a + 1, 24 * 60))
            week[day] = [{"start": f"{a // 60:02d}:{a % 60:02d}",
                          "end": "24:00" if b == 24 * 60 else f"{b // 60:02d}:{b % 60:02d}"}]
    return week


@settings(max_examples=300, deadline=None)
@given(week=weeks(), zone=st.sampled_from(ZONES), gap_s=st.integers(0, 86400),
       now=st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2028, 12, 31), timezones=st.just(UTC)),
       last_ago_s=st.one_of(st.none(), st.integers(0, 3 * 86400)))
def test_no_attempt_outside_the_window_of_the_contacts_zone(
    week: dict[str, list[dict[str, str]]], zone: str, gap_s: int, now: datetime, last_ago_s: int | None
) -> None:
    spec = validate_strategy({"windows": week, "min_gap_s": gap_s, "max_attempts_per_contact": 5})
    rules = strategy_rules(spec, RuleSet(), ())
    contact = Contact.create("p", "+12122000001", zone)
    history = ContactHistory(1, None if last_ago_s is None else now - timedelta(seconds=last_ago_s))
    verdict = rules.evaluate(contact, history, now)
    windows = WeeklyWindows.from_week(spec.windows)
    local = now.astimezone(ZoneInfo(zone))

    def inside(at: datetime) -> bool:
        loc = at.astimezone(ZoneInfo(zone))
        return any(a <= loc.time() < b for a, b in windows.days[loc.weekday()])

    if verdict.allowed:
        assert inside(now), (local, str(windows))
    else:
        assert verdict.retry_at is not None and verdict.retry_at > now
        if verdict.retry_at < now + timedelta(days=300):  # a week that is never open waits a year
            assert inside(verdict.retry_at), (verdict.retry_at.astimezone(ZoneInfo(zone)), str(windows))


# ---- recurrences and holidays ---------------------------------------------------------------------------
def test_rrule_keeps_local_time_across_dst_and_skips_holidays() -> None:
    cal = HolidayCalendar("us", "US", None, frozenset({date(2027, 3, 16)}))
    rec = Recurrence("rrule", "FREQ=DAILY;BYHOUR=9;BYMINUTE=0;BYSECOND=0", "America/New_York", utc(2027, 3, 12), cal)
    got = list(itertools.islice(rec.occurrences_after(utc(2027, 3, 12)), 4))
    # Mar 13 09:00 EST = 14:00Z; after the Mar 14 change 09:00 EDT = 13:00Z; Mar 16 is a custom holiday
    assert got == [utc(2027, 3, 12, 14), utc(2027, 3, 13, 14), utc(2027, 3, 14, 13), utc(2027, 3, 15, 13)]
    assert rec.next_after(utc(2027, 3, 15, 14)) == utc(2027, 3, 17, 13)
    xmas = Recurrence("cron", "0 9 * * *", "Europe/Paris", utc(2026, 12, 20), HolidayCalendar("fr", "FR"))
    assert xmas.next_after(utc(2026, 12, 24, 9)) == utc(2026, 12, 26, 8)  # not on Christmas Day
    assert xmas.holiday_of(utc(2026, 12, 25, 8)) == "Christmas Day (FR)"
    assert xmas.count_between(utc(2026, 12, 20), utc(2026, 12, 27)) == 6


@pytest.mark.parametrize(("kind", "expr", "tz", "field"), [
    ("rrule", "FREQ=SOMETIMES", "UTC", "rrule"),
    ("cron", "61 * * * *", "UTC", "cron"),
    ("cron", "0 9 * * *", "Mars/Olympus", "tz"),
])
def test_bad_recurrences_name_the_field_and_value(kind: str, expr: str, tz: str, field: str) -> None:
    with pytest.raises(RecurrenceError) as exc:
        Recurrence(kind, expr, tz, utc(2026, 12, 7))  # type: ignore[arg-type]
    assert str(exc.value).startswith(field) and (expr in str(exc.value) or tz in str(exc.value))


def test_calendar_and_request_models_refuse_bad_values() -> None:
    with pytest.raises(RecurrenceError, match="subdivision"):
        HolidayCalendar("x", "US", "ZZ")
    with pytest.raises(InvalidSpec, match="default_region"):
        parse(ListCreate, {"name": "l", "default_region": "XX"}, "list")
    with pytest.raises(InvalidSpec, match="kind"):
        parse(ScheduleCreate, {"name": "s", "campaign": "c", "kind": "weekly", "expression": "x", "tz": "UTC"}, "s")
    with pytest.raises(InvalidSpec, match="numbers"):
        parse(DncNumbers, {"numbers": []}, "dnc")
    assert StrategySpec().windows["sun"][0].start == "08:00"
    assert time(8) == WeeklyWindows.from_week(StrategySpec().windows).days[6][0][0]


# ---- imports with libphonenumber --------------------------------------------------------------------------
def test_import_rejects_invalid_numbers_by_row_and_derives_zones() -> None:
    text = ("id,phone,timezone\n"
            "a,(212) 200-0001,\n"            # national, region US, zone from the number
            "b,+15550000001,America/New_York\n"  # line 3: not a valid number
            "c,+18005550100,\n"              # line 4: toll free fixes no zone
            "d,+33123456789,Asia/Tokyo\n")   # a given zone wins
    result = import_csv(text, phones=PhonePolicy("US"))
    assert {c.id: (c.phone, c.timezone) for c in result.contacts} == {
        "a": ("+12122000001", "America/New_York"), "d": ("+33123456789", "Asia/Tokyo")}
    reasons = {r.line_no: r.reason for r in result.rejects}
    assert sorted(reasons) == [3, 4]
    assert "not a valid number" in reasons[3] and "no time zone" in reasons[4]
    no_tz_column = import_csv("id,phone\nx,+33123456789\n", phones=PhonePolicy())
    assert no_tz_column.contacts[0].timezone == "Europe/Paris"
