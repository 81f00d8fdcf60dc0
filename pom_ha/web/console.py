"""The POM Monitor console: server-rendered pages (aiohttp-jinja2), htmx forms, Server-Sent Events.

Every server's web daemon serves it (the same application as the REST API), so losing one server
leaves the console on the others, with the same sessions (PostgreSQL). Pages:

* ``/`` Overview: the component table (what the leases say, :mod:`pom_ha.status`) and the real servers'
  state; both live over SSE (``/events``), no reload.
* ``/timeline``: HA events on a time axis and the failovers of the last hour with their duration against
  the guide's POM figures.
* ``/jobs``: jobs with progress; pause / resume / pacing rate through :meth:`RestApi.runtime_change` (the
  REST API's own code path); a refusal shows the API's error text next to the field. States live.
* ``/agents``, ``/imports``: read views. ``/zones``: Save / Save and Apply with the guide's warning and an
  explicit confirm. ``/audit``: the audit log (admin).

Actions are POST forms carrying the session's CSRF token (the middleware checks it); htmx sends it as
``X-CSRF-Token``. Static files (own CSS/JS, and Pico CSS, htmx, uPlot vendored from npm by
scripts/install into ``static/vendor``) are served without login; no CDN.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import aiohttp_jinja2
import asyncpg
import jinja2
import structlog
from aiohttp import web
from pydantic import ValidationError

from pom_ha.config import Topology
from pom_ha.status import COMPONENTS, read_table_conn
from pom_ha.web import auth
from pom_ha.web.models import JobPath, RuntimeBody, ZoneApplyBody, ZonePath, ZoneSaveBody
from pom_ha.web.models import who as _who
from pom_ha.web.routes import IDENTITY, ApiError, Call, Route, add_routes, validation_error
from pom_ha.web.security import Security


class RestApi(Protocol):
    """What the console uses of the REST API (:class:`pom_ha.web.app.RestApi`), which installs it: the same
    code paths for every action, so a refusal in the console is the API's own."""

    topo: Topology
    server: str
    tls: bool
    JOBS_SQL: str
    security: Security

    async def db(self) -> asyncpg.Pool: ...
    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]: ...
    async def runtime_change(self, job_id: int, body: RuntimeBody) -> web.Response | dict[str, Any]: ...
    def known_zone(self, zone: str) -> str: ...
    async def save_zone(self, zone: str, server: str, *, who: str) -> dict[str, Any]: ...
    async def apply_zone_now(self, zone: str, body: ZoneApplyBody, *, who: str) -> dict[str, Any]: ...

log = structlog.get_logger("pom_ha.web.console")
HERE = Path(__file__).parent
STATIC = HERE / "static"
LOGIN_CSRF = "pom_login_csrf"
# the guide's POM failover figures (seconds), per component
POM_FAILOVER_S = {"campaign_director": 140.0, "campaign_manager": 300.0, "rule_engine": 45.0,
                  "agent_manager": 40.0, "zone_director": 140.0, "activemq": 140.0}
LIVE_POLL_S = 1.0
SERVERS_POLL_S = 10.0
NAV = [("/", "Overview"), ("/timeline", "HA timeline"), ("/jobs", "Campaigns & jobs"), ("/agents", "Agents"),
       ("/zones", "Zones"), ("/imports", "Imports"), ("/audit", "Audit log")]


def error_page(request: web.Request, status: int, message: str) -> web.Response:
    resp = aiohttp_jinja2.render_template("error.html", request, {"status": status, "message": message,
                                                                   "nav": NAV, "ident": request.get(IDENTITY)})
    resp.set_status(status)
    return resp


