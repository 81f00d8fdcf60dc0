"""A dedicated, health-checked LISTEN connection on the ``ha_assignment`` channel (migration 0006).

``pom_ha.ha.pg_listen.LeaseListener`` is bound to ``ha_lease``; the Campaign Manager needs the same
behaviour on another channel: ``SELECT 1`` every ``health_interval_s`` so a silently dead connection is
noticed, re-open with backoff, and after every (re)connect ``on_reconnect()`` — notifications may have been
missed, so the caller re-reads its assignments.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog

from pom_ha.ha.retry import Backoff

CHANNEL = "ha_assignment"
log = structlog.get_logger("services.campaign_manager.listen")
_DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class AssignmentListener:
    """Calls ``on_change(payload)`` for each ``NOTIFY ha_assignment`` (payload: the JSON object of the
    trigger: service, item, owner, previous, epoch) and ``on_reconnect()`` after each (re)connect."""

    def __init__(
        self, dsn: str, on_change: Callable[[dict[str, Any]], None], on_reconnect: Callable[[], None], *,
        timeout_s: float = 1.0, health_interval_s: float = 1.0, application_name: str = "pom-ha:cm-listen",
    ) -> None:
        self._dsn = dsn
        self._on_change = on_change
        self._on_reconnect = on_reconnect
        self._timeout_s = timeout_s
        self._health_interval_s = health_interval_s
        self._app = application_name
        self._backoff = Backoff(initial_s=0.05, max_s=2.0)
        self._conn: Any = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.notifications = 0
        self.reconnects = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="cm-assignment-listener")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self.connected.clear()
        if conn is not None:
            conn.terminate()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        try:
            obj = json.loads(payload)
        except ValueError:
            log.warning("unreadable ha_assignment notification", payload=payload[:200])
            return
        if isinstance(obj, dict):
            self._on_change(obj)

    async def _run(self) -> None:
        first = True
        while True:
            try:
                async with asyncio.timeout(self._timeout_s * 2):
                    conn = await asyncpg.connect(self._dsn, timeout=self._timeout_s,
                                                 server_settings={"application_name": self._app})
                    self._conn = conn
                    await conn.add_listener(CHANNEL, self._on_notify)
                    conn.add_termination_listener(lambda _c: self._lost.set())
            except _DB_ERRORS as exc:
                self._drop()
                delay = self._backoff.next_delay()
                log.warning("assignment listener cannot connect", error=f"{type(exc).__name__}: {exc}",
                            retry_in_s=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            self._lost.clear()
            self.connected.set()
            self._backoff.reset()
            if not first:
                self.reconnects += 1
                log.info("assignment listener reconnected")
            first = False
            self._on_reconnect()
            await self._watch()

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._health_interval_s):
                    await self._lost.wait()
            conn = self._conn
            if conn is None or conn.is_closed():
                break
            try:
                await conn.fetchval("SELECT 1", timeout=self._timeout_s)
            except _DB_ERRORS as exc:
                log.warning("assignment listener connection lost", error=f"{type(exc).__name__}: {exc}")
                break
        self._drop()
