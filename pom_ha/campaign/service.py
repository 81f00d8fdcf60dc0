"""The campaign administration service: every operator operation on campaigns, contact lists, DNC lists,
contact strategies, holiday calendars and recurring schedules, validated by pydantic models.

The CLI (:mod:`pom_ha.campaign.admin_cli`) and the REST API (:mod:`pom_ha.web.admin_routes`) call these
functions and nothing else, so an operation is implemented once. Each function takes an asyncpg
connection and a validated request model, writes in ONE transaction (a refusal leaves nothing behind) and
returns plain JSON-able data. A refusal is :class:`pom_ha.campaign.admin.AdminError` (``kind`` says
whether it is a missing thing, a conflict or bad input, for the HTTP status); invalid input is
:class:`pom_ha.domain.contact_strategy.InvalidSpec` naming each field and value.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, date, datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from pom_ha.campaign.admin import AdminError
from pom_ha.campaign.recurrence import HolidayCalendar, Recurrence, RecurrenceError
from pom_ha.domain.campaigns import validate_campaign
from pom_ha.domain.contact_strategy import InvalidSpec, StrategySpec, default_week, validate_strategy, validation_errors
from pom_ha.domain.contacts import ContactRejected
from pom_ha.domain.phones import mask, parse_phone, valid_region

NAME = r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}$"


class NotFound(AdminError):
    kind = "not_found"


class Conflict(AdminError):
    kind = "conflict"


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, allow_inf_nan=False)


def parse(model: type[Any], data: Any, what: str) -> Any:
    """``data`` validated as ``model``, or :class:`InvalidSpec` naming every bad field and value."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_errors(what, exc) from None


# ---- campaigns ------------------------------------------------------------------------------------------
class CampaignEdit(_Req):
    """Fields of a campaign an operator may change (absent: unchanged)."""

    name: str | None = Field(None, pattern=NAME)
    strategy: str | None = Field(None, description="contact strategy name; '' detaches it")
    pacing: dict[str, Any] | None = None
    finish: dict[str, Any] | None = None
    zone: str | None = Field(None, min_length=1, max_length=64)
    dnc_lists: list[str] | None = Field(None, description="the campaign's own DNC lists (global ones always apply)")


class CampaignSummary(BaseModel):
    id: int
    name: str
    zone: str
    contact_list: str
    strategy: str | None
    dnc_lists: list[str]
    archived: bool
    active_job: int | None
    active_state: str | None
    definition: dict[str, Any]


async def _campaign_row(conn: Any, name: str) -> Any:
    row = await conn.fetchrow(
        "SELECT c.id, c.name, c.zone, c.definition::text AS definition, c.archived_at, s.name AS strategy,"
        " (SELECT array_agg(d.name ORDER BY d.name) FROM campaign_dnc cd JOIN dnc_lists d ON d.id = cd.list_id"
        "  WHERE cd.campaign_id = c.id) AS dnc_lists,"
        " j.id AS job_id, j.state AS job_state FROM campaigns c"
        " LEFT JOIN contact_strategies s ON s.id = c.strategy_id"
        " LEFT JOIN LATERAL (SELECT id, state FROM jobs WHERE campaign_id = c.id AND state NOT IN"
        "   ('Completed', 'Stopped') ORDER BY id DESC LIMIT 1) j ON true WHERE c.name = $1", name)
    if row is None:
        raise NotFound(f"no campaign named {name!r}")
    return row


def _summary(row: Any) -> CampaignSummary:
    definition = json.loads(row["definition"])
    return CampaignSummary(
        id=row["id"], name=row["name"], zone=row["zone"], contact_list=definition.get("contact_list", ""),
        strategy=row["strategy"], dnc_lists=list(row["dnc_lists"] or []), archived=row["archived_at"] is not None,
        active_job=row["job_id"], active_state=row["job_state"], definition=definition)


