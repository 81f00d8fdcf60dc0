"""Term ports: what a piece of master work may use during one master term, and nothing more.

The HA base builds one :class:`TermPorts` per term (:meth:`pom_ha.ha.daemon.HADaemon.term_ports`). Workers get
the ports, never the daemon::

    async def run_master(self, elector, term):
        ports = self.term_ports(term)
        ports.every("offers", 1.0, OfferDuties(ports).run)     # survives database errors, ends with the term
        await term.ended.wait()

=====================  =====================================================================================
port                   what it is
=====================  =====================================================================================
``fence``              the term's :class:`~pom_ha.ha.fencing.LeaseFence` (for :func:`fenced_transaction`)
``execute``            one fenced statement on the app pool (``{fence}`` marks the check), counted in /metrics
``fenced``             the same, True when it landed; a refusal (the term is over) is logged once per call
``pool``               the daemon's app pool (reads, and fenced transactions under ``fence``)
``server``/``instance`` the server identity of this daemon
``sinks``              where the daemon's events and cache updates go (each may be None: not configured)
``log``                the daemon's logger bound to the term (service, scope, epoch)
``every``/``spawn``    the loop runner: a periodic duty / a task, both for the rest of the term
=====================  =====================================================================================
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import asyncpg

from pom_ha.ha.fencing import FencedWrite, FenceLost, LeaseFence
from pom_ha.ha.settings import HATimings
from pom_ha.ha.term import MasterTerm

T = TypeVar("T")

#: what a database call raises while PostgreSQL is away or slow (a duty retries on them)
DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

SQL_EVENT = (
    "INSERT INTO ha_event (service, scope, server, instance_id, kind, epoch, decision, detail)"
    " SELECT $1, $2, $3, $4, $5, $6, $7, $8::jsonb WHERE {fence}"
)


@dataclass
class Sinks:
    """Where a daemon's master work sends what others read besides the database: the event publisher and the
    cache (each None when not configured). The daemon may fill them after a term started (events open late)."""

    events: Any = None
    cache: Any = None
    events_failed: int = 0  # events not published (a full queue or a failed delivery)


@dataclass(frozen=True)
class DaemonPorts:
    """The daemon's side of every term's ports (built once by :class:`~pom_ha.ha.daemon.HADaemon`)."""

    server: str
    instance: str
    timings: HATimings
    log: Any
    app_db: Callable[[], Awaitable[Any]]
    fenced_execute: Callable[..., Awaitable[FencedWrite]]  # (term, sql, *args)
    sinks: Sinks = field(default_factory=Sinks)


class TermPorts:
    """The ports of one master term (see the module docstring)."""

    def __init__(self, term: MasterTerm, ports: DaemonPorts) -> None:
        self.term = term
        self.server = ports.server
        self.instance = ports.instance
        self.timings = ports.timings
        self.sinks = ports.sinks
        self.fence = LeaseFence(term.service, term.scope, term.epoch)
        self.started_mono = time.monotonic()
        self.log = ports.log.bind(service=term.service, scope=term.scope, epoch=term.epoch)
        self._ports = ports

    @property
    def epoch(self) -> int:
        return self.term.epoch

    @property
    def scope(self) -> str:
        return self.term.scope

    @property
    def active(self) -> bool:
        return self.term.active

    # ---- the database -------------------------------------------------------------------------------------
    async def pool(self) -> Any:
        return await self._ports.app_db()

    async def execute(self, sql: str, *args: object) -> FencedWrite:
        """One fenced statement (``{fence}`` marks the check)."""
        return await self._ports.fenced_execute(self.term, sql, *args)

    async def fenced(self, sql: str, *args: object) -> bool:
        """:meth:`execute`, True when it landed; a refusal (no longer master) is logged."""
        result = await self.execute(sql, *args)
        if not result.fence_held:
            self.log.warning("fenced write refused: no longer master", scope=self.term.scope)
        return bool(result)

    async def fetch(self, sql: str, *args: object) -> list[Any]:
        pool = await self.pool()
        async with pool.acquire(timeout=self.timings.store_timeout_s) as conn:
            return list(await conn.fetch(sql, *args, timeout=self.timings.store_timeout_s * 5))

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

    # ---- the loop runner ----------------------------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
        """Run ``coro`` for the rest of the term (cancelled when it ends; a crash ends the term's work)."""
        return self.term.create_task(coro, name=name)

    def every(self, name: str, interval_s: float, duty: Callable[[], Awaitable[Any]], *, prefix: str = "cd") -> None:
        """Run ``duty`` now and then every ``interval_s`` for the rest of the term."""
        self.term.create_task(self._loop(name, interval_s, duty), name=f"{prefix}-{name}")

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
                # a bug in one duty must not end the term (every master would crash in turn): log it with
                # its traceback, once per streak, and keep the other duties going
                failing += 1
                if failing == 1:
                    self.log.exception("BUG: master duty crashed, retrying", duty=name)
            await asyncio.sleep(interval_s)
