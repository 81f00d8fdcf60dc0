"""Declarative routes: one table row per endpoint, carrying its models and the role it needs.

A :class:`Route` names method, path, handler, the pydantic models of its JSON body, query and path
parameters and of its answer, and the role it requires (``None``: open, e.g. the login page and static
files). :func:`add_routes` registers rows on an aiohttp application; the same rows feed

* the request wrapper, which validates body/query/path with the models before the handler runs (a
  refusal is ``400 {"error", "field"}`` naming the field) and validates the handler's answer against the
  response model, so what is served is what is documented;
* :func:`openapi_document`, the OpenAPI 3.1 document served at ``/v1/openapi.json``;
* the auth middleware (:mod:`pom_ha.web.security`), which looks every request's route up in the table:
  a route registered without a row still needs a signed-in user (there is no way to forget auth).

A module adding endpoints writes ``ROUTES = [Route("GET", "/v1/things", list_things, response=Things,
role="viewer"), ...]`` and the application adds it with ``add_routes(app, ROUTES)``.
Handlers are ``async def handler(request, call) -> BaseModel | dict | web.StreamResponse``; ``call.body``,
``call.query`` and ``call.params`` are the validated models (or ``None``), ``call.identity`` who asks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

from pom_ha.web.auth import Identity, Role

ROUTES_KEY: web.AppKey[dict[tuple[str, str], Route]] = web.AppKey("pom_routes", dict)
IDENTITY: web.RequestKey[Identity] = web.RequestKey("pom_identity", Identity)
# the application's RestApi (pom_ha.web.app): handlers of any route table reach the database through it,
# ``request.app[API_KEY].fetch(sql, ...)`` / ``await request.app[API_KEY].db()`` (an asyncpg pool)
API_KEY: web.AppKey[Any] = web.AppKey("pom_rest_api")
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?\}")


class ApiError(Exception):
    """A refused request: HTTP status, message and (when one is to blame) the field."""

    def __init__(self, http_status: int, message: str, *, field: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.field, self.extra = http_status, field, details or {}


class ErrorBody(BaseModel):
    """Every refusal: ``error`` says what is wrong, ``field`` names the culprit when there is one."""

    model_config = ConfigDict(extra="allow")
    error: str
    field: str | None = None


class Body(BaseModel):
    """Base of request models: unknown fields are refused by name."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Call:
    body: Any = None
    query: Any = None
    params: Any = None
    identity: Identity | None = None


Handler = Callable[[web.Request, Call], Awaitable[Any]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    role: Role | None = "viewer"
    query: type[BaseModel] | None = None
    params: type[BaseModel] | None = None
    status: int = 200
    summary: str = ""
    tags: tuple[str, ...] = ()
    errors: tuple[int, ...] = (400, 404, 409, 503)
    # documented in the OpenAPI document (console pages and static files are not)
    api: bool = True
    # open without a session or token to loopback clients when [web] open_health_on_loopback is on
    loopback_open: bool = False
    content_type: str = "application/json"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def state_changing(self) -> bool:
        return self.method not in ("GET", "HEAD", "OPTIONS")


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers, dumps=lambda o: json.dumps(o, default=str))


def _loc(err: Any) -> str:
    return ".".join(str(p) for p in err["loc"]) or "body"