async def list_campaigns(conn: Any, *, include_archived: bool = False) -> list[CampaignSummary]:
    names = [r["name"] for r in await conn.fetch(
        "SELECT name FROM campaigns WHERE $1 OR archived_at IS NULL ORDER BY name", include_archived)]
    return [_summary(await _campaign_row(conn, n)) for n in names]


async def show_campaign(conn: Any, name: str) -> CampaignSummary:
    return _summary(await _campaign_row(conn, name))


async def _strategy_id(conn: Any, name: str) -> tuple[int, StrategySpec]:
    row = await conn.fetchrow("SELECT id, spec::text AS spec FROM contact_strategies WHERE name = $1", name)
    if row is None:
        raise NotFound(f"no contact strategy named {name!r}; create it first (pom-ha strategy create)")
    return int(row["id"]), StrategySpec.model_validate_json(row["spec"])


def _with_treatments(definition: dict[str, Any], spec: StrategySpec) -> dict[str, Any]:
    """The campaign's retry strategy (read by its Campaign Manager) from the contact strategy's treatments."""
    retry = dict(definition.get("strategy") or {})
    retry["max_attempts"] = spec.max_attempts_per_contact
    retry["retry_intervals_s"] = {**retry.get("retry_intervals_s", {}), **spec.retry_intervals_s()}
    return {**definition, "strategy": retry}


async def _dnc_ids(conn: Any, names: list[str]) -> list[int]:
    ids = []
    for n in names:
        i = await conn.fetchval("SELECT id FROM dnc_lists WHERE name = $1", n)
        if i is None:
            raise NotFound(f"no DNC list named {n!r}")
        ids.append(int(i))
    return ids


async def edit_campaign(conn: Any, name: str, edit: CampaignEdit) -> CampaignSummary:
    """Refused while a job of the campaign runs (the job took its definition when it started: stop it or
    wait for its end); the DNC lists and the strategy's windows reach the Rule Engine at once otherwise."""
    async with conn.transaction():
        row = await _campaign_row(conn, name)
        changes = edit.model_dump(exclude_none=True)
        if not changes:
            raise AdminError("nothing to change: give at least one field")
        if row["job_id"] is not None and set(changes) - {"dnc_lists"}:
            raise Conflict(f"campaign {name!r} has an active job {row['job_id']} ({row['job_state']}): its "
                           f"definition cannot change under it; stop the job first (pom-ha job stop "
                           f"{row['job_id']}) — DNC lists can change at any time")
        definition = json.loads(row["definition"])
        strategy_id = None
        if edit.name is not None:
            definition["name"] = edit.name
        if edit.pacing is not None:
            definition["pacing"] = edit.pacing
        if edit.finish is not None:
            definition["finish"] = edit.finish
        if edit.strategy:
            strategy_id, spec = await _strategy_id(conn, edit.strategy)
            definition = _with_treatments(definition, spec)
        checked = validate_campaign(definition)
        await conn.execute(
            "UPDATE campaigns SET name = $2, definition = $3::jsonb, zone = coalesce($4, zone),"
            " strategy_id = CASE WHEN $5::text IS NULL THEN strategy_id WHEN $5 = '' THEN NULL ELSE $6 END,"
            " updated_at = now() WHERE id = $1",
            row["id"], checked.name, checked.model_dump_json(), edit.zone, edit.strategy, strategy_id)
        if edit.dnc_lists is not None:
            ids = await _dnc_ids(conn, edit.dnc_lists)
            await conn.execute("DELETE FROM campaign_dnc WHERE campaign_id = $1", row["id"])
            await conn.executemany("INSERT INTO campaign_dnc (campaign_id, list_id) VALUES ($1, $2)",
                                   [(row["id"], i) for i in ids])
        return _summary(await _campaign_row(conn, checked.name))


