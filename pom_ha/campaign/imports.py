"""The import runner: one queued or interrupted data import, batch by batch, under the master's fence.

Each batch — its good contacts, its rejected lines (line number and reason) and the new checkpoint in
``data_imports`` — is committed in ONE fenced transaction (:func:`fenced_transaction`). A master that
takes over reads the checkpoint and the list's ids and continues at the next unprocessed line, so every
source line is accepted or rejected exactly once whatever fails in between. A bad row never aborts the
import; a source that cannot be read at all (missing file, no header, missing column) fails the import
with the reason.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import asyncpg
import structlog

from pom_ha.campaign.fenced_tx import fenced_transaction
from pom_ha.domain.contact_import import (
    ImportCheckpoint,
    ImportHeaderError,
    ImportResult,
    PhonePolicy,
    iter_csv_batches,
    iter_row_batches,
)
from pom_ha.ha.fencing import LeaseFence

log = structlog.get_logger("pom_ha.campaign.imports")


@dataclass(frozen=True)
class ImportOutcome:
    import_id: int
    state: str  # completed | failed
    imported: int
    rejected: int
    resumed_from_line: int
    error: str | None = None


class SourceError(Exception):
    """The import's source cannot be read (as opposed to a database error, which is retried)."""


async def _open_csv(path: str) -> TextIO:
    try:
        return await asyncio.to_thread(open, path, newline="", encoding="utf-8")
    except OSError as exc:
        raise SourceError(f"cannot open {path}: {exc.strerror or exc}") from exc


def _next_batch(batches: Iterator[ImportResult]) -> ImportResult | None:
    try:
        return next(batches, None)
    except ImportHeaderError as exc:
        raise SourceError(str(exc)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read the source: {type(exc).__name__}: {exc}") from exc


async def _table_rows(conn: Any, table: str) -> list[dict[str, str | None]]:
    ident = await conn.fetchval("SELECT to_regclass($1)::text", table)
    if ident is None:
        raise SourceError(f"table {table!r} no longer exists")
    # a stable order, so a resumed import skips exactly the rows already processed (ident is the quoted
    # name to_regclass returned, not operator text)
    rows = await conn.fetch(f'SELECT * FROM {ident} ORDER BY "id"::text COLLATE "C"')
    return [{k: (None if v is None else str(v)) for k, v in r.items()} for r in rows]


async def run_import(
    pool: Any, fence: LeaseFence, import_id: int, *, batch_size: int = 1000, timeout_s: float = 30.0
) -> ImportOutcome | None:
    """Run (or resume) import ``import_id`` to its end; ``None`` if it is not queued or running.
    Raises :class:`pom_ha.campaign.fenced_tx.FenceLost` when the fence is lost mid-way (nothing of the
    refused batch was written)."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT i.list_id, i.source_kind, i.source, i.state, i.checkpoint, i.imported, i.rejected, i.last_epoch,"
            " l.default_region FROM data_imports i JOIN contact_lists l ON l.id = i.list_id WHERE i.id = $1", import_id,
        )
        if row is None or row["state"] not in ("queued", "running"):
            return None
        checkpoint = ImportCheckpoint(int(row["checkpoint"]), int(row["imported"]), int(row["rejected"]))
        ilog = log.bind(import_id=import_id, epoch=fence.epoch)
        if row["state"] == "running":
            ilog.info("resuming data import", from_line=checkpoint.next_line, previous_epoch=row["last_epoch"],
                      imported=checkpoint.accepted, rejected=checkpoint.rejected)
        async with fenced_transaction(conn, fence, timeout_s=timeout_s):
            await conn.execute(
                "UPDATE data_imports SET state = 'running', started_at = coalesce(started_at, now()),"
                " resumed = resumed + CASE WHEN state = 'running' AND last_epoch IS DISTINCT FROM $2 THEN 1 ELSE 0 END,"
                " last_epoch = $2 WHERE id = $1", import_id, fence.epoch,
            )
        known = {r["contact_id"] for r in await conn.fetch(
            "SELECT contact_id FROM contacts WHERE list_id = $1", row["list_id"])}
        handle: TextIO | None = None
        last = checkpoint
        phones = PhonePolicy(row["default_region"])  # libphonenumber: E.164, list's region, zone from number
        try:
            # Only errors of the SOURCE fail the import (file, encoding, header, a clashing id); database
            # errors propagate, and the next attempt resumes from the committed checkpoint.
            batches: Iterator[ImportResult]
            if row["source_kind"] == "csv":
                handle = await _open_csv(row["source"])
                batches = iter_csv_batches(handle, resume_from=checkpoint, known_ids=known, batch_size=batch_size,
                                           phones=phones)
            else:
                rows = await _table_rows(conn, row["source"])
                batches = iter_row_batches(rows, resume_from=checkpoint, known_ids=known, batch_size=batch_size,
                                           phones=phones)
            # parsing and validating a batch (libphonenumber) is CPU work: off the event loop, so the lease
            # renewals and heartbeats of this master keep their pace on a loaded machine
            while (batch := await asyncio.to_thread(_next_batch, batches)) is not None:
                await _commit_batch(conn, fence, import_id, row["list_id"], batch, timeout_s)
                last = batch.checkpoint
                await asyncio.sleep(0)  # let renewals and heartbeats run between batches
        except (SourceError, asyncpg.UniqueViolationError) as exc:
            reason = (str(exc) if isinstance(exc, SourceError)
                      else "a contact id of this batch was added to the list by someone else meanwhile")
            await _finish(conn, fence, import_id, "failed", reason, timeout_s)
            ilog.warning("data import failed", reason=reason, at_line=last.next_line)
            return ImportOutcome(import_id, "failed", last.accepted, last.rejected, checkpoint.next_line, reason)
        finally:
            if handle is not None:
                handle.close()
        await _finish(conn, fence, import_id, "completed", None, timeout_s)
        ilog.info("data import completed", imported=last.accepted, rejected=last.rejected, lines=last.line_no)
        return ImportOutcome(import_id, "completed", last.accepted, last.rejected, checkpoint.next_line)


async def _commit_batch(
    conn: Any, fence: LeaseFence, import_id: int, list_id: int, batch: ImportResult, timeout_s: float
) -> None:
    async with fenced_transaction(conn, fence, timeout_s=timeout_s):
        if batch.contacts:
            await conn.copy_records_to_table(
                "contacts", columns=["list_id", "contact_id", "phone", "timezone", "custom"],
                records=[(list_id, c.id, c.phone, c.timezone, json.dumps(dict(c.custom))) for c in batch.contacts],
                timeout=timeout_s,
            )
        if batch.rejects:
            await conn.executemany(
                "INSERT INTO import_errors (import_id, line, reason) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                [(import_id, r.line_no, r.reason) for r in batch.rejects], timeout=timeout_s,
            )
        cp = batch.checkpoint
        await conn.execute(
            "UPDATE data_imports SET checkpoint = $2, imported = $3, rejected = $4 WHERE id = $1",
            import_id, cp.line_no, cp.accepted, cp.rejected, timeout=timeout_s,
        )


async def _finish(
    conn: Any, fence: LeaseFence, import_id: int, state: str, error: str | None, timeout_s: float
) -> None:
    async with fenced_transaction(conn, fence, timeout_s=timeout_s):
        await conn.execute(
            "UPDATE data_imports SET state = $2, error = $3, finished_at = now() WHERE id = $1",
            import_id, state, error, timeout=timeout_s,
        )
