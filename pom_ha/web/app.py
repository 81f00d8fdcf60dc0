"""The REST API (aiohttp): runtime changes of running jobs, zone configuration, the component table.

Every endpoint takes and returns JSON. A request is refused with a 4xx naming what is wrong (the bad
field, the unknown job, zone or server) before anything is sent or written; every accepted request ends
in one explicit answer — applied, refused with the reason, or not applied (503) — never a silent loss.
The handlers are thin: runtime changes go through :func:`pom_ha.messaging.runtime.send_runtime_change`
(the CLI's ``job set``), zone configuration through :mod:`pom_ha.zones.cli` (``zone allocate``), the
component table through :mod:`pom_ha.status` (``status``). See docs/rest-api.md.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import structlog
from aiohttp import web

from pom_ha.campaign.admin import AdminError, runtime_target
from pom_ha.config import Topology
from pom_ha.config.addresses import stomp_addresses
from pom_ha.messaging.runtime import ACTIONS, RuntimeChange, RuntimeChangeError, new_request_id, send_runtime_change
from pom_ha.status import read_table
from pom_ha.web.admin_routes import add_admin_routes
from pom_ha.zones.cli import DEFAULT_GRACE_S, ZoneConfigError, allocate, apply_warning, read_allocation

log = structlog.get_logger("pom_ha.web")
API_VERSION = "v1"
MAX_BODY_BYTES = 64 * 1024
DEFAULT_RUNTIME_TIMEOUT_S = 10.0
MAX_PACING_RATE = 100_000.0
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """A refused request: HTTP status, message and (when one is to blame) the field."""

    def __init__(self, http_status: int, message: str, *, field: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.field, self.extra = http_status, field, details or {}


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers, dumps=lambda o: json.dumps(o, default=str))


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal as JSON ``{"error", "field"?}``; aiohttp's own (404, 405, 413) too."""
    try:
        return await handler(request)
    except ApiError as exc:
        body = {"error": str(exc), **({"field": exc.field} if exc.field else {}), **exc.extra}
        return _json(exc.status, body, {"Retry-After": "2"} if exc.status == 503 else None)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        what = {404: f"no such resource: {request.method} {request.path}",
                405: f"method {request.method} not allowed on {request.path}",
                413: f"request body larger than {MAX_BODY_BYTES} bytes"}.get(exc.status, exc.reason)
        return _json(exc.status, {"error": what})
    except Exception:
        log.exception("REST request failed", method=request.method, path=request.path)
        return _json(500, {"error": "internal error; see the rest-api daemon's log"})


async def _body(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    """The JSON object of the request; unknown fields are refused by name."""
    raw = await request.read()
    if not raw.strip():
        raise ApiError(400, "the request needs a JSON object body", field="body")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", field="body") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}", field="body")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}",
                       field=unknown[0])
    return data


def _number(data: dict[str, Any], name: str, *, low: float, high: float, default: float | None = None,
            low_open: bool = False) -> float | None:
    value = data.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a number, got {json.dumps(value)}", field=name)
    if value > high or value < low or (low_open and value == low):
        bound = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise ApiError(400, f"{name} must be in {bound}, got {value:g}", field=name)
    return float(value)


