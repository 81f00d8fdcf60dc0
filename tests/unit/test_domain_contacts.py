"""Contacts: phones normalised to E.164 or refused, time zones checked against the IANA database."""

from __future__ import annotations

import pytest

from pom_ha.domain.contacts import Contact, ContactList, ContactRejected, DuplicateContact, normalize_phone


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+14155550100", "+14155550100"),
        ("+1 (415) 555-0100", "+14155550100"),
        ("0033 1 23 45 67 89", "+33123456789"),
        ("+44.20.7946.0958", "+442079460958"),
        ("+6834002", "+6834002"),
    ],
)
def test_phone_is_normalised_to_e164(raw: str, expected: str) -> None:
    assert normalize_phone(raw) == expected


@pytest.mark.parametrize("raw", ["4155550100", "+0123456789", "+1234", "+1234567890123456", "+1415abc0100", ""])
def test_phone_without_international_form_is_refused(raw: str) -> None:
    with pytest.raises(ContactRejected, match=r"bad phone .*expected E\.164"):
        normalize_phone(raw)


def test_contact_create_validates_and_keeps_custom_fields() -> None:
    contact = Contact.create(" c1 ", "+1 415 555 0100", "America/New_York", {"segment": "gold"})
    assert contact == Contact("c1", "+14155550100", "America/New_York", {"segment": "gold"})
    assert contact.zone.key == "America/New_York"


@pytest.mark.parametrize("zone", ["Mars/Olympus", "", "../etc/passwd", "/etc/localtime", "america/new_york"])
def test_unknown_time_zone_is_refused_with_its_name(zone: str) -> None:
    with pytest.raises(ContactRejected, match="unknown time zone"):
        Contact.create("c1", "+14155550100", zone)


def test_missing_id_is_refused() -> None:
    with pytest.raises(ContactRejected, match="missing field 'id'"):
        Contact.create("  ", "+14155550100", "UTC")


def test_contact_list_refuses_a_duplicate_id() -> None:
    contacts = ContactList("spring")
    contacts.add(Contact.create("c1", "+14155550100", "UTC"))
    with pytest.raises(DuplicateContact, match="duplicate id 'c1'"):
        contacts.add(Contact.create("c1", "+14155550101", "UTC"))
    assert len(contacts) == 1
    assert "c1" in contacts
    assert contacts.ids() == {"c1"}


def test_a_contact_cannot_be_built_invalid_by_bypassing_create() -> None:
    with pytest.raises(ContactRejected, match="not normalised"):
        Contact("c1", "+1 415 555 0100", "UTC")
    with pytest.raises(ContactRejected, match="unknown time zone"):
        Contact("c1", "+14155550100", "Mars/Olympus")
    with pytest.raises(ContactRejected, match="surrounding spaces"):
        Contact(" c1", "+14155550100", "UTC")