async def archive_campaign(conn: Any, name: str, *, archived: bool = True) -> CampaignSummary:
    async with conn.transaction():
        row = await _campaign_row(conn, name)
        if archived and row["job_id"] is not None:
            raise Conflict(f"campaign {name!r} has an active job {row['job_id']} ({row['job_state']}); "
                           "stop it before archiving")
        await conn.execute("UPDATE campaigns SET archived_at = CASE WHEN $2 THEN now() END, updated_at = now()"
                           " WHERE id = $1", row["id"], archived)
        return _summary(await _campaign_row(conn, name))


async def delete_campaign(conn: Any, name: str) -> dict[str, Any]:
    """Deletes the campaign with its ended jobs, attempts and schedules; refused while a job is active."""
    async with conn.transaction():
        row = await _campaign_row(conn, name)
        if row["job_id"] is not None:
            raise Conflict(f"campaign {name!r} has an active job {row['job_id']} ({row['job_state']}); "
                           f"stop it first (pom-ha job stop {row['job_id']})")
        jobs = await conn.fetchval("SELECT count(*) FROM jobs WHERE campaign_id = $1", row["id"])
        await conn.execute("DELETE FROM ha_assignment WHERE service = 'campaign_manager' AND item IN"
                           " (SELECT 'job:' || id FROM jobs WHERE campaign_id = $1)", row["id"])
        await conn.execute("DELETE FROM campaigns WHERE id = $1", row["id"])
    return {"deleted": name, "jobs_deleted": int(jobs)}


# ---- contact lists --------------------------------------------------------------------------------------
class ListCreate(_Req):
    name: str = Field(min_length=1, max_length=128)
    default_region: str | None = Field(None, description="ISO 3166 region for national numbers, e.g. US")

    @field_validator("default_region")
    @classmethod
    def _region(cls, value: str | None) -> str | None:
        return None if value is None else valid_region(value)


class ListSummary(BaseModel):
    id: int
    name: str
    default_region: str | None
    contacts: int
    campaigns: list[str]
    states: dict[str, int] = Field(default_factory=dict, description="contacts of active jobs by state")


async def create_list(conn: Any, req: ListCreate) -> ListSummary:
    list_id = await conn.fetchval(
        "INSERT INTO contact_lists (name, default_region) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING RETURNING id",
        req.name, req.default_region)
    if list_id is None:
        raise Conflict(f"contact list {req.name!r} already exists")
    return await show_list(conn, req.name)


async def show_list(conn: Any, name: str) -> ListSummary:
    row = await conn.fetchrow("SELECT id, name, default_region FROM contact_lists WHERE name = $1", name)
    if row is None:
        raise NotFound(f"no contact list named {name!r}")
    count = await conn.fetchval("SELECT count(*) FROM contacts WHERE list_id = $1", row["id"])
    campaigns = [r["name"] for r in await conn.fetch(
        "SELECT name FROM campaigns WHERE definition->>'contact_list' = $1 ORDER BY name", name)]
    states = {r["state"]: int(r["n"]) for r in await conn.fetch(
        "SELECT jc.state, count(*) AS n FROM job_contacts jc JOIN jobs j ON j.id = jc.job_id"
        " WHERE j.list_id = $1 AND j.state NOT IN ('Completed', 'Stopped') GROUP BY jc.state", row["id"])}
    return ListSummary(id=row["id"], name=row["name"], default_region=row["default_region"], contacts=int(count),
                       campaigns=campaigns, states=states)


async def list_lists(conn: Any) -> list[ListSummary]:
    return [await show_list(conn, r["name"]) for r in await conn.fetch("SELECT name FROM contact_lists ORDER BY name")]


async def delete_list(conn: Any, name: str) -> dict[str, Any]:
    async with conn.transaction():
        summary = await show_list(conn, name)
        if summary.campaigns:
            raise Conflict(f"contact list {name!r} is used by campaign(s) {', '.join(summary.campaigns)}; "
                           "delete or edit them first")
        await conn.execute("DELETE FROM contact_lists WHERE id = $1", summary.id)
    return {"deleted": name, "contacts_deleted": summary.contacts}