def validation_error(exc: ValidationError, allowed: Iterable[str] = ()) -> ApiError:
    """The first problem of a pydantic error as an ApiError naming the field, in the API's own words."""
    errs = exc.errors()
    extra = [_loc(e) for e in errs if e["type"] == "extra_forbidden"]
    if extra:
        return ApiError(400, f"unknown field(s) {', '.join(sorted(extra))}; allowed: {', '.join(sorted(allowed))}",
                        field=sorted(extra)[0])
    e = errs[0]
    name, kind = _loc(e), e["type"]
    got = json.dumps(e.get("input"), default=str)
    if kind == "missing":
        text = f"{name} is required"
    elif kind == "literal_error":
        expected = str(e["ctx"]["expected"]).replace("'", "").replace(" or ", ", ")
        text = f"{name} must be one of {expected}, got {got}"
    elif kind in ("value_error", "assertion_error"):
        text = str(e["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    elif kind in ("int_parsing", "int_type", "int_from_float"):
        text = f"{name} must be an integer, got {got}"
    elif kind in ("float_parsing", "float_type", "finite_number"):
        text = f"{name} must be a number, got {got}"
    elif kind in ("bool_parsing", "bool_type"):
        text = f"{name} must be true or false, got {got}"
    else:
        text = f"{name}: {str(e['msg']).lower()}, got {got}"
    return ApiError(400, text, field=name.split(".")[0])


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        raise ApiError(400, "the request needs a JSON object body", field="body")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", field="body") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}", field="body")
    return data


def _validate(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, model.model_fields) from None


def _wrap(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        call = Call(identity=request.get(IDENTITY))
        if route.params is not None:
            call.params = _validate(route.params, dict(request.match_info))
        if route.query is not None:
            call.query = _validate(route.query, dict(request.query))
        if route.request is not None:
            call.body = _validate(route.request, await _json_body(request))
        out = await route.handler(request, call)
        if isinstance(out, web.StreamResponse):
            return out
        if route.response is not None:
            out = route.response.model_validate(out) if not isinstance(out, route.response) else out
            return json_response(route.status, out.model_dump(mode="json"))
        return json_response(route.status, out)

    handle.__name__ = getattr(route.handler, "__name__", "handle")
    return handle


def add_routes(app: web.Application, routes: Iterable[Route]) -> None:
    """Register table rows on ``app`` (their handlers wrapped with validation) and remember them for auth
    and for the OpenAPI document."""
    if ROUTES_KEY not in app:
        app[ROUTES_KEY] = {}
    table = app[ROUTES_KEY]
    for route in routes:
        key = (route.method, route.path)
        if key in table:
            raise ValueError(f"route {route.method} {route.path} declared twice")
        table[key] = route
        app.router.add_route(route.method, route.path, _wrap(route))


def route_of(request: web.Request) -> Route | None:
    """The table row of a matched request (``None`` for unmatched paths and routes added without a row)."""
    info = request.match_info.route
    resource = info.resource
    if resource is None:
        return None
    method = "GET" if request.method == "HEAD" else request.method
    return request.app.get(ROUTES_KEY, {}).get((method, resource.canonical))


# ---- OpenAPI 3.1 ----------------------------------------------------------------------------------------------
_REASONS = {200: "OK", 201: "Created", 202: "Accepted", 400: "Bad input (the field is named)",
            401: "No valid session or token", 403: "The role does not allow it (or the CSRF token is missing)",
            404: "Unknown resource", 409: "Refused in the current state", 429: "Too many failed logins",
            503: "A dependency did not answer; nothing was done"}


def openapi_document(routes: Iterable[Route], *, title: str, version: str,
                     server_url: str | None = None) -> dict[str, Any]:
    """OpenAPI 3.1 from the route table: request bodies, parameters and answers are the models' JSON
    Schemas (pydantic emits JSON Schema 2020-12, the dialect of OpenAPI 3.1)."""
    components: dict[str, Any] = {}
    ref = "#/components/schemas/{model}"

    def schema(model: type[BaseModel], mode: str = "validation") -> dict[str, Any]:
        s = model.model_json_schema(ref_template=ref, mode=mode)  # type: ignore[arg-type]
        for name, sub in s.pop("$defs", {}).items():
            components[name] = sub
        components[model.__name__] = s
        return {"$ref": ref.format(model=model.__name__)}

    error_ref = schema(ErrorBody, "serialization")
    paths: dict[str, Any] = {}
    for r in routes:
        if not r.api:
            continue
        op: dict[str, Any] = {"operationId": f"{r.method.lower()}_{re.sub(r'[^A-Za-z0-9]+', '_', r.path).strip('_')}",
                              "summary": r.summary or (r.handler.__doc__ or "").strip().split("\n")[0],
                              "tags": list(r.tags)}
        params: list[dict[str, Any]] = []
        names = _PARAM.findall(r.path)
        pschema = r.params.model_json_schema(ref_template=ref)["properties"] if r.params else {}
        for n in names:
            params.append({"name": n, "in": "path", "required": True, "schema": pschema.get(n, {"type": "string"})})
        if r.query is not None:
            qs = r.query.model_json_schema(ref_template=ref)
            for n, s in qs.get("properties", {}).items():
                params.append({"name": n, "in": "query", "required": n in qs.get("required", []), "schema": s})
        if params:
            op["parameters"] = params
        if r.request is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema(r.request)}}}
        ok: dict[str, Any] = {"description": _REASONS.get(r.status, "OK")}
        if r.response is not None:
            ok["content"] = {r.content_type: {"schema": schema(r.response, "serialization")}}
        elif r.content_type != "application/json":
            ok["content"] = {r.content_type: {"schema": {"type": "string"}}}
        else:
            ok["content"] = {r.content_type: {"schema": {"type": "object"}}}
        responses: dict[str, Any] = {str(r.status): ok}
        errors = set(r.errors) | ({400} if (r.request or r.query or r.params) else set())
        if r.role is not None:
            errors |= {401, 403} if r.role != "viewer" or r.state_changing else {401}
        for code in sorted(errors):
            responses[str(code)] = {"description": _REASONS.get(code, "Refused"),
                                    "content": {"application/json": {"schema": error_ref}}}
        op["responses"] = responses
        if r.role is not None:
            op["security"] = [{"bearer": []}, {"session": []}]
            op["x-required-role"] = r.role
        paths.setdefault(r.path, {})[r.method.lower()] = op
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "pom-ha REST API. Every endpoint needs `Authorization: Bearer <token>` "
                                "(`pom-ha token create`) or a console session; see docs/rest-api.md."},
        "paths": paths,
        "components": {"schemas": dict(sorted(components.items())), "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "pom-ha token create --user U --role R"},
            "session": {"type": "apiKey", "in": "cookie", "name": "pom_session"}}},
    }
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc
