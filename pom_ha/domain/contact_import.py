"""Data import into a contact list, from CSV text or from database rows, resumable after a takeover.

The importer is a pure, streaming function: it reads the source lazily, validates each row, keeps the
good ones, reports each bad one with its line number and reason, and never aborts on a bad row. It
yields batches; each batch carries an ``ImportCheckpoint`` that the Zone Director persists in the same
transaction as the batch's contacts. A director that takes the import over passes that checkpoint back
(``resume_from``) together with the ids already stored (``known_ids``) and the import continues at the
next unprocessed line, so each source row is accepted or rejected exactly once across any number of
takeovers.

Line numbers are physical lines of the CSV source (the header is line 1; a row whose quoted field spans
lines is reported at its first line). For database rows they are 1-based row positions in the ordered
source. Either way the checkpoint's ``line_no`` is the last line fully processed.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Container, Iterable, Iterator, Mapping
from dataclasses import dataclass

from pom_ha.domain.contacts import Contact, ContactRejected
from pom_ha.domain.phones import parse_phone

REQUIRED_COLUMNS = ("id", "phone", "timezone")
DEFAULT_BATCH_SIZE = 1000


@dataclass(frozen=True, slots=True)
class PhonePolicy:
    """Numbers checked by libphonenumber (:mod:`pom_ha.domain.phones`): national numbers read in
    ``default_region``; a row without a time zone takes the one its number fixes (the ``timezone`` column
    may then be left out)."""

    default_region: str | None = None

    def required(self) -> tuple[str, ...]:
        return ("id", "phone")


class ImportHeaderError(ValueError):
    """The source as a whole cannot be imported (no header, or a required column is missing)."""


@dataclass(frozen=True, slots=True)
class ImportCheckpoint:
    """Progress of one import: lines up to ``line_no`` are done; counts are cumulative."""

    line_no: int = 0
    accepted: int = 0
    rejected: int = 0

    @property
    def next_line(self) -> int:
        return self.line_no + 1


START = ImportCheckpoint()


@dataclass(frozen=True, slots=True)
class RowRejected:
    line_no: int
    reason: str
    contact_id: str | None = None


@dataclass(frozen=True, slots=True)
class ImportResult:
    """Contacts accepted and rows rejected since the previous checkpoint, and the checkpoint after them."""

    contacts: tuple[Contact, ...]
    rejects: tuple[RowRejected, ...]
    checkpoint: ImportCheckpoint


@dataclass(frozen=True, slots=True)
class _EndOfSource:
    last_line: int


@dataclass(frozen=True, slots=True)
class _Record:
    first_line: int
    last_line: int
    values: Mapping[str, str]  # lower-cased required names + original custom names
    problem: str | None = None


def iter_csv_batches(
    source: str | Iterable[str],
    *,
    resume_from: ImportCheckpoint = START,
    known_ids: Container[str] = frozenset(),
    batch_size: int = DEFAULT_BATCH_SIZE,
    phones: PhonePolicy | None = None,
) -> Iterator[ImportResult]:
    """Import CSV text (or an iterable of lines, e.g. a file opened with ``newline=""``) in batches."""
    required = phones.required() if phones else REQUIRED_COLUMNS
    return _batches(_csv_records(source, resume_from, required), resume_from, known_ids, batch_size, phones)


def import_csv(
    source: str | Iterable[str],
    *,
    resume_from: ImportCheckpoint = START,
    known_ids: Container[str] = frozenset(),
    phones: PhonePolicy | None = None,
) -> ImportResult:
    """Import all of a CSV source at once; see ``iter_csv_batches``."""
    return _collect(iter_csv_batches(source, resume_from=resume_from, known_ids=known_ids, phones=phones),
                    resume_from)


def iter_row_batches(
    rows: Iterable[Mapping[str, str | None]],
    *,
    resume_from: ImportCheckpoint = START,
    known_ids: Container[str] = frozenset(),
    batch_size: int = DEFAULT_BATCH_SIZE,
    phones: PhonePolicy | None = None,
) -> Iterator[ImportResult]:
    """Import rows of a database table (column name -> value, ``None`` for NULL) in a stable order."""
    return _batches(_table_records(rows, resume_from), resume_from, known_ids, batch_size, phones)


def import_rows(
    rows: Iterable[Mapping[str, str | None]],
    *,
    resume_from: ImportCheckpoint = START,
    known_ids: Container[str] = frozenset(),
) -> ImportResult:
    """Import all rows of a database-table source at once; see ``iter_row_batches``."""
    return _collect(iter_row_batches(rows, resume_from=resume_from, known_ids=known_ids), resume_from)


def _collect(batches: Iterable[ImportResult], resume_from: ImportCheckpoint) -> ImportResult:
    contacts: list[Contact] = []
    rejects: list[RowRejected] = []
    checkpoint = resume_from
    for batch in batches:
        contacts.extend(batch.contacts)
        rejects.extend(batch.rejects)
        checkpoint = batch.checkpoint
    return ImportResult(tuple(contacts), tuple(rejects), checkpoint)


def _batches(
    records: Iterator[_Record | _EndOfSource],
    resume_from: ImportCheckpoint,
    known_ids: Container[str],
    batch_size: int,
    phones: PhonePolicy | None = None,
) -> Iterator[ImportResult]:
    """Validate records into batches, each ending with the checkpoint after its last record."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    accepted, rejected, line_no = resume_from.accepted, resume_from.rejected, resume_from.line_no
    seen: set[str] = set()
    contacts: list[Contact] = []
    rejects: list[RowRejected] = []
    for record in records:
        if isinstance(record, _EndOfSource):
            line_no = max(line_no, record.last_line)
            break
        line_no = record.last_line
        outcome = _validate(record, known_ids, seen, phones)
        if isinstance(outcome, Contact):
            seen.add(outcome.id)
            contacts.append(outcome)
            accepted += 1
        else:
            rejects.append(outcome)
            rejected += 1
        if len(contacts) + len(rejects) >= batch_size:
            yield ImportResult(tuple(contacts), tuple(rejects), ImportCheckpoint(line_no, accepted, rejected))
            contacts, rejects = [], []
    yield ImportResult(tuple(contacts), tuple(rejects), ImportCheckpoint(line_no, accepted, rejected))