async def find_contacts(conn: Any, name: str, *, contact_id: str | None = None, phone: str | None = None,
                        limit: int = 100) -> list[dict[str, Any]]:
    summary = await show_list(conn, name)
    e164 = None
    if phone is not None:
        try:
            e164 = parse_phone(phone, summary.default_region).e164
        except ContactRejected as exc:
            raise AdminError(str(exc)) from None
    rows = await conn.fetch(
        "SELECT contact_id, phone, timezone, custom::text AS custom FROM contacts WHERE list_id = $1"
        " AND ($2::text IS NULL OR contact_id = $2) AND ($3::text IS NULL OR phone = $3) ORDER BY contact_id LIMIT $4",
        summary.id, contact_id, e164, limit)
    return [{"id": r["contact_id"], "phone": r["phone"], "timezone": r["timezone"], "custom": json.loads(r["custom"])}
            for r in rows]


async def export_list(conn: Any, name: str) -> str:
    summary = await show_list(conn, name)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["id", "phone", "timezone"])
    for r in await conn.fetch("SELECT contact_id, phone, timezone FROM contacts WHERE list_id = $1"
                              " ORDER BY contact_id", summary.id):
        writer.writerow([r["contact_id"], r["phone"], r["timezone"]])
    return out.getvalue()


# ---- DNC lists ------------------------------------------------------------------------------------------
class DncCreate(_Req):
    name: str = Field(pattern=NAME)
    is_global: bool = False
    description: str = Field("", max_length=500)


class DncNumbers(_Req):
    numbers: list[str] = Field(min_length=1, max_length=100_000)
    default_region: str | None = None

    @field_validator("default_region")
    @classmethod
    def _region(cls, value: str | None) -> str | None:
        return None if value is None else valid_region(value)


class DncSummary(BaseModel):
    id: int
    name: str
    is_global: bool
    description: str
    numbers: int
    campaigns: list[str]


class DncCheck(BaseModel):
    number: str
    blocked: bool
    lists: list[str]


async def create_dnc(conn: Any, req: DncCreate) -> DncSummary:
    made = await conn.fetchval("INSERT INTO dnc_lists (name, is_global, description) VALUES ($1, $2, $3)"
                               " ON CONFLICT (name) DO NOTHING RETURNING id", req.name, req.is_global, req.description)
    if made is None:
        raise Conflict(f"DNC list {req.name!r} already exists")
    return await show_dnc(conn, req.name)


async def show_dnc(conn: Any, name: str) -> DncSummary:
    row = await conn.fetchrow("SELECT id, name, is_global, description FROM dnc_lists WHERE name = $1", name)
    if row is None:
        raise NotFound(f"no DNC list named {name!r}")
    n = await conn.fetchval("SELECT count(*) FROM dnc_numbers WHERE list_id = $1", row["id"])
    campaigns = [r["name"] for r in await conn.fetch(
        "SELECT c.name FROM campaign_dnc d JOIN campaigns c ON c.id = d.campaign_id WHERE d.list_id = $1"
        " ORDER BY c.name", row["id"])]
    return DncSummary(id=row["id"], name=row["name"], is_global=row["is_global"], description=row["description"],
                      numbers=int(n), campaigns=campaigns)


async def list_dnc(conn: Any) -> list[DncSummary]:
    return [await show_dnc(conn, r["name"]) for r in await conn.fetch("SELECT name FROM dnc_lists ORDER BY name")]


async def delete_dnc(conn: Any, name: str) -> dict[str, Any]:
    async with conn.transaction():
        summary = await show_dnc(conn, name)
        if summary.campaigns:
            raise Conflict(f"DNC list {name!r} is attached to campaign(s) {', '.join(summary.campaigns)}; "
                           "detach it first (pom-ha campaign edit NAME --dnc ...)")
        await conn.execute("DELETE FROM dnc_lists WHERE id = $1", summary.id)
    return {"deleted": name, "numbers_deleted": summary.numbers}