class Live:
    """One poller per daemon: the component table, the latest HA events and job states, pushed to every
    open console over SSE. It LISTENs on ``ha_lease`` (a takeover shows within milliseconds) and polls
    every second (a member whose heartbeat stops turns UNREACHABLE)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.subscribers: set[asyncio.Queue[tuple[str, str]]] = set()
        self.last: dict[str, str] = {}
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        self.servers_html = ""
        self.servers_at = 0.0
        self.servers_task: asyncio.Task[None] | None = None
        self.refreshed_at = 0.0

    def subscribe(self) -> asyncio.Queue[tuple[str, str]]:
        q: asyncio.Queue[tuple[str, str]] = asyncio.Queue(maxsize=100)
        self.subscribers.add(q)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self.run())
        return q

    def publish(self, kind: str, data: str) -> None:
        if self.last.get(kind) == data:
            return
        self.last[kind] = data
        for q in list(self.subscribers):
            if q.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait((kind, data))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task

    async def run(self) -> None:
        api = self.console.api
        while self.subscribers:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(api.topo.postgres.dsn(), timeout=5)
                await conn.add_listener("ha_lease", lambda *_: self.wake.set())
                while self.subscribers:
                    await self.refresh(conn)
                    self.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), LIVE_POLL_S)
            except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
                self.publish("dbdown", f"PostgreSQL unreachable ({type(exc).__name__}): the tables below are the "
                                       "last known state; static pages still work. Retrying every 2 s.")
                await asyncio.sleep(2)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()

    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def refresh(self, conn: asyncpg.Connection) -> None:
        c = self.console
        self.publish("dbdown", "")
        self.publish("components", await c.components_html(conn))
        self.publish("timeline", await c.timeline_html(conn))
        rows = await conn.fetch("SELECT id, state FROM jobs ORDER BY id DESC LIMIT 200")
        self.publish("jobs", json.dumps({str(r["id"]): r["state"] for r in rows}))
        self.refreshed_at = time.monotonic()
        if time.monotonic() - self.servers_at > SERVERS_POLL_S:
            self.servers_at = time.monotonic()
            self.servers_task = asyncio.create_task(self._servers())

    async def _servers(self) -> None:
        with contextlib.suppress(Exception):
            self.publish("servers", await self.console.servers_html())


class Console:
    def __init__(self, api: RestApi) -> None:
        self.api = api
        self.live = Live(self)
        self.env: jinja2.Environment | None = None

    def routes(self) -> list[Route]:
        page = {"api": False, "errors": ()}
        return [
            Route("GET", "/login", self.login_page, role=None, **page),  # type: ignore[arg-type]
            Route("POST", "/login", self.login, role=None, **page),  # type: ignore[arg-type]
            Route("POST", "/logout", self.logout, role="viewer", **page),  # type: ignore[arg-type]
            Route("GET", "/", self.overview, **page),  # type: ignore[arg-type]
            Route("GET", "/events", self.events, **page),  # type: ignore[arg-type]
            Route("GET", "/timeline", self.timeline, **page),  # type: ignore[arg-type]
            Route("GET", "/jobs", self.jobs, **page),  # type: ignore[arg-type]
            Route("POST", "/console/jobs/{job_id}/runtime", self.job_action, role="operator",
                  **page),  # type: ignore[arg-type]
            Route("GET", "/agents", self.agents, **page),  # type: ignore[arg-type]
            Route("GET", "/zones", self.zones, **page),  # type: ignore[arg-type]
            Route("POST", "/console/zones/{zone}", self.zone_action, role="admin", **page),  # type: ignore[arg-type]
            Route("GET", "/imports", self.imports, **page),  # type: ignore[arg-type]
            Route("GET", "/audit", self.audit, role="admin", **page),  # type: ignore[arg-type]
        ]

    def install(self, app: web.Application) -> None:
        self.env = aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(str(HERE / "templates")),
                                        autoescape=jinja2.select_autoescape(["html"]))
        add_routes(app, self.routes())
        app.router.add_static("/static/", STATIC, append_version=False)

        async def stop(_app: web.Application) -> None:
            await self.live.stop()

        app.on_shutdown.append(stop)

    def ctx(self, request: web.Request, **more: Any) -> dict[str, Any]:
        return {"ident": request.get(IDENTITY), "nav": NAV, "path": request.path, "server": self.api.server,
                "vendor": (STATIC / "vendor" / "pico.min.css").exists(), **more}

    def render(self, name: str, request: web.Request, **more: Any) -> web.Response:
        return aiohttp_jinja2.render_template(name, request, self.ctx(request, **more))

    def fragment(self, name: str, **ctx: Any) -> str:
        assert self.env is not None
        return self.env.get_template(name).render(**ctx)

    # ---- login / logout ---------------------------------------------------------------------------------------
    async def login_page(self, request: web.Request, _call: Call, *, error: str = "", status: int = 200,
                         user: str = "") -> web.Response:
        token = secrets.token_urlsafe(24)
        resp = self.render("login.html", request, error=error, csrf=token, user=user,
                           next=_safe_next(request.query.get("next", "/")))
        resp.set_status(status)
        resp.set_cookie(LOGIN_CSRF, token, httponly=True, samesite="Strict", secure=self.api.tls, path="/login",
                        max_age=3600)
        return resp

    async def login(self, request: web.Request, call: Call) -> web.StreamResponse:
        form = await request.post()
        user, password = str(form.get("user", ""))[:100], str(form.get("password", ""))
        sent, cookie = str(form.get("csrf", "")), request.cookies.get(LOGIN_CSRF, "")
        sec = self.api.security
        if not sent or not cookie or not hmac.compare_digest(sent, cookie):
            await sec.record(request, None, "login", "403", target=user, detail={"csrf": False})
            return await self.login_page(request, call, error="The form expired (CSRF check): please sign in again.",
                                         status=403, user=user)
        address = request.remote or ""
        try:
            pool = await self.api.db()
            async with pool.acquire(timeout=5) as conn:
                result = await auth.login(conn, user, password, address=address, server=self.api.server,
                                          ttl_s=self.api.topo.web.session_ttl_s)
                key = await sec.cookie_key(conn)
                ident = auth.Identity(user, result.role, "session") if result.ok and result.role else None
                action = "login" if result.ok else ("login_throttled" if result.throttled else "login_failed")
                await sec.record(request, ident, action, "ok" if result.ok else ("429" if result.throttled else "401"),
                                 target=user, detail={"reason": result.reason} if result.reason else {}, conn=conn)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            return await self.login_page(request, call, status=503, user=user,
                                         error=f"PostgreSQL is unreachable ({type(exc).__name__}): nobody can sign "
                                               "in until it is back; the other servers' consoles share it.")
        if result.throttled:
            return await self.login_page(request, call, status=429, user=user,
                                         error=f"Too many failed sign-ins for {user} from {address}: wait a "
                                               "minute and try again.")
        if not result.ok or result.session_id is None:
            return await self.login_page(request, call, status=401, user=user, error="Wrong user name or password.")
        resp = web.HTTPSeeOther(_safe_next(str(form.get("next", "/"))))
        sec.set_cookie(resp, key, result.session_id)
        resp.del_cookie(LOGIN_CSRF, path="/login")
        return resp

    async def logout(self, request: web.Request, call: Call) -> web.StreamResponse:
        ident = call.identity
        if ident is not None and ident.session_hash:
            pool = await self.api.db()
            async with pool.acquire(timeout=5) as conn:
                await auth.logout(conn, ident.session_hash)
        resp = web.HTTPSeeOther("/login")
        self.api.security.clear_cookie(resp)
        return resp

    # ---- overview, live -----------------------------------------------------------------------------------------
    async def components_html(self, conn: asyncpg.Connection) -> str:
        table = await read_table_conn(conn, [s.name for s in self.api.topo.servers])
        rows = []
        for name_row, service in zip(table.lines(5.0), _ordered(table.rows), strict=True):
            cells = []
            for server, text in zip(table.servers, name_row[1:], strict=True):
                kind = ("master" if text.startswith("MASTER") else "gone" if text.startswith("UNREACHABLE")
                        else "stopped" if text in ("STOPPED", "-") else "ok")
                cells.append({"text": text, "kind": kind, "server": server})
            rows.append({"name": name_row[0], "service": service, "cells": cells})
        return self.fragment("_components.html", servers=table.servers, rows=rows,
                             at=datetime.now(UTC).strftime("%H:%M:%S"))

    async def timeline_html(self, conn: asyncpg.Connection, limit: int = 30) -> str:
        events = await conn.fetch(
            "SELECT id, at, service, scope, server, kind, epoch, decision FROM ha_event"
            " WHERE kind IN ('acquired', 'took_over', 'released', 'lost', 'demoted', 'expired', 'stopped')"
            " ORDER BY id DESC LIMIT $1", limit)
        return self.fragment("_timeline.html", events=events, names=COMPONENTS)

    async def failovers(self, conn: asyncpg.Connection) -> list[dict[str, Any]]:
        rows = await conn.fetch(
            "SELECT id, at, service, scope, server, kind, decision, detail FROM ha_event"
            " WHERE kind IN ('acquired', 'took_over') AND at > now() - interval '1 hour'"
            "   AND detail ? 'previous_server' AND detail->>'previous_server' <> server ORDER BY id DESC LIMIT 100")
        out = []
        for r in rows:
            detail = json.loads(r["detail"]) if isinstance(r["detail"], str) else dict(r["detail"])
            gap = detail.get("gap_ms")
            pom = POM_FAILOVER_S.get(r["service"])
            out.append({"at": r["at"], "role": COMPONENTS.get(r["service"], r["service"]),
                        "scope": r["scope"] or "-", "from": detail.get("previous_server"), "to": r["server"],
                        "gap_ms": gap, "pom_s": pom, "cause": r["decision"],
                        "ratio": round(pom * 1000 / gap) if gap and pom else None})
        return out

    async def servers_html(self) -> str:
        from pom_ha.infra.stack import Stack

        stack = Stack(self.api.topo)

        async def one(launcher: Any) -> dict[str, str]:
            host, port = launcher.listen_ports()[0]
            if not await asyncio.to_thread(_listening, host, port):
                role = "down (nothing listens)"  # no protocol probe (a Kafka client per dead broker is costly)
            else:
                try:
                    role = await asyncio.wait_for(launcher.role(), 2.0)
                except Exception as exc:  # a probe that fails says so; it never breaks the page
                    role = f"unknown ({type(exc).__name__})"
            return {"kind": launcher.kind, "server": getattr(launcher.server, "name", "-"),
                    "endpoint": f"{host}:{port}", "role": role}

        rows = await asyncio.gather(*(one(x) for x in stack.launchers()))
        return self.fragment("_servers.html", rows=sorted(rows, key=lambda r: (r["kind"], r["server"])))

    async def _with_conn(self, fn: Any, *args: Any) -> Any:
        pool = await self.api.db()
        try:
            async with pool.acquire(timeout=5) as conn:
                return await fn(conn, *args)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise ApiError(503, f"PostgreSQL unreachable ({type(exc).__name__}): the console shows live state "
                                "from it; static pages still work") from None

    async def overview(self, request: web.Request, _call: Call) -> web.Response:
        # the live poller's table when it is fresh (it refreshes every second and on every lease change)
        fresh = self.live.running() and time.monotonic() - self.live.refreshed_at < LIVE_POLL_S + 0.5
        components = self.live.last.get("components") if fresh else None
        if not components:
            components = await self._with_conn(self.components_html)
        return self.render("overview.html", request, components=components,
                           servers=self.live.last.get("servers", ""))

    async def events(self, request: web.Request, _call: Call) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        q = self.live.subscribe()
        try:
            for kind, data in list(self.live.last.items()):
                await resp.write(_sse(kind, data))
            while True:
                try:
                    kind, data = await asyncio.wait_for(q.get(), 15)
                except TimeoutError:
                    await resp.write(b": keepalive\n\n")
                    continue
                await resp.write(_sse(kind, data))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.live.subscribers.discard(q)
        return resp

    async def timeline(self, request: web.Request, _call: Call) -> web.Response:
        async def read(conn: asyncpg.Connection) -> tuple[str, list[dict[str, Any]], list[Any]]:
            points = await conn.fetch(
                "SELECT EXTRACT(EPOCH FROM at) AS t, service, scope, server, kind FROM ha_event"
                " WHERE at > now() - interval '1 hour' AND kind IN ('acquired', 'took_over', 'released', 'lost',"
                " 'expired') ORDER BY id LIMIT 2000")
            return await self.timeline_html(conn, 100), await self.failovers(conn), [dict(p) for p in points]

        events, failovers, points = await self._with_conn(read)
        return self.render("timeline.html", request, events=events, failovers=failovers,
                           points=json.dumps([{**p, "t": float(p["t"])} for p in points]))

    # ---- jobs ---------------------------------------------------------------------------------------------------
    async def jobs(self, request: web.Request, _call: Call) -> web.Response:
        rows = await self.api.fetch(self.api.JOBS_SQL + " ORDER BY j.id DESC LIMIT 200")
        trend = await self.api.fetch(
            "SELECT EXTRACT(EPOCH FROM date_trunc('minute', created_at)) AS t, count(*) AS attempts,"
            " count(*) FILTER (WHERE code = 'answer_human') AS answered,"
            " count(*) FILTER (WHERE code = 'nuisance') AS nuisance"
            " FROM attempts WHERE created_at > now() - interval '1 hour' GROUP BY 1 ORDER BY 1")
        return self.render("jobs.html", request, jobs=rows,
                           trend=json.dumps([[float(r["t"]), r["attempts"], r["answered"], r["nuisance"]]
                                             for r in trend]))

    async def job_action(self, request: web.Request, _call: Call) -> web.Response:
        """The console's pause / resume / pacing: the REST API's own validation model and code path."""

        form = await request.post()
        data: dict[str, Any] = {"action": form.get("action")}
        if form.get("action") == "pacing_rate":
            raw = str(form.get("value", "")).strip()
            try:
                data["value"] = float(raw) if raw else None
            except ValueError:
                data["value"] = raw
        try:
            job_id = JobPath.model_validate(dict(request.match_info)).job_id
            body = RuntimeBody.model_validate(data)
            out = await self.api.runtime_change(job_id, body)
        except ValidationError as exc:
            err = validation_error(exc, RuntimeBody.model_fields)
            return self._result(request, err.status, str(err), err.field)
        except ApiError as exc:
            return self._result(request, exc.status, str(exc), exc.field)
        if isinstance(out, web.Response):
            payload = json.loads(out.body) if isinstance(out.body, bytes) else {}
            return self._result(request, out.status, payload.get("error", "refused"), None)
        return self._result(request, 200, str(out["detail"]), None)

    def _result(self, request: web.Request, status: int, text: str, field: str | None) -> web.Response:
        resp = self.render("_result.html", request, ok=status < 300, status=status, text=text, field=field)
        # htmx swaps 2xx answers only; the refusal must be shown too, so it is answered 200 with the real
        # status in a header (the REST API answers the status itself)
        if request.headers.get("HX-Request"):
            resp.headers["X-Pom-Status"] = str(status)
        else:
            resp.set_status(status)
        return resp

    # ---- agents, zones, imports, audit -----------------------------------------------------------------------
    async def agents(self, request: web.Request, _call: Call) -> web.Response:
        rows = await self.api.fetch(
            "SELECT zone, agent_id, COALESCE(job_state, CASE WHEN logged_in THEN 'Idle' ELSE 'Logged out' END)"
            " AS state, logged_in, ready, call_state, job_id, nailed, failovers, ha_time_s FROM agents"
            " ORDER BY zone, agent_id LIMIT 2000")
        zones: dict[str, list[Any]] = {}
        for r in rows:
            zones.setdefault(r["zone"], []).append(r)
        return self.render("agents.html", request, zones=zones)

    async def zones(self, request: web.Request, _call: Call) -> web.Response:
        from pom_ha.zones.cli import apply_warning

        rows = await self.api.fetch(
            "SELECT z.name, z.allocated_server, (SELECT holder_server FROM ha_lease l WHERE l.service ="
            " 'agent_manager' AND l.scope = z.name AND l.expires_at > now() AND l.released_at IS NULL) AS master,"
            " (SELECT result FROM zone_apply_requests r WHERE r.zone = z.name ORDER BY id DESC LIMIT 1) AS result"
            " FROM zones z ORDER BY z.name")
        known = {r["name"]: r for r in rows}
        zones = [{"name": z.name, "allocated_server": known[z.name]["allocated_server"] if z.name in known else None,
                  "master": known[z.name]["master"] if z.name in known else None,
                  "result": known[z.name]["result"] if z.name in known else None,
                  "warning": apply_warning(z.name, "the chosen server")} for z in self.api.topo.zones]
        return self.render("zones.html", request, zones=zones, servers=[s.name for s in self.api.topo.servers])

    async def zone_action(self, request: web.Request, _call: Call) -> web.Response:

        form = await request.post()
        what = form.get("do")
        try:
            zone = ZonePath.model_validate(dict(request.match_info)).zone
            zone = self.api.known_zone(ZonePath(zone=zone).zone)
            if what == "save":
                server = ZoneSaveBody.model_validate({"server": form.get("server")}).server
                out = await self.api.save_zone(zone, server, who=_who(request))
            elif what == "apply":
                body = ZoneApplyBody.model_validate({"server": form.get("server"),
                                                     "confirm": form.get("confirm") == "yes"})
                out = await self.api.apply_zone_now(zone, body, who=_who(request))
            else:
                return self._result(request, 400, "do must be save or apply", "do")
        except ValidationError as exc:
            err = validation_error(exc, ("server", "confirm"))
            return self._result(request, err.status, str(err), err.field)
        except ApiError as exc:
            return self._result(request, exc.status, str(exc), exc.field)
        return self._result(request, 202 if out["applied"] else 200, str(out["detail"]), None)

    async def imports(self, request: web.Request, _call: Call) -> web.Response:
        rows = await self.api.fetch(
            "SELECT i.id, l.name AS list, i.source_kind, i.state, i.imported, i.rejected, i.error, i.scheduled_at,"
            " i.finished_at FROM data_imports i JOIN contact_lists l ON l.id = i.list_id ORDER BY i.id DESC LIMIT 200")
        return self.render("imports.html", request, imports=rows)

    async def audit(self, request: web.Request, _call: Call) -> web.Response:
        rows = await self.api.fetch("SELECT * FROM audit_log ORDER BY id DESC LIMIT 500")
        return self.render("audit.html", request, entries=rows)


def _listening(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _ordered(rows: dict[str, Any]) -> list[str]:
    names = list(COMPONENTS)
    return sorted(rows, key=lambda s: (names.index(s) if s in names else len(names), s))


def _sse(kind: str, data: str) -> bytes:
    lines = "".join(f"data: {line}\n" for line in (data.split("\n") if data else [""]))
    return f"event: {kind}\n{lines}\n".encode()


def _safe_next(value: str) -> str:
    """Only a local path (no scheme, no //host): an open redirect after login is refused."""
    if not value.startswith("/") or value.startswith("//") or "\\" in value or len(value) > 500:
        return "/"
    return value


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]
