"""What every piece of the Campaign Director's master work shares: the term's ports (:mod:`pom_ha.ha.ports`: the
fence, the pool, events, the loop runner) plus the director's settings and its alarms.

A :class:`TermContext` exists for one master term (one epoch). Every write it offers is fenced by that
term's lease; :meth:`TermContext.every` runs one periodic duty for the rest of the term and survives
database errors (logged once per streak), because a crash of master work would stop the whole daemon.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pom_ha.ha.ports import DB_ERRORS, DaemonPorts, TermPorts
from pom_ha.ha.term import MasterTerm
from services.campaign_director.settings import CDSettings

__all__ = ["DB_ERRORS", "TermContext"]

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


class TermContext(TermPorts):
    def __init__(self, term: MasterTerm, ports: DaemonPorts, settings: CDSettings) -> None:
        super().__init__(term, ports)
        self.settings = settings
        #: the database clock when this term's master work began (set by the first fenced action)
        self.started_db: datetime | None = None

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