def _e164_all(numbers: list[str], region: str | None) -> list[str]:
    good, bad = [], []
    for i, raw in enumerate(numbers, start=1):
        try:
            good.append(parse_phone(raw, region).e164)
        except ContactRejected as exc:
            bad.append(f"entry {i}: {exc}")
    if bad:
        raise InvalidSpec("DNC numbers", [("numbers", b) for b in bad[:20]])
    return good


async def add_dnc_numbers(conn: Any, name: str, req: DncNumbers) -> dict[str, Any]:
    """All or nothing: one invalid number refuses the whole request (naming each bad entry)."""
    phones = sorted(set(_e164_all(req.numbers, req.default_region)))
    async with conn.transaction():
        summary = await show_dnc(conn, name)
        added = await conn.fetchval(
            "WITH ins AS (INSERT INTO dnc_numbers (list_id, phone) SELECT $1, unnest($2::text[])"
            " ON CONFLICT DO NOTHING RETURNING 1) SELECT count(*) FROM ins", summary.id, phones)
    return {"list": name, "added": int(added), "already_listed": len(phones) - int(added)}


async def remove_dnc_numbers(conn: Any, name: str, req: DncNumbers) -> dict[str, Any]:
    phones = sorted(set(_e164_all(req.numbers, req.default_region)))
    async with conn.transaction():
        summary = await show_dnc(conn, name)
        removed = await conn.fetchval(
            "WITH del AS (DELETE FROM dnc_numbers WHERE list_id = $1 AND phone = ANY($2::text[]) RETURNING 1)"
            " SELECT count(*) FROM del", summary.id, phones)
    return {"list": name, "removed": int(removed), "not_listed": len(phones) - int(removed)}


async def export_dnc(conn: Any, name: str) -> list[str]:
    summary = await show_dnc(conn, name)
    return [r["phone"] for r in await conn.fetch("SELECT phone FROM dnc_numbers WHERE list_id = $1 ORDER BY phone",
                                                 summary.id)]


async def check_dnc(
    conn: Any, number: str, *, campaign: str | None = None, default_region: str | None = None
) -> DncCheck:
    """Is ``number`` blocked (for ``campaign``: global lists + its own; else any list)? The media platform's
    guard calls the same query (:func:`is_dnc_blocked`)."""
    try:
        e164 = parse_phone(number, default_region).e164
    except ContactRejected as exc:
        raise AdminError(str(exc)) from None
    lists = await blocking_lists(conn, e164, campaign=campaign)
    return DncCheck(number=e164, blocked=bool(lists), lists=lists)


async def blocking_lists(conn: Any, e164: str, *, campaign: str | None = None) -> list[str]:
    """Names of the DNC lists that block ``e164`` (E.164) — the legacy ``dnc_list`` table shows as
    ``(pim dnc_list)``. With ``campaign``: global lists and the campaign's own; without: every list."""
    rows = await conn.fetch(
        "SELECT d.name FROM dnc_numbers n JOIN dnc_lists d ON d.id = n.list_id WHERE n.phone = $1 AND"
        " ($2::text IS NULL OR d.is_global OR d.id IN (SELECT cd.list_id FROM campaign_dnc cd"
        "  JOIN campaigns c ON c.id = cd.campaign_id WHERE c.name = $2))"
        " UNION ALL SELECT '(pim dnc_list)' FROM dnc_list WHERE phone = $1 ORDER BY 1", e164, campaign)
    return [r["name"] for r in rows]


async def is_dnc_blocked(conn: Any, e164: str, *, campaign: str | None = None) -> bool:
    """For the media platform (security work): True when a call to ``e164`` must be refused."""
    return bool(await blocking_lists(conn, e164, campaign=campaign))


