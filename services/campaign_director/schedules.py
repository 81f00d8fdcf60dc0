"""Timed work of the Common CD: campaign starts, purges and data imports.

A schedule that came due while no master was up fires ONCE when one is back, late, and says so three
ways: a warning in the log, an ``ha_event`` row (kind ``schedule_fired_late``) and a ``schedule_late``
alarm. Firing is idempotent: the schedule row moves (state or due_at) in the same fenced transaction as
the work it starts, guarded by the due time that was read.

Purges follow the guide: a run cut off by a failure is marked ``abandoned`` by the next master and NOT
resumed; the schedule's next occurrence purges.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

from pom_ha.campaign.admin import AdminError, create_job
from pom_ha.campaign.fenced_tx import fenced_transaction
from pom_ha.campaign.imports import run_import
from pom_ha.campaign.recurrence import HolidayCalendar, Recurrence
from pom_ha.campaign.schedule import Firing, plan_firing
from services.campaign_director.context import TermContext


class ScheduleDuties:
    def __init__(self, ctx: TermContext) -> None:
        self.ctx = ctx
        self.tolerance = timedelta(milliseconds=ctx.settings.late_tolerance_ms)

    async def _report_late(self, firing: Firing, what: str, detail: dict[str, Any]) -> None:
        decision = firing.describe(what)
        detail = {**detail, "due_at": firing.due_at.isoformat(), "late_ms": firing.late_ms,
                  "missed_occurrences": firing.missed_occurrences}
        self.ctx.log.warning(decision, **{k: v for k, v in detail.items() if k != "due_at"})
        await self.ctx.event("schedule_fired_late", decision, detail)
        await self.ctx.raise_alarm("schedule_late", None, decision, detail)

    # ---- campaign starts and purges ------------------------------------------------------------------
    async def fire_due(self, kind: str) -> int:
        """Fire the due schedules of one kind (campaign starts and purges run in separate loops, so a long
        purge never holds a campaign start back)."""
        rows = await self.ctx.fetch(
            "SELECT s.id, s.kind, s.campaign_id, s.due_at, s.interval_s, s.retention_s, c.name, now() AS now,"
            " s.recurrence_kind, s.recurrence, s.recurrence_start, s.tz, h.name AS cal_name, h.country,"
            " h.subdivision, h.custom_dates"
            " FROM cd_schedules s LEFT JOIN campaigns c ON c.id = s.campaign_id"
            " LEFT JOIN holiday_calendars h ON h.id = s.calendar_id"
            " WHERE s.state = 'pending' AND s.kind = $1 AND s.due_at <= now() ORDER BY s.due_at, s.id LIMIT 50",
            kind,
        )
        fired = 0
        for r in rows:
            interval = timedelta(seconds=r["interval_s"]) if r["interval_s"] else None
            firing = plan_firing(r["due_at"], r["now"], interval=interval, late_tolerance=self.tolerance,
                                 master_since=self.ctx.started_db)
            if firing is None:
                continue
            if r["recurrence_kind"] is not None:
                firing, holiday = self._recurring(r, firing)
                if holiday is not None:
                    fired += await self._skip_holiday(r, firing, holiday)
                    continue
            if r["kind"] == "campaign_start":
                fired += await self._start_campaign(r, firing)
            else:
                fired += await self._purge(r, firing)
        return fired

    def _recurring(self, r: Any, firing: Firing) -> tuple[Firing, str | None]:
        """An rrule/cron schedule's firing: its next occurrence after now (holidays skipped) and, when the
        due occurrence itself falls on a holiday of its calendar (the calendar changed since), the holiday."""
        calendar = HolidayCalendar(r["cal_name"] or "", r["country"], r["subdivision"],
                                   frozenset(r["custom_dates"] or []))
        rec = Recurrence(r["recurrence_kind"], r["recurrence"], r["tz"], r["recurrence_start"] or r["due_at"], calendar)
        next_due = rec.next_after(firing.now)
        missed = rec.count_between(firing.due_at, firing.now)
        firing = replace(firing, next_due=next_due, missed_occurrences=missed)
        return firing, rec.holiday_of(firing.due_at)

    async def _skip_holiday(self, r: Any, firing: Firing, holiday: str) -> int:
        what = f"start of campaign {r['name']!r} (schedule {r['id']}) due {firing.due_at.isoformat()}"
        skipped = await self.ctx.execute(
            "UPDATE cd_schedules SET state = CASE WHEN $3::timestamptz IS NULL THEN 'skipped' ELSE 'pending' END,"
            " due_at = coalesce($3, due_at), skipped_count = skipped_count + 1, last_skip = $4, last_epoch = $5"
            " WHERE id = $1 AND state = 'pending' AND due_at = $2 AND {fence}",
            r["id"], r["due_at"], firing.next_due, f"{firing.due_at.isoformat()}: {holiday}", self.ctx.epoch)
        if skipped:
            self.ctx.log.info("scheduled campaign start skipped: holiday", schedule_id=r["id"], campaign=r["name"],
                              holiday=holiday, next_due=str(firing.next_due))
            await self.ctx.event("schedule_skipped_holiday", f"{what} skipped: {holiday}",
                                 {"schedule_id": r["id"], "holiday": holiday})
        return 0

    async def _mark_fired(self, conn: Any, r: Any, firing: Firing) -> bool:
        moved = await conn.fetchval(
            "UPDATE cd_schedules SET state = CASE WHEN $3::timestamptz IS NULL THEN 'fired' ELSE 'pending' END,"
            " due_at = coalesce($3, due_at), fired_count = fired_count + 1, last_fired_at = now(),"
            " fired_late_ms = $4, last_epoch = $5 WHERE id = $1 AND state = 'pending' AND due_at = $2 RETURNING id",
            r["id"], r["due_at"], firing.next_due, firing.late_ms, self.ctx.epoch,
        )
        return moved is not None

    async def _start_campaign(self, r: Any, firing: Firing) -> int:
        what = f"start of campaign {r['name']!r} (schedule {r['id']})"
        pool = await self.ctx.pool()
        job_id: int | None = None
        refused: str | None = None
        async with pool.acquire() as conn, fenced_transaction(conn, self.ctx.fence):
            if not await self._mark_fired(conn, r, firing):
                return 0
            try:
                async with conn.transaction():  # a savepoint: a refused start still consumes the schedule
                    job_id = await create_job(conn, int(r["campaign_id"]))
            except AdminError as exc:
                refused = str(exc)
        if refused is not None:
            self.ctx.log.warning("scheduled campaign start skipped", schedule_id=r["id"], campaign=r["name"],
                                 reason=refused)
        else:
            self.ctx.log.info("scheduled campaign start fired", schedule_id=r["id"], campaign=r["name"],
                              job_id=job_id, late_ms=firing.late_ms)
        if firing.late:
            await self._report_late(firing, what, {"schedule_id": r["id"], "campaign": r["name"], "job_id": job_id})
        return 1

    async def _purge(self, r: Any, firing: Firing) -> int:
        pool = await self.ctx.pool()
        async with pool.acquire() as conn:
            async with fenced_transaction(conn, self.ctx.fence):
                if not await self._mark_fired(conn, r, firing):
                    return 0
                run_id = await conn.fetchval(
                    "INSERT INTO cd_purge_runs (schedule_id, epoch) VALUES ($1, $2) RETURNING id",
                    r["id"], self.ctx.epoch,
                )
            if firing.late:
                await self._report_late(firing, f"purge (schedule {r['id']})", {"schedule_id": r["id"]})
            self.ctx.log.info("purge started", schedule_id=r["id"], run_id=run_id, next_due=str(firing.next_due))
            deleted = 0
            retention = timedelta(seconds=int(r["retention_s"]))
            while True:
                async with fenced_transaction(conn, self.ctx.fence):
                    ids = [int(x["id"]) for x in await conn.fetch(
                        "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE state IN ('Completed', 'Stopped')"
                        " AND coalesce(ended_at, updated_at) < now() - $1::interval ORDER BY id LIMIT $2)"
                        " RETURNING id", retention, self.ctx.settings.purge_batch_jobs,
                    )]
                    if ids:
                        await conn.execute(
                            "DELETE FROM ha_assignment WHERE service = 'campaign_manager' AND item = ANY($1::text[])",
                            [f"job:{i}" for i in ids],
                        )
                    deleted += len(ids)
                    await conn.execute(
                        "UPDATE cd_purge_runs SET deleted_jobs = $2,"
                        " state = CASE WHEN $3 THEN 'completed' ELSE state END,"
                        " finished_at = CASE WHEN $3 THEN now() ELSE finished_at END WHERE id = $1",
                        run_id, deleted, not ids,
                    )
                if not ids:
                    break
        self.ctx.log.info("purge completed", run_id=run_id, deleted_jobs=deleted)
        return 1

    async def abandon_cut_off_purges(self) -> int:
        """First thing a new master does about purges: runs left 'running' by an earlier epoch are abandoned."""
        rows = await self.ctx.fetch(
            "SELECT p.id, p.epoch, p.deleted_jobs, s.due_at FROM cd_purge_runs p"
            " LEFT JOIN cd_schedules s ON s.id = p.schedule_id WHERE p.state = 'running' AND p.epoch <> $1",
            self.ctx.epoch,
        )
        for r in rows:
            note = (f"cut off by a failure of the Common CD (epoch {r['epoch']}) after {r['deleted_jobs']} job(s);"
                    f" not resumed, the next scheduled purge runs"
                    + (f" at {r['due_at'].isoformat()}" if r["due_at"] is not None else ""))
            done = await self.ctx.execute(
                "UPDATE cd_purge_runs SET state = 'abandoned', finished_at = now(), note = $2"
                " WHERE id = $1 AND state = 'running' AND {fence}", r["id"], note,
            )
            if done:
                self.ctx.log.warning("purge run abandoned", run_id=r["id"], note=note)
                await self.ctx.event("purge_abandoned", f"purge run {r['id']} {note}", {"run_id": r["id"]})
        return len(rows)

    # ---- data imports -------------------------------------------------------------------------------------
    async def run_imports(self, zone: str | None = None) -> int:
        """Run due imports one after another (queued ones, and running ones an earlier master left): the
        Common CD's (``zone`` None) or one zone's (run by that zone's director, under the zone's fence)."""
        ran = 0
        while True:
            rows = await self.ctx.fetch(
                "SELECT id, state, scheduled_at, now() AS now FROM data_imports WHERE state IN ('queued', 'running')"
                " AND scheduled_at <= now() AND zone IS NOT DISTINCT FROM $1 ORDER BY id LIMIT 1", zone,
            )
            if not rows:
                return ran
            r = rows[0]
            if r["state"] == "queued":
                firing = plan_firing(r["scheduled_at"], r["now"], late_tolerance=self.tolerance,
                                     master_since=self.ctx.started_db)
                if firing is not None and firing.late:
                    await self.ctx.execute(
                        "UPDATE data_imports SET fired_late_ms = $2 WHERE id = $1 AND {fence}", r["id"], firing.late_ms
                    )
                    await self._report_late(firing, f"data import {r['id']}", {"import_id": r["id"]})
            pool = await self.ctx.pool()
            await run_import(pool, self.ctx.fence, int(r["id"]), batch_size=self.ctx.settings.import_batch_rows)
            ran += 1
