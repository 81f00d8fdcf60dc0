"""The daemon's small HTTP endpoint: ``GET /health`` (JSON role/epoch/state/scopes) and ``GET /metrics``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web


class MetricsSource(Protocol):
    """What ``/metrics`` serves: a rendered Prometheus exposition and its content type."""

    content_type: str

    def render(self) -> bytes: ...


class StatusHTTP:
    def __init__(self, health: Callable[[], dict[str, Any]], metrics: MetricsSource) -> None:
        self._health = health
        self._metrics = metrics
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._get_health)
        app.router.add_get("/metrics", self._get_metrics)
        return app

    async def _get_health(self, _request: web.Request) -> web.Response:
        body = self._health()
        status = 200 if body.get("state") == "running" else 503
        return web.json_response(body, status=status)

    async def _get_metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(), headers={"Content-Type": self._metrics.content_type})

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 = ephemeral); returns the port."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0]
        self.port = int(bound[1])
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