# ---- contact strategies ---------------------------------------------------------------------------------
class StrategyCreate(_Req):
    name: str = Field(pattern=NAME)
    spec: dict[str, Any] = Field(default_factory=dict, description="StrategySpec fields; absent: pim_config defaults")


class StrategySummary(BaseModel):
    id: int
    name: str
    spec: StrategySpec
    campaigns: list[str]


async def strategy_defaults(conn: Any) -> dict[str, Any]:
    """Today's pim_config Rule Engine settings as a strategy's defaults."""
    cfg = {r["key"]: r["value"]
           for r in await conn.fetch("SELECT key, value FROM pim_config WHERE key LIKE 'RuleEngine%'")}
    out: dict[str, Any] = {}
    start, end = cfg.get("RuleEngineCallingWindowStart"), cfg.get("RuleEngineCallingWindowEnd")
    if start and end:
        out["windows"] = {d: [w.model_dump()] for d, w in
                          ((d, ws[0]) for d, ws in default_week(start.strip(), end.strip()).items())}
    if (gap := cfg.get("RuleEngineMinGapBetweenAttemptsMs", "").strip()).isdigit():
        out["min_gap_s"] = int(gap) // 1000
    if (most := cfg.get("RuleEngineMaxAttempts", "").strip()).isdigit():
        out["max_attempts_per_contact"] = int(most)
    return out


async def create_strategy(conn: Any, req: StrategyCreate) -> StrategySummary:
    spec = validate_strategy({**await strategy_defaults(conn), **req.spec})
    made = await conn.fetchval("INSERT INTO contact_strategies (name, spec) VALUES ($1, $2::jsonb)"
                               " ON CONFLICT (name) DO NOTHING RETURNING id", req.name, spec.model_dump_json())
    if made is None:
        raise Conflict(f"contact strategy {req.name!r} already exists")
    return await show_strategy(conn, req.name)


async def show_strategy(conn: Any, name: str) -> StrategySummary:
    row = await conn.fetchrow("SELECT id, name, spec::text AS spec FROM contact_strategies WHERE name = $1", name)
    if row is None:
        raise NotFound(f"no contact strategy named {name!r}")
    campaigns = [r["name"] for r in await conn.fetch(
        "SELECT name FROM campaigns WHERE strategy_id = $1 ORDER BY name", row["id"])]
    return StrategySummary(id=row["id"], name=row["name"], spec=StrategySpec.model_validate_json(row["spec"]),
                           campaigns=campaigns)


async def list_strategies(conn: Any) -> list[StrategySummary]:
    return [await show_strategy(conn, r["name"])
            for r in await conn.fetch("SELECT name FROM contact_strategies ORDER BY name")]


async def edit_strategy(conn: Any, name: str, changes: dict[str, Any]) -> dict[str, Any]:
    """Windows, gap, caps and DNC reach the Rule Engine at once (its next check is the safe point). Retry
    treatments are copied into the campaigns that use the strategy; a campaign with an active job gets them
    from its next job (its Campaign Manager read them at the start), and the answer says which."""
    async with conn.transaction():
        current = await show_strategy(conn, name)
        spec = validate_strategy({**current.spec.model_dump(), **changes})
        await conn.execute("UPDATE contact_strategies SET spec = $2::jsonb, updated_at = now() WHERE id = $1",
                           current.id, spec.model_dump_json())
        deferred = []
        for c in current.campaigns:
            row = await _campaign_row(conn, c)
            definition = _with_treatments(json.loads(row["definition"]), spec)
            await conn.execute("UPDATE campaigns SET definition = $2::jsonb, updated_at = now() WHERE id = $1",
                               row["id"], validate_campaign(definition).model_dump_json())
            if row["job_id"] is not None:
                deferred.append(f"{c} (job {row['job_id']})")
    detail = "windows, gap and caps apply at the Rule Engine's next check"
    if deferred:
        detail += f"; retry treatments apply from the next job of {', '.join(deferred)}"
    return {"strategy": (await show_strategy(conn, name)).model_dump(mode="json"), "detail": detail}


