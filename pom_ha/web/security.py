"""The auth middleware of the web daemon: every request is checked here, whatever route it goes to.

Order for each request:

1. Static files (the console's CSS/JS) and routes declared with ``role=None`` (the login page, the
   OpenAPI document is NOT one of them) pass. ``/healthz``, ``/health`` and ``/metrics`` pass for
   loopback clients when ``[web] open_health_on_loopback`` is on.
2. Otherwise an identity is needed: ``Authorization: Bearer pomt_...`` (an API token) or the signed
   ``pom_session`` cookie, both looked up in PostgreSQL on every request (a logout or a disable is
   effective at once on every server). None -> 401 (JSON for the API, the login page for the console).
   This includes paths no route matches, so the API's shape is not visible without a login.
3. The route's role (a route without a table row: ``viewer`` to read, ``admin`` to change) -> 403.
4. A state-changing request made with a session cookie needs the session's CSRF token
   (``X-CSRF-Token`` header, as htmx sends it, or the form's ``csrf`` field) -> 403.
5. Every state-changing request is written to the audit log with its result (the HTTP status); the
   body is never recorded.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import structlog
from aiohttp import web
from aiohttp.web_urldispatcher import StaticResource

from pom_ha.web import auth
from pom_ha.web.routes import IDENTITY, ApiError, Route, route_of

log = structlog.get_logger("pom_ha.web.security")
COOKIE = "pom_session"
OPEN_HEALTH = ("/healthz", "/health", "/metrics")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PoolGetter = Callable[[], Awaitable[asyncpg.Pool]]


def is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def wants_html(request: web.Request) -> bool:
    return not request.path.startswith("/v1/") and "text/html" in request.headers.get("Accept", "")


class Security:
    """Shared by the API and the console of one web daemon."""

    def __init__(self, pool: PoolGetter, server: str, *, tls: bool, open_health_on_loopback: bool,
                 session_ttl_s: float) -> None:
        self.pool = pool
        self.server = server
        self.tls = tls
        self.open_health_on_loopback = open_health_on_loopback
        self.session_ttl_s = session_ttl_s
        self._key: bytes | None = None

    async def cookie_key(self, conn: asyncpg.Connection) -> bytes:
        if self._key is None:
            self._key = await auth.cookie_key(conn)
        return self._key

    def set_cookie(self, resp: web.StreamResponse, key: bytes, session_id: str) -> None:
        resp.set_cookie(COOKIE, auth.sign(key, session_id), httponly=True, samesite="Strict", secure=self.tls,
                        path="/", max_age=int(self.session_ttl_s))

    def clear_cookie(self, resp: web.StreamResponse) -> None:
        resp.del_cookie(COOKIE, path="/")

    async def identify(self, request: web.Request, conn: asyncpg.Connection) -> auth.Identity | None:
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer":
                return None
            return await auth.token_identity(conn, token.strip())
        cookie = request.cookies.get(COOKIE)
        if not cookie:
            return None
        session_id = auth.unsign(await self.cookie_key(conn), cookie)
        return await auth.session_identity(conn, session_id) if session_id else None

    async def record(self, request: web.Request, ident: auth.Identity | None, action: str, result: str, *,
                     target: str = "", detail: dict[str, Any] | None = None,
                     conn: asyncpg.Connection | None = None) -> None:
        """One audit row; a database failure is logged, never raised (the answer is already decided)."""
        detail = dict(detail or {})
        if ident is not None and ident.token_prefix:
            detail["token"] = ident.token_prefix
        kwargs = {"actor": ident.user if ident else "-", "role": ident.role if ident else None,
                  "via": ident.via if ident else "anonymous", "address": request.remote or "",
                  "server": self.server, "action": action, "target": target, "result": result, "detail": detail}
        try:
            if conn is not None:
                await auth.audit(conn, **kwargs)  # type: ignore[arg-type]
            else:
                pool = await self.pool()
                async with pool.acquire(timeout=5) as c:
                    await auth.audit(c, **kwargs)  # type: ignore[arg-type]
        except (ApiError, OSError, TimeoutError, asyncpg.PostgresError) as exc:
            log.warning("audit entry not written", action=action, result=result, error=type(exc).__name__)

    async def authenticate(self, request: web.Request) -> auth.Identity | None:
        """The request's identity from its token or session (PostgreSQL); None when it has none valid."""
        try:
            pool = await self.pool()
            async with pool.acquire(timeout=5) as conn:
                return await self.identify(request, conn)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise ApiError(503, f"PostgreSQL unreachable ({type(exc).__name__}): sign-in and every page that "
                                "reads the platform's state need it; static pages still work") from None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        if isinstance(resource, StaticResource):
            return await handler(request)
        route = route_of(request)
        if route is not None and route.role is None:
            return await handler(request)
        if request.path in OPEN_HEALTH and self.open_health_on_loopback and is_loopback(request.remote):
            return await handler(request)
        ident = await self.authenticate(request)
        if ident is None:
            if wants_html(request):
                raise web.HTTPSeeOther(f"/login?next={request.path_qs}" if request.path != "/" else "/login")
            raise ApiError(401, "a valid session or API token is required (Authorization: Bearer <token>, "
                                "pom-ha token create)", details={"login": "/login"})
        request[IDENTITY] = ident
        needed = _needed_role(route, request)
        if not ident.allows(needed):
            if request.method != "GET":
                await self.record(request, ident, f"{request.method} {request.path}", "403",
                                  detail={"needed": needed})
            raise ApiError(403, f"{ident.user} ({ident.role}) may not {request.method} {request.path}: "
                                f"role {needed} needed", details={"needed_role": needed})
        if ident.via == "session" and request.method not in ("GET", "HEAD", "OPTIONS"):
            sent = request.headers.get("X-CSRF-Token")
            if sent is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
                form = await request.post()
                value = form.get("csrf")
                sent = value if isinstance(value, str) else None
            if not sent or not ident.csrf or not hmac.compare_digest(sent, ident.csrf):
                await self.record(request, ident, f"{request.method} {request.path}", "403", detail={"csrf": False})
                raise ApiError(403, "the CSRF token is missing or wrong: reload the page and try again",
                               field="csrf")
        if request.method in ("GET", "HEAD", "OPTIONS") or (route is not None and route.extra.get("no_audit")):
            return await handler(request)
        t0 = time.monotonic()
        status = 500
        try:
            resp = await handler(request)
            # the console answers htmx 200 with the real outcome in X-Pom-Status (htmx swaps 2xx only)
            status = int(resp.headers.get("X-Pom-Status", resp.status))
            return resp
        except ApiError as exc:
            status = exc.status
            raise
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            await self.record(request, ident, f"{request.method} {request.path}", str(status),
                              target=request.match_info.get("job_id") or request.match_info.get("zone") or "",
                              detail={"ms": round((time.monotonic() - t0) * 1000, 1)})


def _needed_role(route: Route | None, request: web.Request) -> auth.Role:
    if route is not None and route.role is not None:
        return route.role
    return "viewer" if request.method in ("GET", "HEAD", "OPTIONS") else "admin"
