"""REST routes of campaign administration (``/v1/campaigns``, ``/v1/lists``, ``/v1/dnc``, ``/v1/strategies``,
``/v1/schedules``, ``/v1/calendars``) as a declarative table over :mod:`pom_ha.campaign.service`.

Each :class:`AdminRoute` row names method, path, handler, the pydantic model of its JSON body (and of its
query), the model of its answer and the role it needs: ``viewer`` for reads, ``operator`` for changes,
``admin`` for deletions. ``ROUTES`` turns the rows into the web layer's :class:`~pom_ha.web.routes.Route`s; the field
names follow the web layer's ``Route`` (pom_ha/web/routes.py of the console work) so the auth middleware and
the OpenAPI document can take the same rows.

Answers: 200/201 with the response model as JSON; a refusal is ``{"error", "field"?}`` with 400 (invalid
input, naming the field and value), 404 (no such campaign/list/...), 409 (conflict: exists, in use, a job
runs) or 503 (database unreachable; nothing was done).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg
from aiohttp import web
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from pom_ha.campaign import admin
from pom_ha.campaign import service as svc
from pom_ha.domain.campaigns import InvalidCampaign
from pom_ha.domain.contact_strategy import InvalidSpec
from pom_ha.web.routes import API_KEY, ApiError, Route
from pom_ha.web.routes import Call as WebCall

Role = Literal["viewer", "operator", "admin"]


@dataclass
class Call:
    """What a handler gets: validated body and query (or None), path parameters, a database connection."""

    conn: Any
    params: dict[str, str]
    body: Any = None
    query: Any = None


Handler = Callable[[Call], Awaitable[Any]]


@dataclass(frozen=True)
class AdminRoute:
    method: str
    path: str
    handler: Handler
    request: type[BaseModel] | None
    response: type[BaseModel] | None
    role: Role
    query: type[BaseModel] | None = None
    status: int = 200
    summary: str = ""
    tags: tuple[str, ...] = ("administration",)
    content_type: str = "application/json"
    extra: dict[str, Any] = field(default_factory=dict)


class AdminHttpError(Exception):
    def __init__(self, status: int, message: str, field_name: str | None = None) -> None:
        super().__init__(message)
        self.status, self.field = status, field_name


# ---- response models for collections and plain results ---------------------------------------------------
class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class CampaignList(BaseModel):
    campaigns: list[svc.CampaignSummary]


class ListList(BaseModel):
    lists: list[svc.ListSummary]


class DncListList(BaseModel):
    dnc_lists: list[svc.DncSummary]


class StrategyList(BaseModel):
    strategies: list[svc.StrategySummary]


class ScheduleList(BaseModel):
    schedules: list[svc.ScheduleSummary]


class Contacts(BaseModel):
    contacts: list[dict[str, Any]]


class Done(_Open):
    """The outcome of a change (deleted, added, removed ... counts), free-form."""


class StrategyEdited(BaseModel):
    strategy: dict[str, Any]
    detail: str


class Calendar(_Open):
    id: int
    name: str


class Queued(BaseModel):
    kind: str
    id: int
    detail: str


class Archive(BaseModel):
    model_config = ConfigDict(extra="forbid")
    archived: bool = True


class ListQuery(BaseModel):
    include_archived: bool = False


class ContactQuery(BaseModel):
    id: str | None = None
    phone: str | None = None
    limit: int = Field(100, ge=1, le=10_000)


class DncCheckQuery(BaseModel):
    number: str
    campaign: str | None = None
    region: str | None = None


class StrategyEdit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spec: dict[str, Any] = Field(description="StrategySpec fields to change")


class ImportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    csv_path: str | None = Field(None, description="absolute path of a CSV file the Common CD can read")
    table: str | None = None
    at: AwareDatetime | None = None
    zone: str | None = None


# ---- handlers ---------------------------------------------------------------------------------------------
def _p(call: Call, name: str = "name") -> str:
    return call.params[name]


async def _list_campaigns(c: Call) -> CampaignList:
    return CampaignList(campaigns=await svc.list_campaigns(c.conn, include_archived=c.query.include_archived))


async def _create_campaign(c: Call) -> svc.CampaignSummary:
    return await svc.create_campaign(c.conn, c.body)


async def _show_campaign(c: Call) -> svc.CampaignSummary:
    return await svc.show_campaign(c.conn, _p(c))


async def _edit_campaign(c: Call) -> svc.CampaignSummary:
    return await svc.edit_campaign(c.conn, _p(c), c.body)


async def _archive_campaign(c: Call) -> svc.CampaignSummary:
    return await svc.archive_campaign(c.conn, _p(c), archived=c.body.archived)


async def _delete_campaign(c: Call) -> Done:
    return Done(**await svc.delete_campaign(c.conn, _p(c)))


async def _list_lists(c: Call) -> ListList:
    return ListList(lists=await svc.list_lists(c.conn))


async def _create_list(c: Call) -> svc.ListSummary:
    return await svc.create_list(c.conn, c.body)


async def _show_list(c: Call) -> svc.ListSummary:
    return await svc.show_list(c.conn, _p(c))


async def _delete_list(c: Call) -> Done:
    return Done(**await svc.delete_list(c.conn, _p(c)))


async def _find_contacts(c: Call) -> Contacts:
    q = c.query
    if q.id is None and q.phone is None:
        raise AdminHttpError(400, "give id or phone", "id")
    return Contacts(contacts=await svc.find_contacts(c.conn, _p(c), contact_id=q.id, phone=q.phone, limit=q.limit))


async def _export_list(c: Call) -> web.Response:
    return web.Response(text=await svc.export_list(c.conn, _p(c)), content_type="text/csv")


async def _import_list(c: Call) -> Queued:
    b = c.body
    made = await admin.queue_import(c.conn, _p(c), csv_path=b.csv_path, table=b.table, at=b.at, zone=b.zone)
    return Queued(kind=made.kind, id=made.id, detail=made.detail)


async def _list_dnc(c: Call) -> DncListList:
    return DncListList(dnc_lists=await svc.list_dnc(c.conn))


async def _create_dnc(c: Call) -> svc.DncSummary:
    return await svc.create_dnc(c.conn, c.body)


async def _show_dnc(c: Call) -> svc.DncSummary:
    return await svc.show_dnc(c.conn, _p(c))


async def _delete_dnc(c: Call) -> Done:
    return Done(**await svc.delete_dnc(c.conn, _p(c)))


async def _add_dnc(c: Call) -> Done:
    return Done(**await svc.add_dnc_numbers(c.conn, _p(c), c.body))


async def _remove_dnc(c: Call) -> Done:
    return Done(**await svc.remove_dnc_numbers(c.conn, _p(c), c.body))


async def _export_dnc(c: Call) -> web.Response:
    phones = await svc.export_dnc(c.conn, _p(c))
    return web.Response(text="".join(p + "\n" for p in phones), content_type="text/plain")


async def _check_dnc(c: Call) -> svc.DncCheck:
    q = c.query
    return await svc.check_dnc(c.conn, q.number, campaign=q.campaign, default_region=q.region)


async def _list_strategies(c: Call) -> StrategyList:
    return StrategyList(strategies=await svc.list_strategies(c.conn))


async def _create_strategy(c: Call) -> svc.StrategySummary:
    return await svc.create_strategy(c.conn, c.body)


async def _show_strategy(c: Call) -> svc.StrategySummary:
    return await svc.show_strategy(c.conn, _p(c))


async def _edit_strategy(c: Call) -> StrategyEdited:
    return StrategyEdited(**await svc.edit_strategy(c.conn, _p(c), c.body.spec))


async def _delete_strategy(c: Call) -> Done:
    return Done(**await svc.delete_strategy(c.conn, _p(c)))


async def _list_schedules(c: Call) -> ScheduleList:
    return ScheduleList(schedules=await svc.list_schedules(c.conn))


async def _create_schedule(c: Call) -> svc.ScheduleSummary:
    return await svc.create_schedule(c.conn, c.body)


async def _show_schedule(c: Call) -> svc.ScheduleSummary:
    return await svc.show_schedule(c.conn, _p(c))


async def _delete_schedule(c: Call) -> Done:
    return Done(**await svc.delete_schedule(c.conn, _p(c)))


async def _create_calendar(c: Call) -> Calendar:
    return Calendar(**await svc.create_calendar(c.conn, c.body))


V = "/v1"
ADMIN_ROUTES: tuple[AdminRoute, ...] = (
    AdminRoute("GET", f"{V}/campaigns", _list_campaigns, None, CampaignList, "viewer", query=ListQuery,
               summary="List campaigns"),
    AdminRoute("POST", f"{V}/campaigns", _create_campaign, svc.CampaignCreate, svc.CampaignSummary, "operator",
               status=201, summary="Create a campaign (definition, zone, strategy, DNC lists)"),
    AdminRoute("GET", f"{V}/campaigns/{{name}}", _show_campaign, None, svc.CampaignSummary, "viewer",
               summary="Show a campaign"),
    AdminRoute("PATCH", f"{V}/campaigns/{{name}}", _edit_campaign, svc.CampaignEdit, svc.CampaignSummary, "operator",
               summary="Edit a campaign (refused while a job runs, except its DNC lists)"),
    AdminRoute("POST", f"{V}/campaigns/{{name}}/archive", _archive_campaign, Archive, svc.CampaignSummary,
               "operator", summary="Archive (or restore) a campaign"),
    AdminRoute("DELETE", f"{V}/campaigns/{{name}}", _delete_campaign, None, Done, "admin",
               summary="Delete a campaign (refused while a job runs)"),
    AdminRoute("GET", f"{V}/lists", _list_lists, None, ListList, "viewer", summary="List contact lists"),
    AdminRoute("POST", f"{V}/lists", _create_list, svc.ListCreate, svc.ListSummary, "operator", status=201,
               summary="Create a contact list"),
    AdminRoute("GET", f"{V}/lists/{{name}}", _show_list, None, svc.ListSummary, "viewer",
               summary="Show a contact list with counts by state"),
    AdminRoute("DELETE", f"{V}/lists/{{name}}", _delete_list, None, Done, "admin", summary="Delete a contact list"),
    AdminRoute("GET", f"{V}/lists/{{name}}/contacts", _find_contacts, None, Contacts, "viewer", query=ContactQuery,
               summary="Find contacts by id or number"),
    AdminRoute("GET", f"{V}/lists/{{name}}/export", _export_list, None, None, "viewer", content_type="text/csv",
               summary="Export a contact list as CSV"),
    AdminRoute("POST", f"{V}/lists/{{name}}/imports", _import_list, ImportRequest, Queued, "operator", status=202,
               summary="Queue an import (CSV file or table) into a contact list"),
    AdminRoute("GET", f"{V}/dnc", _list_dnc, None, DncListList, "viewer", summary="List DNC lists"),
    AdminRoute("POST", f"{V}/dnc", _create_dnc, svc.DncCreate, svc.DncSummary, "operator", status=201,
               summary="Create a DNC list"),
    AdminRoute("GET", f"{V}/dnc-check", _check_dnc, None, svc.DncCheck, "viewer", query=DncCheckQuery,
               summary="Is a number blocked, and by which DNC lists"),
    AdminRoute("GET", f"{V}/dnc/{{name}}", _show_dnc, None, svc.DncSummary, "viewer", summary="Show a DNC list"),
    AdminRoute("DELETE", f"{V}/dnc/{{name}}", _delete_dnc, None, Done, "admin", summary="Delete a DNC list"),
    AdminRoute("POST", f"{V}/dnc/{{name}}/numbers", _add_dnc, svc.DncNumbers, Done, "operator",
               summary="Add numbers (all or nothing)"),
    AdminRoute("POST", f"{V}/dnc/{{name}}/numbers/remove", _remove_dnc, svc.DncNumbers, Done, "operator",
               summary="Remove numbers"),
    AdminRoute("GET", f"{V}/dnc/{{name}}/export", _export_dnc, None, None, "viewer", content_type="text/plain",
               summary="Export a DNC list, one E.164 number a line"),
    AdminRoute("GET", f"{V}/strategies", _list_strategies, None, StrategyList, "viewer",
               summary="List contact strategies"),
    AdminRoute("POST", f"{V}/strategies", _create_strategy, svc.StrategyCreate, svc.StrategySummary, "operator",
               status=201, summary="Create a contact strategy (defaults from pim_config)"),
    AdminRoute("GET", f"{V}/strategies/{{name}}", _show_strategy, None, svc.StrategySummary, "viewer",
               summary="Show a contact strategy"),
    AdminRoute("PATCH", f"{V}/strategies/{{name}}", _edit_strategy, StrategyEdit, StrategyEdited, "operator",
               summary="Edit a contact strategy (says when each part applies)"),
    AdminRoute("DELETE", f"{V}/strategies/{{name}}", _delete_strategy, None, Done, "admin",
               summary="Delete a contact strategy (refused while used)"),
    AdminRoute("GET", f"{V}/schedules", _list_schedules, None, ScheduleList, "viewer", summary="List schedules"),
    AdminRoute("POST", f"{V}/schedules", _create_schedule, svc.ScheduleCreate, svc.ScheduleSummary, "operator",
               status=201, summary="Create a recurring campaign start (rrule or cron, zone, holiday calendar)"),
    AdminRoute("GET", f"{V}/schedules/{{name}}", _show_schedule, None, svc.ScheduleSummary, "viewer",
               summary="Show a schedule"),
    AdminRoute("DELETE", f"{V}/schedules/{{name}}", _delete_schedule, None, Done, "admin",
               summary="Cancel a schedule"),
    AdminRoute("POST", f"{V}/calendars", _create_calendar, svc.CalendarCreate, Calendar, "operator", status=201,
               summary="Create a holiday calendar"),
)


# ---- registration: the web layer's route table (pom_ha/web/routes.py) ------------------------------------
def _as_route(row: AdminRoute) -> Route:
    """One table row as a :class:`~pom_ha.web.routes.Route`: the web layer validates body and query with the
    row's models, checks the role and documents it in OpenAPI; this wrapper gives the handler a database
    connection and turns the service layer's refusals into the API's errors."""

    async def handle(request: web.Request, call: WebCall) -> Any:
        api = request.app[API_KEY]
        try:
            pool = await api.db()
            async with pool.acquire(timeout=5) as conn:
                return await row.handler(Call(conn, dict(request.match_info), call.body, call.query))
        except AdminHttpError as exc:
            raise ApiError(exc.status, str(exc), field=exc.field) from None
        except InvalidSpec as exc:
            raise ApiError(400, str(exc), field=exc.errors[0][0] if exc.errors else None) from None
        except InvalidCampaign as exc:
            raise ApiError(400, str(exc), field=exc.errors[0].field if exc.errors else None) from None
        except admin.AdminError as exc:
            raise ApiError(404 if exc.kind == "not_found" else 409, str(exc)) from None
        except asyncpg.IntegrityConstraintViolationError as exc:  # a name taken, a row still referenced
            raise ApiError(409, f"refused by the database: {exc}; nothing was done") from None
        except asyncpg.DataError as exc:  # e.g. a NUL character, which PostgreSQL text cannot hold
            raise ApiError(400, f"invalid value: {exc}; nothing was done") from None
        except (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise ApiError(503, f"PostgreSQL unreachable ({type(exc).__name__}); nothing was done") from None

    handle.__name__ = row.handler.__name__.lstrip("_")
    handle.__doc__ = row.summary
    return Route(row.method, row.path, handle, request=row.request, response=row.response, role=row.role,
                 query=row.query, status=row.status, summary=row.summary, tags=row.tags,
                 content_type=row.content_type, errors=(400, 404, 409, 503), extra=row.extra)


ROUTES: list[Route] = [_as_route(r) for r in ADMIN_ROUTES]


def routes_by_role() -> dict[str, list[str]]:
    """``{role: ["METHOD path", ...]}`` (for documentation and tests)."""
    out: dict[str, list[str]] = {}
    for r in ADMIN_ROUTES:
        out.setdefault(r.role, []).append(f"{r.method} {r.path}")
    return out
