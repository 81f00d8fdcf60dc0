"""The REST API's request and answer models, shared by the API (:mod:`pom_ha.web.app`) and the console
(:mod:`pom_ha.web.console`): the OpenAPI document is generated from them, and they validate every request."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, Strict, StrictBool

from pom_ha.web.auth import Role
from pom_ha.web.routes import IDENTITY, Body
from pom_ha.zones.cli import DEFAULT_GRACE_S

API_VERSION = "v1"
MAX_BODY_BYTES = 64 * 1024
DEFAULT_RUNTIME_TIMEOUT_S = 10.0
MAX_PACING_RATE = 100_000.0


def _in(name: str, low: float, high: float, *, low_open: bool = False) -> AfterValidator:
    bound = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"

    def check(v: float | None) -> float | None:
        if v is not None and (v > high or v < low or (low_open and v == low)):
            raise ValueError(f"{name} must be in {bound}, got {v:g}")
        return v

    return AfterValidator(check)


def _request_id(v: str | None) -> str | None:
    if v is not None and not (8 <= len(v) <= 64 and all(c.isascii() and (c.isalnum() or c in "_-") for c in v)):
        raise ValueError("request_id must be 8-64 characters of A-Z a-z 0-9 _ -")
    return v


def _job_id(v: Any) -> int:
    text = str(v)
    if isinstance(v, bool) or not text.isdigit() or not 1 <= int(text) <= 2**63 - 1:
        raise ValueError(f"job id must be a positive integer, got {v!r}")
    return int(text)


Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]


# ---- request models -------------------------------------------------------------------------------------------
class JobPath(Body):
    job_id: Annotated[int, BeforeValidator(_job_id), Field(ge=1, le=2**63 - 1)]


class ZonePath(Body):
    zone: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")


class RuntimeBody(Body):
    """A runtime change of a running job (the CLI's ``job set``)."""

    action: Literal["pacing_rate", "pause", "resume"]
    value: Annotated[Number | None, _in("value", 0, MAX_PACING_RATE, low_open=True),
                     Field(description="calls per second, pacing_rate only")] = None
    timeout_s: Annotated[Number | None, _in("timeout_s", 0.5, 300)] = None
    request_id: Annotated[str, AfterValidator(_request_id),
                          Field(json_schema_extra={"pattern": "^[A-Za-z0-9_-]{8,64}$"})] | None = None


class ZoneSaveBody(Body):
    """"Save": record the zone's allocation only."""

    server: Annotated[str, Strict()]


class ZoneApplyBody(Body):
    """"Save and Apply": every agent of the zone is logged out; needs ``confirm: true``."""

    server: Annotated[str, Strict()]
    confirm: StrictBool = False
    grace_s: Annotated[Number, _in("grace_s", 0, 600)] = DEFAULT_GRACE_S


class StatusQuery(Body):
    stale_after_s: Annotated[float, Field(allow_inf_nan=False), _in("stale_after_s", 0.5, 3600)] = 5.0


class ListQuery(Body):
    limit: Annotated[int, Field(ge=1, le=1000)] = 200


class AgentsQuery(ListQuery):
    zone: Annotated[str | None, Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")] = None


class EventsQuery(ListQuery):
    since_id: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0


# ---- response models ------------------------------------------------------------------------------------------
class Health(BaseModel):
    service: str
    server: str
    status: str
    database: str
    activemq_brokers: list[str]
    uptime_s: float
    counts: dict[str, int]


class Member(BaseModel):
    state: str
    scopes: list[str]
    load: int
    seen_s_ago: float
    stale: bool
    shown: str = Field(description="the cell as the monitor shows it: what the leases say")


class Lease(BaseModel):
    service: str
    scope: str
    holder_server: str | None
    epoch: int
    live: bool
    acquired_at: datetime | None
    expires_at: datetime | None


class StatusTable(BaseModel):
    servers: list[str]
    components: dict[str, dict[str, Member]]
    leases: list[Lease]


class RuntimeResult(BaseModel):
    job_id: int
    action: str
    value: float | None
    request_id: str
    owner_server: str | None
    status: str
    applied: bool
    detail: str
    cm_server: str | None
    cm_instance: str | None


class Allocation(BaseModel):
    zone: str
    allocated_server: str | None
    last_apply: dict[str, Any] | None


class ZoneSaved(BaseModel):
    zone: str
    allocated_server: str
    previous: str | None
    applied: bool
    detail: str


class ZoneApplied(ZoneSaved):
    apply_id: int


class Me(BaseModel):
    user: str
    role: Role
    via: str
    csrf: str | None = Field(None, description="the session's CSRF token (send it as X-CSRF-Token)")


class Job(BaseModel):
    id: int
    campaign: str
    zone: str
    state: str
    state_reason: str | None
    pacing_rate: float | None
    owner_server: str | None
    contacts: int
    done: int
    attempts: int
    answered: int
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None


class Jobs(BaseModel):
    jobs: list[Job]


class Agent(BaseModel):
    zone: str
    agent_id: str
    state: str
    logged_in: bool
    ready: bool
    call_state: str
    job_id: str | None
    nailed: bool
    failovers: int
    ha_time_s: float
    updated_at: datetime


class Agents(BaseModel):
    agents: list[Agent]


class Import(BaseModel):
    id: int
    list: str
    source_kind: str
    state: str
    imported: int
    rejected: int
    error: str | None
    scheduled_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class Imports(BaseModel):
    imports: list[Import]


class HaEvent(BaseModel):
    id: int
    at: datetime
    service: str
    scope: str
    server: str
    kind: str
    epoch: int | None
    decision: str
    detail: dict[str, Any]


class HaEvents(BaseModel):
    events: list[HaEvent]


class AuditEntry(BaseModel):
    id: int
    at: datetime
    actor: str
    role: str | None
    via: str
    address: str
    server: str
    action: str
    target: str
    result: str
    detail: dict[str, Any]


class AuditLog(BaseModel):
    entries: list[AuditEntry]


# ---- the application ------------------------------------------------------------------------------------------


def who(request: web.Request) -> str:
    ident = request.get(IDENTITY)
    peer = request.remote or "?"
    return (f"rest-api {ident.user} {peer}" if ident else f"rest-api {peer}")[:200]
