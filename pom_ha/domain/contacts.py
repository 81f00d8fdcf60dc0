"""Contacts and contact lists: what a dialable person is, and the checks that make one valid.

A contact has an id unique within its list, a phone number in E.164 form (``+`` then 7 to 15 digits,
country code first), the IANA time zone the calling window is judged in, and free-form custom fields.
Every check raises ``ContactRejected`` whose message is the reason shown to the operator, so an import
can report it per row without knowing which check failed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# Separators people type inside phone numbers; stripped before the digits are checked.
_PHONE_SEPARATORS = re.compile(r"[\s\-.()/]")
_E164_DIGITS = re.compile(r"[1-9][0-9]{6,14}")
MAX_CONTACT_ID_LENGTH = 128


class ContactRejected(ValueError):
    """A contact that cannot be accepted; ``str(exc)`` is the operator-facing reason."""


def normalize_phone(raw: str) -> str:
    """Return ``raw`` as ``+<digits>``; accept ``+`` or ``00`` as the international prefix.

    A number without an international prefix is refused rather than guessed: a national number given
    the wrong country code dials a stranger.
    """
    text = _PHONE_SEPARATORS.sub("", raw)
    if text.startswith("+"):
        digits = text[1:]
    elif text.startswith("00"):
        digits = text[2:]
    else:
        digits = ""
    if not _E164_DIGITS.fullmatch(digits):
        raise ContactRejected(f"bad phone {raw!r}: expected E.164 such as +14155550100")
    return "+" + digits


@lru_cache(maxsize=1024)
def time_zone(name: str) -> ZoneInfo:
    """Return the IANA zone called ``name``; raise ``ContactRejected`` for an unknown one."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ContactRejected(f"unknown time zone {name!r}") from None


def validate_contact_id(raw: str) -> str:
    contact_id = raw.strip()
    if not contact_id:
        raise ContactRejected("missing field 'id'")
    if len(contact_id) > MAX_CONTACT_ID_LENGTH:
        raise ContactRejected(f"id longer than {MAX_CONTACT_ID_LENGTH} characters")
    return contact_id


@dataclass(frozen=True, slots=True)
class Contact:
    """One dialable contact, always valid; ``Contact.create`` normalises raw input first."""

    id: str
    phone: str
    timezone: str
    custom: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if validate_contact_id(self.id) != self.id:
            raise ContactRejected(f"id {self.id!r} has surrounding spaces")
        if normalize_phone(self.phone) != self.phone:
            raise ContactRejected(f"phone {self.phone!r} is not normalised; use Contact.create")
        time_zone(self.timezone)

    @classmethod
    def create(cls, id: str, phone: str, timezone: str, custom: Mapping[str, str] | None = None) -> Contact:
        """Validate and normalise raw values; raise ``ContactRejected`` with the first reason found."""
        return cls(validate_contact_id(id), normalize_phone(phone), timezone.strip(), dict(custom or {}))

    @property
    def zone(self) -> ZoneInfo:
        return time_zone(self.timezone)


class DuplicateContact(ContactRejected):
    """A contact whose id is already in the list."""


class ContactList:
    """A named list of contacts keyed by id; ids are unique within the list."""

    def __init__(self, name: str, contacts: Mapping[str, Contact] | None = None) -> None:
        if not name.strip():
            raise ValueError("contact list name must not be empty")
        self.name = name.strip()
        self._contacts: dict[str, Contact] = dict(contacts or {})

    def add(self, contact: Contact) -> None:
        if contact.id in self._contacts:
            raise DuplicateContact(f"duplicate id {contact.id!r}")
        self._contacts[contact.id] = contact

    def get(self, contact_id: str) -> Contact | None:
        return self._contacts.get(contact_id)

    def ids(self) -> frozenset[str]:
        return frozenset(self._contacts)

    def __contains__(self, contact_id: object) -> bool:
        return contact_id in self._contacts

    def __len__(self) -> int:
        return len(self._contacts)

    def __iter__(self) -> Iterator[Contact]:
        return iter(self._contacts.values())