async def delete_strategy(conn: Any, name: str) -> dict[str, Any]:
    async with conn.transaction():
        current = await show_strategy(conn, name)
        if current.campaigns:
            raise Conflict(f"contact strategy {name!r} is used by campaign(s) {', '.join(current.campaigns)}")
        await conn.execute("DELETE FROM contact_strategies WHERE id = $1", current.id)
    return {"deleted": name}


# ---- holiday calendars and recurring schedules ----------------------------------------------------------
class CalendarCreate(_Req):
    name: str = Field(pattern=NAME)
    country: str | None = Field(None, description="ISO 3166 country of the public holidays (holidays package)")
    subdivision: str | None = Field(None, description="a state or region of the country, e.g. CA")
    custom_dates: list[date] = Field(default_factory=list)


async def create_calendar(conn: Any, req: CalendarCreate) -> dict[str, Any]:
    try:
        HolidayCalendar(req.name, req.country, req.subdivision, frozenset(req.custom_dates))
    except RecurrenceError as exc:
        raise InvalidSpec("holiday calendar", [(str(exc).split(":")[0], str(exc))]) from None
    made = await conn.fetchval(
        "INSERT INTO holiday_calendars (name, country, subdivision, custom_dates) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (name) DO NOTHING RETURNING id", req.name, req.country, req.subdivision, req.custom_dates)
    if made is None:
        raise Conflict(f"holiday calendar {req.name!r} already exists")
    return {"id": int(made), **req.model_dump(mode="json")}


async def calendar_named(conn: Any, name: str) -> tuple[int, HolidayCalendar]:
    row = await conn.fetchrow("SELECT id, name, country, subdivision, custom_dates FROM holiday_calendars"
                              " WHERE name = $1", name)
    if row is None:
        raise NotFound(f"no holiday calendar named {name!r}")
    return int(row["id"]), HolidayCalendar(row["name"], row["country"], row["subdivision"],
                                           frozenset(row["custom_dates"] or []))


class ScheduleCreate(_Req):
    name: str = Field(pattern=NAME)
    campaign: str
    kind: Literal["rrule", "cron"]
    expression: str = Field(min_length=1, max_length=500, examples=["FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR;BYHOUR=9"])
    tz: str = Field(examples=["America/New_York"])
    calendar: str | None = None
    start: AwareDatetime | None = Field(None, description="first possible occurrence (default now)")


class ScheduleSummary(BaseModel):
    id: int
    name: str | None
    campaign: str | None
    kind: str
    expression: str | None
    tz: str | None
    calendar: str | None
    state: str
    next_due: datetime
    fired_count: int
    skipped_count: int
    last_skip: str | None


async def create_schedule(conn: Any, req: ScheduleCreate) -> ScheduleSummary:
    async with conn.transaction():
        campaign = await _campaign_row(conn, req.campaign)
        if campaign["archived_at"] is not None:
            raise Conflict(f"campaign {req.campaign!r} is archived")
        cal_id: int | None = None
        calendar = HolidayCalendar()
        if req.calendar is not None:
            cal_id, calendar = await calendar_named(conn, req.calendar)
        start = req.start or datetime.now(UTC)
        try:
            rec = Recurrence(req.kind, req.expression, req.tz, start, calendar)
            first = rec.first()
        except RecurrenceError as exc:
            field = str(exc).split(":")[0]
            raise InvalidSpec("schedule", [("expression" if field in ("rrule", "cron") else field, str(exc))]) from None
        if first is None:
            raise InvalidSpec("schedule", [("expression", f"{req.expression!r} has no occurrence after "
                                                          f"{start.isoformat()} (outside holidays)")])
        sid = await conn.fetchval(
            "INSERT INTO cd_schedules (kind, campaign_id, due_at, name, recurrence_kind, recurrence, recurrence_start,"
            " tz, calendar_id) VALUES ('campaign_start', $1, $2, $3, $4, $5, $6, $7, $8)"
            " ON CONFLICT (name) WHERE name IS NOT NULL DO NOTHING RETURNING id",
            campaign["id"], first, req.name, req.kind, req.expression, start, req.tz, cal_id)
        if sid is None:
            raise Conflict(f"schedule {req.name!r} already exists")
    return await show_schedule(conn, req.name)


