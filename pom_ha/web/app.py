"""The web daemon's application (aiohttp): the REST API and the console, behind one auth layer.

Every endpoint takes and returns JSON. A request is refused with a 4xx naming what is wrong (the bad
field, the unknown job, zone or server) before anything is sent or written; every accepted request ends
in one explicit answer — applied, refused with the reason, or not applied (503) — never a silent loss.
The handlers are thin: runtime changes go through :func:`pom_ha.messaging.runtime.send_runtime_change`
(the CLI's ``job set``), zone configuration through :mod:`pom_ha.zones.cli` (``zone allocate``), the
component table through :mod:`pom_ha.status` (``status``). See docs/rest-api.md.

Endpoints are rows of a route table (:mod:`pom_ha.web.routes`) carrying their request/response models
and required role: the same rows validate requests, generate ``/v1/openapi.json`` and drive the auth
middleware (:mod:`pom_ha.web.security`). Another module's table plugs in with one ``add_routes`` line in
:meth:`RestApi.app`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from pom_ha.campaign.admin import AdminError, runtime_target
from pom_ha.config import Topology
from pom_ha.config.addresses import stomp_addresses
from pom_ha.messaging.runtime import RuntimeChange, RuntimeChangeError, new_request_id, send_runtime_change
from pom_ha.status import read_table_conn
from pom_ha.web.admin_routes import ROUTES as ADMIN_ROUTES
from pom_ha.web.models import (
    API_VERSION,
    DEFAULT_RUNTIME_TIMEOUT_S,
    MAX_BODY_BYTES,
    Agents,
    AgentsQuery,
    Allocation,
    AuditLog,
    EventsQuery,
    HaEvents,
    Health,
    Imports,
    Job,
    JobPath,
    Jobs,
    ListQuery,
    Me,
    RuntimeBody,
    RuntimeResult,
    StatusQuery,
    StatusTable,
    ZoneApplied,
    ZoneApplyBody,
    ZonePath,
    ZoneSaveBody,
    ZoneSaved,
)
from pom_ha.web.models import (
    who as _who,
)
from pom_ha.web.routes import (
    API_KEY,
    ROUTES_KEY,
    ApiError,
    Call,
    Route,
    add_routes,
    json_response,
    openapi_document,
    route_of,
)
from pom_ha.web.security import Security, wants_html
from pom_ha.zones.cli import ZoneConfigError, allocate, apply_warning, read_allocation

log = structlog.get_logger("pom_ha.web")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_json = json_response

__all__ = ["API_VERSION", "DEFAULT_RUNTIME_TIMEOUT_S", "ApiError", "RestApi"]


class RestApi:
    """The application of one POM server's web daemon (REST API + console)."""

    def __init__(self, topo: Topology, server: str, *, runtime_timeout_s: float = DEFAULT_RUNTIME_TIMEOUT_S) -> None:
        self.topo = topo
        self.server = server
        self.runtime_timeout_s = runtime_timeout_s
        self.brokers = stomp_addresses(topo)
        self.started = time.time()
        self.counts = {"runtime_applied": 0, "runtime_refused": 0, "runtime_unavailable": 0, "zone_saves": 0,
                       "zone_applies": 0, "rejected": 0}
        self._pool: asyncpg.Pool | None = None
        web_cfg = topo.web
        self.tls = bool(web_cfg.tls_cert and web_cfg.tls_key)
        self.security = Security(self._db, server, tls=self.tls,
                                 open_health_on_loopback=web_cfg.open_health_on_loopback,
                                 session_ttl_s=web_cfg.session_ttl_s)

    def routes(self) -> list[Route]:
        v = f"/{API_VERSION}"
        return [
            Route("GET", "/healthz", self.health, response=Health, loopback_open=True, errors=(),
                  summary="liveness and database reachability", tags=("ops",)),
            Route("GET", "/health", self.health, response=Health, loopback_open=True, errors=(), api=False),
            Route("GET", "/metrics", self.metrics, loopback_open=True, errors=(), content_type="text/plain",
                  summary="Prometheus metrics of this web daemon", tags=("ops",)),
            Route("GET", f"{v}/openapi.json", self.openapi, errors=(), summary="this document", tags=("meta",)),
            Route("GET", f"{v}/me", self.me, response=Me, errors=(), summary="who is signed in", tags=("meta",)),
            Route("GET", f"{v}/status", self.status, query=StatusQuery, response=StatusTable, errors=(503,),
                  summary="the component table (what the leases say)", tags=("ha",)),
            Route("GET", f"{v}/ha/events", self.ha_events, query=EventsQuery, response=HaEvents, errors=(503,),
                  summary="HA transitions (lease acquired, taken over, released, lost...)", tags=("ha",)),
            Route("GET", f"{v}/jobs", self.list_jobs, query=ListQuery, response=Jobs, errors=(503,),
                  summary="jobs, newest first, with progress", tags=("jobs",)),
            Route("GET", f"{v}/jobs/{{job_id}}", self.get_job, params=JobPath, response=Job, errors=(404, 503),
                  summary="one job", tags=("jobs",)),
            Route("POST", f"{v}/jobs/{{job_id}}/runtime", self.runtime, params=JobPath, request=RuntimeBody,
                  response=RuntimeResult, role="operator", errors=(404, 409, 503),
                  summary="pause / resume / pacing rate of a running job", tags=("jobs",)),
            Route("GET", f"{v}/agents", self.list_agents, query=AgentsQuery, response=Agents, errors=(503,),
                  summary="agents per zone (Table 9 states)", tags=("agents",)),
            Route("GET", f"{v}/imports", self.list_imports, query=ListQuery, response=Imports, errors=(503,),
                  summary="data imports with progress", tags=("imports",)),
            Route("GET", f"{v}/zones/{{zone}}/allocation", self.get_allocation, params=ZonePath,
                  response=Allocation, errors=(404, 503), summary="a zone's allocation and last apply",
                  tags=("zones",)),
            Route("PUT", f"{v}/zones/{{zone}}/allocation", self.put_allocation, params=ZonePath,
                  request=ZoneSaveBody, response=ZoneSaved, role="admin", errors=(404, 503),
                  summary="Save: record a zone's allocation", tags=("zones",)),
            Route("POST", f"{v}/zones/{{zone}}/apply", self.apply_zone, params=ZonePath, request=ZoneApplyBody,
                  response=ZoneApplied, role="admin", status=202, errors=(404, 409, 503),
                  summary="Save and Apply (logs out every agent of the zone; needs confirm)", tags=("zones",)),
            Route("GET", f"{v}/audit", self.audit_log, query=ListQuery, response=AuditLog, role="admin",
                  errors=(503,), summary="the audit log, newest first", tags=("admin",)),
        ]

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_errors, self.security.middleware], client_max_size=MAX_BODY_BYTES)
        app[API_KEY] = self
        add_routes(app, self.routes())
        add_routes(app, ADMIN_ROUTES)  # campaign administration: pom_ha/web/admin_routes.py
        from pom_ha.web.console import Console

        Console(self).install(app)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, _app: web.Application) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def _db(self) -> asyncpg.Pool:
        """A small pool, made on first use (the daemon starts, and answers /healthz, without the database)."""
        if self._pool is None:
            try:
                self._pool = await asyncpg.create_pool(self.topo.postgres.dsn(), min_size=0, max_size=8, timeout=5)
            except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
                raise self._db_down(exc) from None
        return self._pool

    db = _db

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        pool = await self._db()
        try:
            async with pool.acquire(timeout=5) as conn:
                return list(await conn.fetch(sql, *args, timeout=10))
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise self._db_down(exc) from None

    def _db_down(self, exc: BaseException) -> ApiError:
        pg = self.topo.postgres
        return ApiError(503, f"PostgreSQL at {pg.address}:{pg.port} unreachable ({type(exc).__name__}); "
                             "nothing was done")

    def _refuse(self, http_status: int, message: str, *, field: str | None = None,
                details: dict[str, Any] | None = None) -> ApiError:
        self.counts["rejected"] += 1
        return ApiError(http_status, message, field=field, details=details)

    # ---- ops -------------------------------------------------------------------------------------------------
    async def health(self, _request: web.Request, _call: Call) -> dict[str, Any]:
        db = "ok"
        try:
            pool = await self._db()
            async with pool.acquire(timeout=2) as conn:
                await conn.fetchval("SELECT 1", timeout=2)
        except (ApiError, OSError, TimeoutError, asyncpg.PostgresError) as exc:
            db = f"unreachable: {exc}"
        return {"service": "rest_api", "server": self.server, "status": "ok", "database": db,
                "activemq_brokers": [f"{h}:{p}" for h, p in self.brokers],
                "uptime_s": round(time.time() - self.started, 1), "counts": self.counts}

    async def metrics(self, _request: web.Request, _call: Call) -> web.Response:
        registry = CollectorRegistry()
        g = Gauge("pom_web_requests", "web daemon request outcomes since start", ["outcome"], registry=registry)
        for k, n in self.counts.items():
            g.labels(k).set(n)
        Gauge("pom_web_uptime_seconds", "seconds since start", registry=registry).set(time.time() - self.started)
        return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")

    async def openapi(self, request: web.Request, _call: Call) -> web.Response:
        doc = openapi_document(request.app[ROUTES_KEY].values(), title="pom-ha REST API", version="1.0.0",
                               server_url=f"{request.scheme}://{request.host}")
        return _json(200, doc)

    async def me(self, _request: web.Request, call: Call) -> dict[str, Any]:
        ident = call.identity
        assert ident is not None
        return {"user": ident.user, "role": ident.role, "via": ident.via, "csrf": ident.csrf}

    # ---- /v1/status, HA events ------------------------------------------------------------------------------------
    async def status(self, _request: web.Request, call: Call) -> dict[str, Any]:
        pool = await self._db()
        try:
            async with pool.acquire(timeout=5) as conn:
                table = await read_table_conn(conn, [s.name for s in self.topo.servers])
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise self._db_down(exc) from None
        return table.as_json(call.query.stale_after_s)

    async def ha_events(self, _request: web.Request, call: Call) -> dict[str, Any]:
        q: EventsQuery = call.query
        rows = await self.fetch(
            "SELECT id, at, service, scope, server, kind, epoch, decision, detail FROM ha_event"
            " WHERE id > $1 ORDER BY id DESC LIMIT $2", q.since_id, q.limit)
        return {"events": [{**dict(r), "detail": _jsonb(r["detail"])} for r in rows]}

    # ---- jobs --------------------------------------------------------------------------------------------------
    JOBS_SQL = """
    SELECT j.id, c.name AS campaign, j.zone, j.state, j.state_reason, j.pacing_rate, a.owner_server,
           (SELECT count(*) FROM job_contacts jc WHERE jc.job_id = j.id) AS contacts,
           (SELECT count(*) FROM job_contacts jc WHERE jc.job_id = j.id AND jc.state IN ('done', 'filtered_out'))
               AS done,
           (SELECT count(*) FROM attempts t WHERE t.job_id = j.id) AS attempts,
           (SELECT count(*) FROM attempts t WHERE t.job_id = j.id AND t.code = 'answer_human') AS answered,
           j.created_at, j.started_at, j.ended_at
      FROM jobs j JOIN campaigns c ON c.id = j.campaign_id
      LEFT JOIN ha_assignment a ON a.service = 'campaign_manager' AND a.item = 'job:' || j.id
    """

    async def list_jobs(self, _request: web.Request, call: Call) -> dict[str, Any]:
        rows = await self.fetch(self.JOBS_SQL + " ORDER BY j.id DESC LIMIT $1", call.query.limit)
        return {"jobs": [dict(r) for r in rows]}

    async def get_job(self, _request: web.Request, call: Call) -> dict[str, Any]:
        rows = await self.fetch(self.JOBS_SQL + " WHERE j.id = $1", call.params.job_id)
        if not rows:
            raise self._refuse(404, f"unknown job {call.params.job_id}", field="job_id")
        return dict(rows[0])

    async def list_agents(self, _request: web.Request, call: Call) -> dict[str, Any]:
        q: AgentsQuery = call.query
        rows = await self.fetch(
            "SELECT zone, agent_id, COALESCE(job_state, CASE WHEN logged_in THEN 'Idle' ELSE 'Logged out' END)"
            " AS state, logged_in, ready, call_state, job_id, nailed, failovers, ha_time_s, updated_at"
            " FROM agents WHERE ($1::text IS NULL OR zone = $1) ORDER BY zone, agent_id LIMIT $2", q.zone, q.limit)
        return {"agents": [dict(r) for r in rows]}

    async def list_imports(self, _request: web.Request, call: Call) -> dict[str, Any]:
        rows = await self.fetch(
            "SELECT i.id, l.name AS list, i.source_kind, i.state, i.imported, i.rejected, i.error, i.scheduled_at,"
            " i.started_at, i.finished_at FROM data_imports i JOIN contact_lists l ON l.id = i.list_id"
            " ORDER BY i.id DESC LIMIT $1", call.query.limit)
        return {"imports": [dict(r) for r in rows]}

    async def audit_log(self, _request: web.Request, call: Call) -> dict[str, Any]:
        rows = await self.fetch("SELECT * FROM audit_log ORDER BY id DESC LIMIT $1", call.query.limit)
        return {"entries": [{**dict(r), "detail": _jsonb(r["detail"])} for r in rows]}

    # ---- POST /v1/jobs/{job_id}/runtime --------------------------------------------------------------------
    async def runtime(self, request: web.Request, call: Call) -> web.Response | dict[str, Any]:
        job_id: int = call.params.job_id
        body: RuntimeBody = call.body
        return await self.runtime_change(job_id, body)

    async def runtime_change(self, job_id: int, body: RuntimeBody) -> web.Response | dict[str, Any]:
        """The one code path of a runtime change (REST and console alike)."""
        action = body.action
        rate = None
        if action == "pacing_rate":
            if body.value is None:
                raise self._refuse(400, "value (calls per second) is required for action pacing_rate", field="value")
            rate = body.value
        elif body.value is not None:
            raise self._refuse(400, f"action {action} takes no value", field="value")
        timeout_s = body.timeout_s if body.timeout_s is not None else self.runtime_timeout_s
        request_id = body.request_id or new_request_id()
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
        body_out = {**base, "status": reply.status, "applied": reply.status == "applied", "detail": reply.detail,
                    "cm_server": reply.cm_server or None, "cm_instance": reply.cm_instance or None}
        if reply.status == "applied":
            self.counts["runtime_applied"] += 1
            return body_out
        self.counts["runtime_refused"] += 1
        return _json(409, {**body_out, "error": f"refused by the Campaign Manager: {reply.detail}"})

    # ---- zones ---------------------------------------------------------------------------------------------
    def _zone(self, call: Call) -> str:
        return self.known_zone(call.params.zone)

    def known_zone(self, zone: str) -> str:
        """``zone`` if the topology has it, else a 404 naming the topology's zones."""
        zones = [z.name for z in self.topo.zones]
        if zone not in zones:
            raise self._refuse(404, f"unknown zone {zone!r}: the topology's zones are {zones}", field="zone")
        return zone

    def _server(self, server: str) -> str:
        servers = [s.name for s in self.topo.servers]
        if server not in servers:
            raise self._refuse(400, f"unknown server {json.dumps(server)}: the topology's servers are {servers}",
                               field="server")
        return server

    async def get_allocation(self, _request: web.Request, call: Call) -> dict[str, Any]:
        zone = self._zone(call)
        try:
            alloc = await read_allocation(self.topo, zone)
        except ZoneConfigError as exc:
            raise ApiError(503, str(exc)) from None
        return {"zone": zone, "allocated_server": alloc.allocated_server, "last_apply": alloc.last_apply}

    async def put_allocation(self, request: web.Request, call: Call) -> dict[str, Any]:
        """"Save": record the allocation only; no agent is touched until it is applied."""
        return await self.save_zone(self._zone(call), call.body.server, who=_who(request))

    async def save_zone(self, zone: str, server: str, *, who: str) -> dict[str, Any]:
        server = self._server(server)
        try:
            made = await allocate(self.topo, zone, server, apply=False, requested_by=who)
        except (ZoneConfigError, OSError, asyncpg.PostgresError) as exc:
            raise ApiError(503, str(exc)) from None
        self.counts["zone_saves"] += 1
        return {"zone": zone, "allocated_server": server, "previous": made.previous, "applied": False,
                "detail": f"saved: zone {zone} allocated to {server}; nothing changes until it is "
                          f"applied (POST /{API_VERSION}/zones/{zone}/apply)"}

    async def apply_zone(self, request: web.Request, call: Call) -> dict[str, Any]:
        """"Save and Apply": needs ``"confirm": true`` (every agent of the zone is logged out)."""
        body: ZoneApplyBody = call.body
        return await self.apply_zone_now(self._zone(call), body, who=_who(request))

    async def apply_zone_now(self, zone: str, body: ZoneApplyBody, *, who: str) -> dict[str, Any]:
        server = self._server(body.server)
        if not body.confirm:
            raise self._refuse(409, f"{apply_warning(zone, server)} Nothing was written; send \"confirm\": true "
                                    "to proceed.", field="confirm", details={"warning": apply_warning(zone, server)})
        try:
            made = await allocate(self.topo, zone, server, apply=True, grace_s=body.grace_s, requested_by=who)
        except (ZoneConfigError, OSError, asyncpg.PostgresError) as exc:
            raise ApiError(503, str(exc)) from None
        self.counts["zone_applies"] += 1
        return {"zone": zone, "allocated_server": server, "previous": made.previous, "applied": True,
                "apply_id": made.apply_id,
                "detail": f"saved and applied: the zone's Agent Manager logs its agents out and hands "
                          f"zone {zone} to {server}; the outcome is in GET /{API_VERSION}/zones/{zone}/"
                          "allocation (last_apply.result)"}




def _jsonb(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            out = json.loads(value)
        except ValueError:
            return {"raw": value}
        return out if isinstance(out, dict) else {"value": out}
    return dict(value or {})


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal as JSON ``{"error", "field"?}``; aiohttp's own (404, 405, 413) too; console pages get
    the same text in an HTML page. Every answer carries ``Server-Timing: app;dur=<ms>``."""
    t0 = time.perf_counter()
    try:
        resp = await handler(request)
        if not resp.prepared:
            resp.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - t0) * 1000:.2f}"
        return resp
    except ApiError as exc:
        body = {"error": str(exc), **({"field": exc.field} if exc.field else {}), **exc.extra}
        if wants_html(request) and route_of(request) is not None and exc.status in (401, 403, 503):
            from pom_ha.web.console import error_page

            return error_page(request, exc.status, str(exc))
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


