"""Contact import: bad rows reported by line and reason, good rows kept, resumable at any cut point."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pom_ha.domain.contact_import import (
    START,
    ImportCheckpoint,
    ImportHeaderError,
    ImportResult,
    RowRejected,
    import_csv,
    import_rows,
    iter_csv_batches,
    iter_row_batches,
)
from pom_ha.domain.contacts import Contact

BAD_ROWS_CSV = (
    "ID,Phone,TimeZone,Segment\r\n"  # 1
    "c1,+1 415 555 0100,America/New_York,gold\r\n"  # 2
    "c2,12345,Europe/Paris,x\r\n"  # 3
    "c3,+33123456789,Mars/Olympus,\r\n"  # 4
    "\r\n"  # 5
    "c1,+14155550101,UTC,dup\r\n"  # 6
    'c4,+4915112345678,Europe/Berlin,"two\nlines"\r\n'  # 7-8
    "c5,+4915112345679\r\n"  # 9
    "c6,+4915112345670,UTC,a,b\r\n"  # 10
    ",,,\r\n"  # 11: blank in all fields, skipped
    ",+4915112345671,\r\n"  # 12
    "c7,+61 2 9999 0000,Australia/Sydney,\r\n"  # 13
)


def test_bad_rows_are_reported_with_line_and_reason_and_good_rows_kept() -> None:
    result = import_csv(BAD_ROWS_CSV)
    assert [c.id for c in result.contacts] == ["c1", "c4", "c7"]
    assert result.contacts[0] == Contact("c1", "+14155550100", "America/New_York", {"Segment": "gold"})
    assert result.contacts[1].custom == {"Segment": "two\nlines"}
    assert result.rejects == (
        RowRejected(3, "bad phone '12345': expected E.164 such as +14155550100", "c2"),
        RowRejected(4, "unknown time zone 'Mars/Olympus'", "c3"),
        RowRejected(6, "duplicate id 'c1'", "c1"),
        RowRejected(9, "missing field 'timezone'", "c5"),
        RowRejected(10, "too many fields: 5, header has 4", "c6"),
        RowRejected(12, "missing fields 'id', 'timezone'", None),
    )
    assert result.checkpoint == ImportCheckpoint(line_no=13, accepted=3, rejected=6)


def test_a_rejected_row_does_not_reserve_its_id() -> None:
    text = "id,phone,timezone\nc1,bad,UTC\nc1,+14155550100,UTC\n"
    result = import_csv(text)
    assert [c.id for c in result.contacts] == ["c1"]
    assert result.rejects[0].line_no == 2


def test_trailing_empty_cells_are_not_extra_fields() -> None:
    result = import_csv("id,phone,timezone\nc1,+14155550100,UTC,,\n")
    assert result.contacts == (Contact("c1", "+14155550100", "UTC", {}),)


def test_ids_already_in_the_list_are_duplicates() -> None:
    result = import_csv("id,phone,timezone\nc1,+14155550100,UTC\nc2,+14155550101,UTC\n", known_ids={"c1"})
    assert [c.id for c in result.contacts] == ["c2"]
    assert result.rejects == (RowRejected(2, "duplicate id 'c1'", "c1"),)


def test_header_is_case_insensitive_and_may_start_with_a_bom() -> None:
    result = import_csv("\ufeffTimeZone,PHONE,Id\nUTC,+14155550100,c1\n")
    assert result.contacts == (Contact("c1", "+14155550100", "UTC", {}),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty source"),
        ("id,phone\nc1,+14155550100\n", "missing required column(s): timezone"),
        ("id,Phone,phone,timezone\n", "names column 'phone' twice"),
    ],
)
def test_a_header_that_cannot_be_imported_is_refused(text: str, message: str) -> None:
    with pytest.raises(ImportHeaderError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_csv(text)


def test_csv_file_is_read_lazily_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "contacts.csv"
    path.write_text(BAD_ROWS_CSV, newline="")
    with path.open(newline="") as lines:
        from_file = import_csv(lines)
    assert from_file == import_csv(BAD_ROWS_CSV)


def test_batches_carry_cumulative_checkpoints() -> None:
    batches = list(iter_csv_batches(BAD_ROWS_CSV, batch_size=4))
    assert [len(b.contacts) + len(b.rejects) for b in batches] == [4, 4, 1]
    assert [b.checkpoint for b in batches] == [
        ImportCheckpoint(6, 1, 3),
        ImportCheckpoint(12, 2, 6),
        ImportCheckpoint(13, 3, 6),
    ]


def test_resuming_a_finished_import_imports_nothing() -> None:
    done = import_csv(BAD_ROWS_CSV)
    again = import_csv(BAD_ROWS_CSV, resume_from=done.checkpoint, known_ids={c.id for c in done.contacts})
    assert again == ImportResult((), (), done.checkpoint)


def test_table_rows_get_the_same_validation_with_row_numbers() -> None:
    rows: list[dict[str, str | None]] = [
        {"ID": "c1", "Phone": "+14155550100", "TimeZone": "Europe/London", "tier": "1"},
        {"ID": "c2", "Phone": "+14155550101", "TimeZone": "Mars/Olympus", "tier": "2"},
        {"ID": "c3", "Phone": None, "TimeZone": "UTC", "tier": None},
        {"ID": "c1", "Phone": "+14155550102", "TimeZone": "UTC", "tier": "3"},
    ]
    result = import_rows(rows)
    assert result.contacts == (Contact("c1", "+14155550100", "Europe/London", {"tier": "1"}),)
    assert result.rejects == (
        RowRejected(2, "unknown time zone 'Mars/Olympus'", "c2"),
        RowRejected(3, "missing field 'phone'", "c3"),
        RowRejected(4, "duplicate id 'c1'", "c1"),
    )
    assert result.checkpoint == ImportCheckpoint(4, 1, 3)


# --- resume after a takeover: any cut point, any number of takeovers ------------------------------

_row = st.tuples(
    st.sampled_from(["c1", "c2", "c3", "c4", "c5", "c6", "", "c 7"]),
    st.sampled_from(["+14155550100", "+33 1 23 45 67 89", "12345", ""]),
    st.sampled_from(["UTC", "America/New_York", "Mars/Olympus", ""]),
    st.sampled_from(["", "gold", "two\nlines", 'say "hi"', "a,b"]),
)
_rows = st.lists(st.one_of(_row, st.just(None)), max_size=25)  # None: a blank line


def _csv(rows: list[tuple[str, str, str, str] | None]) -> str:
    out = io.StringIO(newline="")
    out.write("id,phone,timezone,note\r\n")
    writer = csv.writer(out)
    for row in rows:
        if row is None:
            out.write("\r\n")
        else:
            writer.writerow(row)
    return out.getvalue()


def _run_with_takeovers(start_batches: object, cuts: list[int]) -> tuple[list[Contact], list[RowRejected]]:
    """Run an import that is cut off after ``cuts[i]`` batches each time, persisting batch + checkpoint."""
    assert callable(start_batches)
    stored: list[Contact] = []
    rejects: list[RowRejected] = []
    checkpoint = START
    for budget in [*cuts, 10_000]:
        batches: Iterator[ImportResult] = start_batches(checkpoint, {c.id for c in stored})
        for _, batch in zip(range(budget), batches, strict=False):
            stored.extend(batch.contacts)  # one transaction: contacts + checkpoint
            rejects.extend(batch.rejects)
            checkpoint = batch.checkpoint
    return stored, rejects


@settings(max_examples=200, deadline=None)
@given(rows=_rows, batch_size=st.integers(1, 4), cuts=st.lists(st.integers(0, 3), max_size=6))
def test_csv_import_cut_off_anywhere_imports_each_row_exactly_once(
    rows: list[tuple[str, str, str, str] | None], batch_size: int, cuts: list[int]
) -> None:
    text = _csv(rows)
    whole = import_csv(text)

    def start(checkpoint: ImportCheckpoint, known: set[str]) -> Iterator[ImportResult]:
        return iter_csv_batches(text, resume_from=checkpoint, known_ids=known, batch_size=batch_size)

    stored, rejects = _run_with_takeovers(start, cuts)
    assert stored == list(whole.contacts)
    assert rejects == list(whole.rejects)
    assert len({c.id for c in stored}) == len(stored)
    final = list(iter_csv_batches(text, resume_from=whole.checkpoint, known_ids={c.id for c in stored}))
    assert final == [ImportResult((), (), whole.checkpoint)]
    assert whole.checkpoint.accepted + whole.checkpoint.rejected == sum(1 for r in rows if r is not None and any(r))


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(_row, max_size=20), batch_size=st.integers(1, 4), cuts=st.lists(st.integers(0, 3), max_size=6))
def test_table_import_cut_off_anywhere_imports_each_row_exactly_once(
    rows: list[tuple[str, str, str, str]], batch_size: int, cuts: list[int]
) -> None:
    table = [{"id": i, "phone": p, "timezone": z, "note": n} for i, p, z, n in rows]
    whole = import_rows(table)

    def start(checkpoint: ImportCheckpoint, known: set[str]) -> Iterator[ImportResult]:
        return iter_row_batches(table, resume_from=checkpoint, known_ids=known, batch_size=batch_size)

    stored, rejects = _run_with_takeovers(start, cuts)
    assert stored == list(whole.contacts)
    assert rejects == list(whole.rejects)
    assert whole.checkpoint == ImportCheckpoint(len(rows), len(stored), len(rejects))