SCHEDULE_SQL = ("SELECT s.id, s.name, c.name AS campaign, s.kind, s.recurrence_kind, s.recurrence, s.tz, h.name AS"
                " calendar, s.state, s.due_at, s.fired_count, s.skipped_count, s.last_skip, s.interval_s"
                " FROM cd_schedules s LEFT JOIN campaigns c ON c.id = s.campaign_id"
                " LEFT JOIN holiday_calendars h ON h.id = s.calendar_id")


def _schedule(r: Any) -> ScheduleSummary:
    kind = r["recurrence_kind"] or ("every" if r["interval_s"] else "once")
    expression = r["recurrence"] or (f"{r['interval_s']} s" if r["interval_s"] else None)
    return ScheduleSummary(id=r["id"], name=r["name"], campaign=r["campaign"], kind=f"{r['kind']}:{kind}",
                           expression=expression, tz=r["tz"], calendar=r["calendar"], state=r["state"],
                           next_due=r["due_at"], fired_count=r["fired_count"], skipped_count=r["skipped_count"],
                           last_skip=r["last_skip"])


async def show_schedule(conn: Any, name: str) -> ScheduleSummary:
    r = await conn.fetchrow(SCHEDULE_SQL + " WHERE s.name = $1 OR s.id::text = $1 ORDER BY s.id LIMIT 1", name)
    if r is None:
        raise NotFound(f"no schedule named {name!r}")
    return _schedule(r)


async def list_schedules(conn: Any) -> list[ScheduleSummary]:
    return [_schedule(r) for r in await conn.fetch(SCHEDULE_SQL + " ORDER BY s.id")]


async def delete_schedule(conn: Any, name: str) -> dict[str, Any]:
    current = await show_schedule(conn, name)
    await conn.execute("UPDATE cd_schedules SET state = 'cancelled' WHERE id = $1 AND state = 'pending'", current.id)
    return {"cancelled": name}


def masked(phone: str) -> str:
    return mask(phone)


# ---- campaign creation (definition + strategy + DNC lists, one transaction) ------------------------------
class CampaignCreate(_Req):
    definition: dict[str, Any] = Field(description="a campaign definition (docs/campaign-director.md)")
    zone: str = Field("Default", min_length=1, max_length=64)
    strategy: str | None = None
    dnc_lists: list[str] = Field(default_factory=list)


async def create_campaign(conn: Any, req: CampaignCreate) -> CampaignSummary:
    from pom_ha.campaign import admin

    async with conn.transaction():
        definition = dict(req.definition)
        strategy_id = None
        if req.strategy:
            strategy_id, spec = await _strategy_id(conn, req.strategy)
            definition = _with_treatments(definition, spec)
        made = await admin.create_campaign(conn, definition, zone=req.zone)
        if strategy_id is not None:
            await conn.execute("UPDATE campaigns SET strategy_id = $2 WHERE id = $1", made.id, strategy_id)
        ids = await _dnc_ids(conn, req.dnc_lists)
        await conn.executemany("INSERT INTO campaign_dnc (campaign_id, list_id) VALUES ($1, $2)",
                               [(made.id, i) for i in ids])
        name = await conn.fetchval("SELECT name FROM campaigns WHERE id = $1", made.id)
        return _summary(await _campaign_row(conn, name))