def _validate(
    record: _Record, known_ids: Container[str], seen: set[str], phones: PhonePolicy | None = None
) -> Contact | RowRejected:
    raw_id = (record.values.get("id") or "").strip() or None
    if record.problem is not None:
        return RowRejected(record.first_line, record.problem, raw_id)
    if phones is not None:
        return _validate_phone(record, known_ids, seen, phones, raw_id)
    missing = [name for name in REQUIRED_COLUMNS if not (record.values.get(name) or "").strip()]
    if missing:
        names = ", ".join(repr(name) for name in missing)
        reason = f"missing field {names}" if len(missing) == 1 else f"missing fields {names}"
        return RowRejected(record.first_line, reason, raw_id)
    custom = {k: v for k, v in record.values.items() if k not in REQUIRED_COLUMNS}
    try:
        contact = Contact.create(record.values["id"], record.values["phone"], record.values["timezone"], custom)
    except ContactRejected as exc:
        return RowRejected(record.first_line, str(exc), raw_id)
    if contact.id in seen or contact.id in known_ids:
        return RowRejected(record.first_line, f"duplicate id {contact.id!r}", contact.id)
    return contact


def _validate_phone(
    record: _Record, known_ids: Container[str], seen: set[str], phones: PhonePolicy, raw_id: str | None
) -> Contact | RowRejected:
    missing = [name for name in phones.required() if not (record.values.get(name) or "").strip()]
    if missing:
        names = ", ".join(repr(name) for name in missing)
        reason = f"missing field {names}" if len(missing) == 1 else f"missing fields {names}"
        return RowRejected(record.first_line, reason, raw_id)
    custom = {k: v for k, v in record.values.items() if k not in REQUIRED_COLUMNS}
    zone = (record.values.get("timezone") or "").strip()
    try:
        parsed = parse_phone(record.values["phone"], phones.default_region, want_zone=not zone)
        if not zone:
            if parsed.zone is None:
                raise ContactRejected("no time zone: the number does not fix one; give it in the 'timezone' column")
            zone = parsed.zone
        contact = Contact.create(record.values["id"], parsed.e164, zone, custom)
    except ContactRejected as exc:
        return RowRejected(record.first_line, str(exc), raw_id)
    if contact.id in seen or contact.id in known_ids:
        return RowRejected(record.first_line, f"duplicate id {contact.id!r}", contact.id)
    return contact


def _column_keys(header: list[str], required: tuple[str, ...] = REQUIRED_COLUMNS) -> list[str | None]:
    """Map header cells to value keys: required columns lower-cased, others as written, blanks ignored."""
    keys: list[str | None] = []
    seen: set[str] = set()
    for cell in header:
        name = cell.strip()
        folded = name.lower()
        if not name:
            keys.append(None)
            continue
        if folded in seen:
            raise ImportHeaderError(f"header names column {name!r} twice")
        seen.add(folded)
        keys.append(folded if folded in REQUIRED_COLUMNS else name)
    missing = [name for name in required if name not in seen]
    if missing:
        raise ImportHeaderError(f"header is missing required column(s): {', '.join(missing)}")
    return keys


def _csv_records(
    source: str | Iterable[str], resume_from: ImportCheckpoint, required: tuple[str, ...] = REQUIRED_COLUMNS
) -> Iterator[_Record | _EndOfSource]:
    lines = iter(io.StringIO(source, newline="") if isinstance(source, str) else source)
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        raise ImportHeaderError("empty source: no header line")
    if header:
        header[0] = header[0].removeprefix("\ufeff")
    keys = _column_keys(header, required)
    # Lines up to the checkpoint always end at a row boundary, so they are skipped unparsed; the csv
    # reader never reads ahead, so pulling them from the shared iterator keeps it in step.
    skipped = 0
    for _ in range(max(0, resume_from.line_no - reader.line_num)):
        if next(lines, None) is None:
            break
        skipped += 1
    while True:
        first_line = reader.line_num + skipped + 1
        fields = next(reader, None)
        if fields is None:
            yield _EndOfSource(reader.line_num + skipped)
            return
        last_line = reader.line_num + skipped
        if not any(cell.strip() for cell in fields):
            continue
        values = {key: cell for key, cell in zip(keys, fields, strict=False) if key is not None}
        for key in keys[len(fields) :]:
            if key is not None:
                values[key] = ""
        # Trailing empty cells (a spreadsheet's stray commas) are not data; anything else past the header is.
        overflow = any(cell.strip() for cell in fields[len(keys) :])
        problem = f"too many fields: {len(fields)}, header has {len(keys)}" if overflow else None
        yield _Record(first_line, last_line, values, problem)


def _table_records(
    rows: Iterable[Mapping[str, str | None]], resume_from: ImportCheckpoint
) -> Iterator[_Record | _EndOfSource]:
    row_no = 0
    for row_no, row in enumerate(rows, start=1):
        if row_no <= resume_from.line_no:
            continue
        values: dict[str, str] = {}
        for name, value in row.items():
            folded = name.strip().lower()
            values[folded if folded in REQUIRED_COLUMNS else name.strip()] = "" if value is None else str(value)
        yield _Record(row_no, row_no, values)
    yield _EndOfSource(row_no)
