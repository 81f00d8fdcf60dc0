"""A dedicated LISTEN connection, health-checked and reconnected: :class:`ChannelListener` for any channel,
:class:`LeaseListener` for ``ha_lease``.

A LISTEN connection that silently died delivers nothing, which looks exactly like "nothing changed".
So the connection runs ``SELECT 1`` every ``health_interval_s`` (bounded by ``timeout_s``); on failure it
is terminated and re-opened with backoff, and after every (re)connect the owner is told
(``on_connect``; the lease listener then announces ``("*", "*")``): notifications may have been missed,
re-read everything.
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


class ChannelListener:
    """Calls ``on_payload(payload)`` for each ``NOTIFY <channel>`` and ``on_connect()`` after every
    (re)connect (a reconnect may have missed notifications)."""

    def __init__(
        self, dsn: str, channel: str, on_payload: Callable[[str], None], on_connect: Callable[[], None], *,
        timeout_s: float = 1.0, health_interval_s: float = 1.0, backoff: Backoff | None = None,
        application_name: str = "pom-ha-listen",
    ) -> None:
        self._dsn = dsn
        self.channel = channel
        self._on_payload = on_payload
        self._on_connect = on_connect
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
            self._task = asyncio.create_task(self._run(), name=f"listen-{self.channel}")

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
        self._on_payload(payload)

    async def _connect(self) -> None:
        conn = await asyncpg.connect(
            self._dsn, timeout=self._timeout_s, server_settings={"application_name": self._app}
        )
        try:
            await conn.add_listener(self.channel, self._on_notify)
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
                log.warning("listener cannot connect", channel=self.channel, error=f"{type(exc).__name__}: {exc}",
                            retry_in_s=round(delay, 3))
                await self._backoff.sleep(delay)
                continue
            self._backoff.reset()
            if not first:
                self.reconnects += 1
                log.info("listener reconnected", channel=self.channel)
            first = False
            self._on_connect()
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
                log.warning("listener connection lost", channel=self.channel, error=f"{type(exc).__name__}: {exc}")
                break
        self._drop()


class LeaseListener(ChannelListener):
    """Calls ``on_change(service, scope)`` for each ``NOTIFY ha_lease, '<service>/<scope>'``, and
    ``on_change("*", "*")`` after every (re)connect."""

    def __init__(
        self, dsn: str, on_change: Callable[[str, str], None], *, timeout_s: float = 1.0,
        health_interval_s: float = 1.0, backoff: Backoff | None = None, application_name: str = "pom-ha-listen",
    ) -> None:
        def payload(text: str) -> None:
            service, _, scope = text.partition("/")
            on_change(service, scope)

        super().__init__(dsn, CHANNEL, payload, lambda: on_change("*", "*"), timeout_s=timeout_s,
                         health_interval_s=health_interval_s, backoff=backoff, application_name=application_name)
