"""A dedicated LISTEN connection for ``ha_lease`` notifications, health-checked and reconnected.

A LISTEN connection that silently died delivers nothing, which looks exactly like "nothing changed".
So the connection runs ``SELECT 1`` every ``health_interval_s`` (bounded by ``timeout_s``); on failure it
is terminated and re-opened with backoff, and after every (re)connect watchers get ``("*", "*")``:
notifications may have been missed, re-read everything.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog

from pom_ha.ha.retry import Backoff

CHANNEL = "ha_lease"
log = structlog.get_logger("pom_ha.ha.listen")


class LeaseListener:
    """Calls ``on_change(service, scope)`` for each ``NOTIFY ha_lease, '<service>/<scope>'``."""

    def __init__(
        self, dsn: str, on_change: Callable[[str, str], None], *, timeout_s: float = 1.0,
        health_interval_s: float = 1.0, backoff: Backoff | None = None, application_name: str = "pom-ha-listen",
    ) -> None:
        self._dsn = dsn
        self._on_change = on_change
        self._timeout_s = timeout_s
        self._health_interval_s = health_interval_s
        self._backoff = backoff or Backoff()
        self._app = application_name
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None
        self.connected = asyncio.Event()
        self._lost = asyncio.Event()
        self.notifications = 0
        self.reconnects = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ha-lease-listener")

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
        service, _, scope = payload.partition("/")
        self._on_change(service, scope)

    async def _connect(self) -> None:
        conn = await asyncpg.connect(
            self._dsn, timeout=self._timeout_s, server_settings={"application_name": self._app}
        )
        try:
            await conn.add_listener(CHANNEL, self._on_notify)
            conn.add_termination_listener(lambda _c: self._lost.set())
        except BaseException:
            conn.terminate()
            raise
        self._lost.clear()
        self._conn = conn
        self.connected.set()

    async def _run(self) -> None:
        first = True
        while True:
            try:
                async with asyncio.timeout(self._timeout_s * 2):
                    await self._connect()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self._drop()
                delay = self._backoff.next_delay()
                log.warning("lease listener cannot connect", error=f"{type(exc).__name__}: {exc}",
                            retry_in_s=round(delay, 3))
                await self._backoff.sleep(delay)
                continue
            self._backoff.reset()
            if not first:
                self.reconnects += 1
                log.info("lease listener reconnected")
            first = False
            self._on_change("*", "*")
            await self._watch()

    async def _watch(self) -> None:
        """Return when the connection is found dead (it is then dropped)."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._health_interval_s):
                    await self._lost.wait()
            conn = self._conn
            if conn is None or conn.is_closed():
                break
            try:
                await conn.fetchval("SELECT 1", timeout=self._timeout_s)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("lease listener connection lost", error=f"{type(exc).__name__}: {exc}")
                break
        self._drop()
