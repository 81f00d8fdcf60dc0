"""Export of a job's attempts to CSV, resuming where it stopped.

The file is written chunk by chunk in (contact_id, attempt_no) order; after each chunk is on disk
(flushed and fsynced) the master records, fenced, how many rows and bytes the file holds and the last key
written. A master that finds an export ``running`` from an earlier epoch truncates the file to the
recorded size — dropping whatever the failed master wrote after its last checkpoint — and continues after
the recorded key, so every attempt appears exactly once.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
from typing import Any

from pom_ha.campaign.fenced_tx import FenceLost
from services.campaign_director.context import TermContext

HEADER = ["job_id", "contact_id", "attempt_no", "state", "code", "cm_server", "created_at", "completed_at",
          "duration_ms"]

_COLS = "contact_id, attempt_no, state, code, cm_server, created_at, completed_at, duration_ms"
# two statements rather than one with "$2 IS NULL OR ...": the keyset form must use the primary key index
SQL_FIRST_CHUNK = f"SELECT {_COLS} FROM attempts WHERE job_id = $1 ORDER BY contact_id, attempt_no LIMIT $2"
SQL_NEXT_CHUNK = (
    f"SELECT {_COLS} FROM attempts WHERE job_id = $1 AND (contact_id, attempt_no) > ($2::text, $3::int)"
    " ORDER BY contact_id, attempt_no LIMIT $4"
)


def _csv_bytes(rows: list[list[Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerows(rows)
    return buf.getvalue().encode()


def _open_for_export(path: str, keep_bytes: int) -> Any:
    """Open the export file positioned at ``keep_bytes`` (0: a new file), truncating anything after it.
    The file is made group/other writable so a director on another server uid can resume it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        os.fchmod(fd, 0o666)
    except OSError:
        pass  # not our file: it already has the mode its creator gave it
    handle = os.fdopen(fd, "r+b")
    handle.truncate(keep_bytes)
    handle.seek(keep_bytes)
    return handle


class ExportDuties:
    def __init__(self, ctx: TermContext) -> None:
        self.ctx = ctx

    async def run_exports(self) -> int:
        ran = 0
        while True:
            rows = await self.ctx.fetch(
                "SELECT id, job_id, path, state, rows_written, bytes_written, last_contact_id, last_attempt_no,"
                " last_epoch FROM cd_exports WHERE state IN ('queued', 'running') ORDER BY id LIMIT 1"
            )
            if not rows:
                return ran
            await self.export(rows[0])
            ran += 1

    async def export(self, r: Any) -> None:
        export_id, job_id = int(r["id"]), int(r["job_id"])
        elog = self.ctx.log.bind(export_id=export_id, job_id=job_id)
        resuming = r["state"] == "running" and int(r["bytes_written"]) > 0
        rows_written = int(r["rows_written"]) if resuming else 0
        size = int(r["bytes_written"]) if resuming else 0
        key: tuple[str | None, int | None] = (r["last_contact_id"], r["last_attempt_no"]) if resuming else (None, None)
        try:
            handle = await asyncio.to_thread(_open_for_export, r["path"], size)
        except OSError as exc:
            await self._fail(export_id, f"cannot open {r['path']}: {exc.strerror}")
            elog.warning("export failed", reason=exc.strerror)
            return
        with handle:
            if resuming:
                elog.info("resuming export", rows_already=rows_written, bytes_kept=size,
                          previous_epoch=r["last_epoch"], after_key=list(key))
            else:
                size = await self._write(handle, _csv_bytes([HEADER]), size)
            if not await self._checkpoint(export_id, rows_written, size, key, started=True, resumed=resuming):
                raise FenceLost(self.ctx.fence)
            while True:
                limit = self.ctx.settings.export_chunk_rows
                chunk = await (self.ctx.fetch(SQL_FIRST_CHUNK, job_id, limit) if key[0] is None
                               else self.ctx.fetch(SQL_NEXT_CHUNK, job_id, key[0], key[1], limit))
                if not chunk:
                    break
                data = _csv_bytes([
                    [job_id, c["contact_id"], c["attempt_no"], c["state"], c["code"] or "", c["cm_server"],
                     c["created_at"].isoformat(), c["completed_at"].isoformat() if c["completed_at"] else "",
                     "" if c["duration_ms"] is None else c["duration_ms"]]
                    for c in chunk
                ])
                size = await self._write(handle, data, size)
                rows_written += len(chunk)
                key = (chunk[-1]["contact_id"], int(chunk[-1]["attempt_no"]))
                if not await self._checkpoint(export_id, rows_written, size, key):
                    raise FenceLost(self.ctx.fence)
        done = await self.ctx.execute(
            "UPDATE cd_exports SET state = 'completed', finished_at = now() WHERE id = $1 AND {fence}", export_id
        )
        if done:
            elog.info("export completed", rows=rows_written, bytes=size, path=r["path"])

    @staticmethod
    async def _write(handle: Any, data: bytes, size: int) -> int:
        """Append and make durable before the checkpoint says so; fsync off the event loop (it can take
        long enough to delay lease renewals)."""
        def durable() -> None:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        await asyncio.to_thread(durable)
        return size + len(data)

    async def _checkpoint(
        self, export_id: int, rows: int, size: int, key: tuple[str | None, int | None], *, started: bool = False,
        resumed: bool = False,
    ) -> bool:
        result = await self.ctx.execute(
            "UPDATE cd_exports SET state = 'running', rows_written = $2, bytes_written = $3, last_contact_id = $4,"
            " last_attempt_no = $5, last_epoch = $6, started_at = coalesce(started_at, now()),"
            " resumed = resumed + $7 WHERE id = $1 AND {fence}",
            export_id, rows, size, key[0], key[1], self.ctx.epoch, 1 if (started and resumed) else 0,
        )
        return bool(result)

    async def _fail(self, export_id: int, reason: str) -> None:
        await self.ctx.execute(
            "UPDATE cd_exports SET state = 'failed', error = $2, finished_at = now() WHERE id = $1 AND {fence}",
            export_id, reason,
        )
