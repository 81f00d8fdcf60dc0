"""What every piece of master work of one term shares: the fence, the pool, events, alarms, the loop runner.

A :class:`TermContext` exists for one master term (one epoch). Every write it offers is fenced by that
term's lease; :meth:`TermContext.every` runs one periodic duty for the rest of the term and survives
database errors (logged once per streak), because a crash of master work would stop the whole daemon.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from pom_ha.campaign.fenced_tx import FenceLost
from pom_ha.ha.fencing import FencedWrite, LeaseFence
from pom_ha.ha.term import MasterTerm
from services.campaign_director.settings import CDSettings

if TYPE_CHECKING:
    from services.campaign_director.daemon import CampaignDirectorDaemon

DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

SQL_EVENT = (
    "INSERT INTO ha_event (service, scope, server, instance_id, kind, epoch, decision, detail)"
    " SELECT $1, $2, $3, $4, $5, $6, $7, $8::jsonb WHERE {fence}"
)
SQL_RAISE_ALARM = (
    "INSERT INTO cd_alarms (kind, job_id, message, detail, epoch) SELECT $1, $2, $3, $4::jsonb, $5 WHERE {fence}"
    " ON CONFLICT (kind, coalesce(job_id, 0)) WHERE cleared_at IS NULL AND kind IN ('nuisance', 'job_start_refused')"
    " DO NOTHING"
)
SQL_EVENT_ALARM = (
    "INSERT INTO cd_alarms (kind, job_id, message, detail, epoch) SELECT $1, $2, $3, $4::jsonb, $5 WHERE {fence}"
)
#: condition alarms: one open row per job at most (the partial unique index of migrations 0005 and 0011)
CONDITION_ALARMS = frozenset({"nuisance", "job_start_refused"})
SQL_CLEAR_ALARM = (
    "UPDATE cd_alarms SET cleared_at = clock_timestamp(), detail = detail || $3::jsonb"
    " WHERE kind = $1 AND coalesce(job_id, 0) = coalesce($2::bigint, 0) AND cleared_at IS NULL AND {fence}"
)


class TermContext:
    def __init__(self, daemon: CampaignDirectorDaemon, term: MasterTerm) -> None:
        self.daemon = daemon
        self.term = term
        self.settings: CDSettings = daemon.settings
        self.fence = LeaseFence(term.service, term.scope, term.epoch)
        self.server = daemon.config.server
        self.instance = daemon.config.instance_id
        self.started_mono = time.monotonic()
        #: the database clock when this term's master work began (set by the first fenced action)
        self.started_db: datetime | None = None
        self.log = daemon.log.bind(service=term.service, scope=term.scope, epoch=term.epoch)

    @property
    def epoch(self) -> int:
        return self.term.epoch

    async def pool(self) -> Any:
        return await self.daemon.app_db()

    async def execute(self, sql: str, *args: object) -> FencedWrite:
        """One fenced statement (``{fence}`` marks the check)."""
        return await self.daemon.fenced_execute(self.term, sql, *args)

    async def fetch(self, sql: str, *args: object) -> list[Any]:
        pool = await self.pool()
        async with pool.acquire(timeout=self.daemon.timings.store_timeout_s) as conn:
            return list(await conn.fetch(sql, *args, timeout=self.daemon.timings.store_timeout_s * 5))

    async def db_now(self) -> datetime:
        pool = await self.pool()
        now: datetime = await pool.fetchval("SELECT now()")
        return now

    async def event(self, kind: str, decision: str, detail: dict[str, Any] | None = None) -> bool:
        """An ``ha_event`` row for a decision of this master (fenced like any other of its writes)."""
        result = await self.execute(
            SQL_EVENT, self.term.service, self.term.scope, self.server, self.instance, kind, self.epoch, decision,
            json.dumps(detail or {}, default=str),
        )
        return bool(result)

    async def raise_alarm(self, kind: str, job_id: int | None, message: str, detail: dict[str, Any]) -> bool:
        """Open an alarm: a condition alarm only if none of its kind is open for the job; an event alarm
        (e.g. a schedule fired late) every time."""
        sql = SQL_RAISE_ALARM if kind in CONDITION_ALARMS else SQL_EVENT_ALARM
        result = await self.execute(sql, kind, job_id, message, json.dumps(detail, default=str),
                                    self.epoch)
        if result:
            self.log.warning("alarm raised", kind=kind, job_id=job_id, alarm=message)
        return bool(result)

    async def clear_alarm(self, kind: str, job_id: int | None, reason: str) -> bool:
        result = await self.execute(SQL_CLEAR_ALARM, kind, job_id, json.dumps({"cleared": reason}))
        if result:
            self.log.info("alarm cleared", kind=kind, job_id=job_id, reason=reason)
        return bool(result)

    def every(self, name: str, interval_s: float, duty: Callable[[], Awaitable[Any]]) -> None:
        """Run ``duty`` now and then every ``interval_s`` for the rest of the term."""
        self.term.create_task(self._loop(name, interval_s, duty), name=f"cd-{name}")

    async def _loop(self, name: str, interval_s: float, duty: Callable[[], Awaitable[Any]]) -> None:
        failing = 0
        while True:
            try:
                await duty()
                if failing:
                    self.log.info("master duty works again", duty=name, after_failures=failing)
                failing = 0
            except FenceLost:
                self.log.warning("fence lost: this term is over, its work stops", duty=name)
                await self.term.ended.wait()
                return
            except DB_ERRORS as exc:
                failing += 1
                if failing == 1:
                    self.log.warning("master duty failed, retrying", duty=name, error=f"{type(exc).__name__}: {exc}")
            except Exception:
                # a bug in one duty must not end the term (every director would crash in turn): log it with
                # its traceback, once per streak, and keep the other duties going
                failing += 1
                if failing == 1:
                    self.log.exception("BUG: master duty crashed, retrying", duty=name)
            await asyncio.sleep(interval_s)

