"""Phone numbers through Google's libphonenumber (the ``phonenumbers`` package): parse, validate, E.164.

A number with a ``+`` (or ``00``) prefix is read as international; a national number is read in the
contact list's default region (``US``: ``(415) 555-0100`` becomes ``+14155550100``) and refused when the
list has none. A number that is impossible (wrong length) or not valid (no such range is allocated) is
refused with the reason. :func:`zone_of` is the IANA time zone the number fixes, if it fixes exactly one
(a French number: ``Europe/Paris``; a US number: its area code's zone, none for a toll-free one).
Numbers never reach a log whole: :func:`mask` keeps the country code and the last two digits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumber, PhoneNumberFormat, PhoneNumberType
from phonenumbers import timezone as pn_timezone

from pom_ha.domain.contacts import ContactRejected

_UNKNOWN_ZONE = "Etc/Unknown"
_WHY = {
    phonenumbers.ValidationResult.INVALID_COUNTRY_CODE: "unknown country code",
    phonenumbers.ValidationResult.TOO_SHORT: "too short",
    phonenumbers.ValidationResult.TOO_LONG: "too long",
    phonenumbers.ValidationResult.INVALID_LENGTH: "impossible length",
}
_PARSE_WHY = {
    NumberParseException.INVALID_COUNTRY_CODE: "unknown country code",
    NumberParseException.NOT_A_NUMBER: "not a phone number",
    NumberParseException.TOO_SHORT_AFTER_IDD: "too short",
    NumberParseException.TOO_SHORT_NSN: "too short",
    NumberParseException.TOO_LONG: "too long",
}


@dataclass(frozen=True, slots=True)
class ParsedPhone:
    e164: str
    region: str | None  # ISO 3166 country of the number (None for non-geographic numbers)
    zone: str | None  # the single IANA zone the number fixes, else None


def valid_region(region: str) -> str:
    """``region`` upper-cased if libphonenumber knows it (``US``, ``FR``...); ``ValueError`` otherwise."""
    code = region.strip().upper()
    if code not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"unknown region {region!r}: expected an ISO 3166 country code such as US or FR")
    return code


_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
_CC = phonenumbers.COUNTRY_CODE_TO_REGION_CODE


_NANPA_AREA: dict[str, str] = {}  # area code -> region (in NANPA an area code belongs to one country)


def _region_of(number: PhoneNumber, national: str) -> str | None:
    if number.country_code != 1:
        return phonenumbers.region_code_for_number(number)
    area = national[:3]
    region = _NANPA_AREA.get(area)
    if region is None:
        region = phonenumbers.region_code_for_number(number)
        if region is not None and len(_NANPA_AREA) < 10_000:
            _NANPA_AREA[area] = region
    return region


def _fast_e164(text: str) -> ParsedPhone | None:
    """An input already in E.164 (most imports): validated without libphonenumber's general parser, which
    costs more than the validation itself. None: use the general path (also for every refusal's reason)."""
    if not _E164.fullmatch(text):
        return None
    digits = text[1:]
    for n in (1, 2, 3):
        cc = int(digits[:n])
        if cc in _CC:
            break
    else:
        return None
    national = digits[n:]
    if not national or national[0] == "0":  # Italian leading zero and the like: the general parser knows
        return None
    number = PhoneNumber(country_code=cc, national_number=int(national))
    regions = _CC[cc]
    region = regions[0] if len(regions) == 1 else _region_of(number, national)
    if region is None or not _valid_in(region, national):
        return None
    return ParsedPhone(text, region, None)


_TypeDesc = tuple[re.Pattern[str], frozenset[int]]


@lru_cache(maxsize=512)
def _descs(region: str) -> tuple[_TypeDesc, tuple[_TypeDesc, ...]] | None:
    """The region's general description and every number type's, compiled once (libphonenumber's
    ``is_valid_number_for_region`` looks each pattern up in a cache per call, which is most of its cost)."""
    md = phonenumbers.PhoneMetadata.metadata_for_region(region)
    if md is None or md.general_desc is None or md.general_desc.national_number_pattern is None:
        return None

    def desc(d: Any) -> _TypeDesc:
        return re.compile(d.national_number_pattern), frozenset(d.possible_length or ())

    types = (md.premium_rate, md.toll_free, md.mobile, md.fixed_line, md.shared_cost, md.voip, md.personal_number,
             md.pager, md.uan, md.voicemail)
    return desc(md.general_desc), tuple(desc(d) for d in types if d is not None and d.national_number_pattern)


def _valid_in(region: str, national: str) -> bool:
    """libphonenumber's validity (the number matches its region's general description and one number type,
    patterns and possible lengths), on precompiled patterns."""
    descs = _descs(region)
    if descs is None:
        return False

    def matches(d: _TypeDesc) -> bool:
        return (not d[1] or len(national) in d[1]) and d[0].fullmatch(national) is not None

    general, types = descs
    return matches(general) and any(matches(d) for d in types)


def parse_phone(raw: str, default_region: str | None = None, *, want_zone: bool = False) -> ParsedPhone:
    """``raw`` as E.164, validated; raise :class:`ContactRejected` with the reason (never the whole number)."""
    text = raw.strip()
    if not want_zone and (fast := _fast_e164(text)) is not None:
        return fast
    if not text:
        raise ContactRejected("missing phone number")
    if text.startswith("00"):
        text = "+" + text[2:]
    if not text.startswith("+") and default_region is None:
        raise ContactRejected(f"bad phone {mask(text)}: a national number and the list has no default region; "
                              "give it with + and the country code, or set the list's default region")
    try:
        number = phonenumbers.parse(text, default_region)
    except NumberParseException as exc:
        raise ContactRejected(f"bad phone {mask(text)}: {_PARSE_WHY.get(exc.error_type, 'not a phone number')}") \
            from None
    possible = phonenumbers.is_possible_number_with_reason(number)
    if possible not in (phonenumbers.ValidationResult.IS_POSSIBLE,
                        phonenumbers.ValidationResult.IS_POSSIBLE_LOCAL_ONLY):
        raise ContactRejected(f"bad phone {mask(text)}: impossible ({_WHY.get(possible, 'impossible number')})")
    if not phonenumbers.is_valid_number(number):
        raise ContactRejected(f"bad phone {mask(text)}: not a valid number (no such range in its country)")
    e164 = phonenumbers.format_number(number, PhoneNumberFormat.E164)
    region = phonenumbers.region_code_for_number(number)
    return ParsedPhone(e164, region, _zone(number) if want_zone else None)


def _zone(number: phonenumbers.PhoneNumber) -> str | None:
    if phonenumbers.number_type(number) in (PhoneNumberType.TOLL_FREE, PhoneNumberType.PREMIUM_RATE,
                                            PhoneNumberType.SHARED_COST, PhoneNumberType.UAN,
                                            PhoneNumberType.VOIP, PhoneNumberType.PERSONAL_NUMBER):
        return None
    zones = [z for z in pn_timezone.time_zones_for_number(number) if z != _UNKNOWN_ZONE]
    return zones[0] if len(zones) == 1 else None


@lru_cache(maxsize=65536)
def region_of(e164: str) -> str | None:
    """The ISO country of an E.164 number (for per-region calling windows); None if unknown."""
    try:
        return phonenumbers.region_code_for_number(phonenumbers.parse(e164, None)) or None
    except NumberParseException:
        return None


def mask(phone: str) -> str:
    """A number fit for a log line: ``+33******89`` (country prefix and the last two digits)."""
    text = "".join(ch for ch in phone if ch.isdigit() or ch == "+")
    if len(text) <= 4:
        return "*" * len(text)
    head = 3 if text.startswith("+") else 0
    return text[:head] + "*" * (len(text) - head - 2) + text[-2:]