class RestApi:
    """The application of one POM server's REST daemon."""

    def __init__(self, topo: Topology, server: str, *, runtime_timeout_s: float = DEFAULT_RUNTIME_TIMEOUT_S) -> None:
        self.topo = topo
        self.server = server
        self.runtime_timeout_s = runtime_timeout_s
        self.brokers = stomp_addresses(topo)
        self.started = time.time()
        self.counts = {"runtime_applied": 0, "runtime_refused": 0, "runtime_unavailable": 0, "zone_saves": 0,
                       "zone_applies": 0, "rejected": 0}
        self._pool: asyncpg.Pool | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/health", self.health)
        app.router.add_get(f"/{API_VERSION}/status", self.status)
        app.router.add_post(f"/{API_VERSION}/jobs/{{job_id}}/runtime", self.runtime)
        app.router.add_get(f"/{API_VERSION}/zones/{{zone}}/allocation", self.get_allocation)
        app.router.add_put(f"/{API_VERSION}/zones/{{zone}}/allocation", self.put_allocation)
        app.router.add_post(f"/{API_VERSION}/zones/{{zone}}/apply", self.apply_zone)
        add_admin_routes(app, self._db)  # campaign administration: pom_ha/web/admin_routes.py
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, _app: web.Application) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def _db(self) -> asyncpg.Pool:
        """A small pool, made on first use (the daemon starts, and answers /health, without the database)."""
        if self._pool is None:
            try:
                self._pool = await asyncpg.create_pool(self.topo.postgres.dsn(), min_size=0, max_size=4, timeout=5)
            except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
                raise self._db_down(exc) from None
        return self._pool

    def _db_down(self, exc: BaseException) -> ApiError:
        pg = self.topo.postgres
        return ApiError(503, f"PostgreSQL at {pg.address}:{pg.port} unreachable ({type(exc).__name__}); "
                             "nothing was done")

    def _refuse(self, http_status: int, message: str, *, field: str | None = None,
                details: dict[str, Any] | None = None) -> ApiError:
        self.counts["rejected"] += 1
        return ApiError(http_status, message, field=field, details=details)

    # ---- /health, /v1/status -------------------------------------------------------------------------------
    async def health(self, _request: web.Request) -> web.Response:
        db = "ok"
        try:
            pool = await self._db()
            async with pool.acquire(timeout=2) as conn:
                await conn.fetchval("SELECT 1", timeout=2)
        except (ApiError, OSError, TimeoutError, asyncpg.PostgresError) as exc:
            db = f"unreachable: {exc}"
        return _json(200, {
            "service": "rest_api", "server": self.server, "status": "ok", "database": db,
            "activemq_brokers": [f"{h}:{p}" for h, p in self.brokers], "uptime_s": round(time.time() - self.started, 1),
            "counts": self.counts,
        })

    async def status(self, request: web.Request) -> web.Response:
        raw = request.query.get("stale_after_s", "5")
        try:
            stale = float(raw)
        except ValueError:
            raise self._refuse(400, f"stale_after_s must be a number of seconds, got {raw!r}",
                               field="stale_after_s") from None
        if not 0.5 <= stale <= 3600:
            raise self._refuse(400, f"stale_after_s must be in [0.5, 3600], got {stale:g}", field="stale_after_s")
        try:
            table = await read_table(self.topo.postgres.dsn(), [s.name for s in self.topo.servers])
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise self._db_down(exc) from None
        return _json(200, table.as_json(stale))

    # ---- POST /v1/jobs/{job_id}/runtime --------------------------------------------------------------------
    async def runtime(self, request: web.Request) -> web.Response:
        raw_id = request.match_info["job_id"]
        if not raw_id.isdigit() or int(raw_id) < 1 or int(raw_id) > 2**63 - 1:
            raise self._refuse(400, f"job id must be a positive integer, got {raw_id!r}", field="job_id")
        job_id = int(raw_id)
        data = await _body(request, {"action", "value", "timeout_s", "request_id"})
        action = data.get("action")
        if action not in ACTIONS:
            raise self._refuse(400, f"action must be one of {', '.join(ACTIONS)}, got {json.dumps(action)}",
                               field="action")
        rate = None
        if action == "pacing_rate":
            if data.get("value") is None:
                raise self._refuse(400, "value (calls per second) is required for action pacing_rate", field="value")
            rate = _number(data, "value", low=0, high=MAX_PACING_RATE, low_open=True)
        elif data.get("value") is not None:
            raise self._refuse(400, f"action {action} takes no value", field="value")
        timeout_s = _number(data, "timeout_s", low=0.5, high=300, default=self.runtime_timeout_s)
        assert timeout_s is not None
        request_id = data.get("request_id") or new_request_id()
        if not isinstance(request_id, str) or not _REQUEST_ID.match(request_id):
            raise self._refuse(400, "request_id must be 8-64 characters of A-Z a-z 0-9 _ -", field="request_id")
        if not self.brokers:
            raise ApiError(503, "the topology has no ActiveMQ broker; nothing was applied")
        pool = await self._db()
        try:
            async with pool.acquire(timeout=5) as conn:
                if await conn.fetchval("SELECT 1 FROM jobs WHERE id = $1", job_id) is None:
                    raise self._refuse(404, f"unknown job {job_id}", field="job_id")
                target = await runtime_target(conn, job_id, action)
        except AdminError as exc:
            raise self._refuse(409, str(exc),
                               details={"status": "refused", "applied": False, "job_id": job_id}) from None
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise self._db_down(exc) from None
        change = RuntimeChange(job_id=job_id, action=action, request_id=request_id,
                               owner_instance=target.owner_instance, epoch=target.epoch, pacing_rate=rate,
                               expires_ms=int((time.time() + timeout_s) * 1000))
        base = {"job_id": job_id, "action": action, "value": rate, "request_id": request_id,
                "owner_server": target.owner_server}
        try:
            reply = await send_runtime_change(self.brokers, change, timeout_s=timeout_s)
        except RuntimeChangeError as exc:
            # not applied, said so: no broker took it, or no CM answered before it expired at the broker
            self.counts["runtime_unavailable"] += 1
            log.warning("runtime change not applied", job=job_id, action=action, request=request_id, error=str(exc))
            raise ApiError(503, str(exc), details={"status": "not_applied", "applied": False, **base}) from None
        body = {**base, "status": reply.status, "applied": reply.status == "applied", "detail": reply.detail,
                "cm_server": reply.cm_server or None, "cm_instance": reply.cm_instance or None}
        if reply.status == "applied":
            self.counts["runtime_applied"] += 1
            return _json(200, body)
        self.counts["runtime_refused"] += 1
        return _json(409, {**body, "error": f"refused by the Campaign Manager: {reply.detail}"})

    # ---- zones ---------------------------------------------------------------------------------------------
    def _zone(self, request: web.Request) -> str:
        zone = request.match_info["zone"]
        zones = [z.name for z in self.topo.zones]
        if zone not in zones:
            raise self._refuse(404, f"unknown zone {zone!r}: the topology's zones are {zones}", field="zone")
        return zone

    def _server(self, data: dict[str, Any]) -> str:
        server = data.get("server")
        servers = [s.name for s in self.topo.servers]
        if server is None:
            raise self._refuse(400, f"server is required (one of {servers})", field="server")
        if server not in servers:
            raise self._refuse(400, f"unknown server {json.dumps(server)}: the topology's servers are {servers}",
                               field="server")
        return str(server)

    async def get_allocation(self, request: web.Request) -> web.Response:
        zone = self._zone(request)
        try:
            alloc = await read_allocation(self.topo, zone)
        except ZoneConfigError as exc:
            raise ApiError(503, str(exc)) from None
        return _json(200, {"zone": zone, "allocated_server": alloc.allocated_server, "last_apply": alloc.last_apply})

    async def put_allocation(self, request: web.Request) -> web.Response:
        """"Save": record the allocation only; no agent is touched until it is applied."""
        zone = self._zone(request)
        server = self._server(await _body(request, {"server"}))
        try:
            made = await allocate(self.topo, zone, server, apply=False, requested_by=_who(request))
        except (ZoneConfigError, OSError, asyncpg.PostgresError) as exc:
            raise ApiError(503, str(exc)) from None
        self.counts["zone_saves"] += 1
        return _json(200, {"zone": zone, "allocated_server": server, "previous": made.previous, "applied": False,
                           "detail": f"saved: zone {zone} allocated to {server}; nothing changes until it is "
                                     f"applied (POST /{API_VERSION}/zones/{zone}/apply)"})

    async def apply_zone(self, request: web.Request) -> web.Response:
        """"Save and Apply": needs ``"confirm": true`` (every agent of the zone is logged out)."""
        zone = self._zone(request)
        data = await _body(request, {"server", "confirm", "grace_s"})
        server = self._server(data)
        grace = _number(data, "grace_s", low=0, high=600, default=DEFAULT_GRACE_S)
        assert grace is not None
        confirm = data.get("confirm", False)
        if not isinstance(confirm, bool):
            raise self._refuse(400, f"confirm must be true or false, got {json.dumps(confirm)}", field="confirm")
        if not confirm:
            raise self._refuse(409, f"{apply_warning(zone, server)} Nothing was written; send \"confirm\": true "
                                    "to proceed.", field="confirm", details={"warning": apply_warning(zone, server)})
        try:
            made = await allocate(self.topo, zone, server, apply=True, grace_s=grace, requested_by=_who(request))
        except (ZoneConfigError, OSError, asyncpg.PostgresError) as exc:
            raise ApiError(503, str(exc)) from None
        self.counts["zone_applies"] += 1
        return _json(202, {"zone": zone, "allocated_server": server, "previous": made.previous, "applied": True,
                           "apply_id": made.apply_id,
                           "detail": f"saved and applied: the zone's Agent Manager logs its agents out and hands "
                                     f"zone {zone} to {server}; the outcome is in GET /{API_VERSION}/zones/{zone}/"
                                     "allocation (last_apply.result)"})


def _who(request: web.Request) -> str:
    peer = request.remote or "?"
    return f"rest-api {peer}"[:200]
