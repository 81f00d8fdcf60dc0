"""Campaign administration on real PostgreSQL and real daemons: every operation through the CLI and through
REST (refusals included), the Rule Engine refusing DNC numbers and closed windows of a campaign's strategy,
the Common CD skipping a schedule on a holiday and rejecting an invalid import row with its line."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner, Result

from pom_ha.campaign import admin
from pom_ha.campaign import service as svc
from pom_ha.cli import main
from pom_ha.clients.rule_engine import RuleEngineClient
from pom_ha.domain.attempts import ContactHistory
from pom_ha.infra.process import stop_process
from pom_ha.infra.stack import Stack
from pom_ha.lab.daemons import start_daemon
from pom_ha.web import auth
from pom_ha.web.admin_routes import ADMIN_ROUTES
from pom_ha.web.app import RestApi

pytestmark = pytest.mark.integration
TABLES = ("campaign_dnc", "dnc_numbers", "dnc_lists", "cd_schedules", "holiday_calendars", "job_commands",
          "import_errors", "data_imports", "attempts", "job_contacts", "jobs", "campaigns", "contact_strategies",
          "contacts", "contact_lists", "cd_alarms")
DEFINITION = {"name": "Winter", "contact_list": "winter-list", "pacing": {"calls_per_second": 5}}


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    await conn.execute("DELETE FROM ha_assignment WHERE service = 'campaign_manager'")
    yield conn
    await conn.close()


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := await check():
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout_s} s: {what}")


# ---- CLI ------------------------------------------------------------------------------------------------
async def test_cli_every_operation_and_its_refusals(db: asyncpg.Connection, topology_file: Path,
                                                   tmp_path: Path) -> None:
    runner = CliRunner()

    async def cli(*args: str, code: int = 0) -> Result:
        out = await asyncio.to_thread(runner.invoke, main, [*args, "--topology", str(topology_file)])
        assert out.exit_code == code, (args, out.output, out.exception)
        return out

    # lists: national numbers read in the list's region
    await cli("list", "create", "winter-list", "--region", "US")
    await cli("list", "create", "winter-list", code=2)  # exists (the old command's code: refused)
    shown = json.loads((await cli("list", "show", "winter-list", "--json")).output)
    assert shown["default_region"] == "US" and shown["contacts"] == 0
    await db.execute("INSERT INTO contacts (list_id, contact_id, phone, timezone) VALUES (1, 'c1', '+12122000001',"
                     " 'America/New_York')")
    found = json.loads((await cli("list", "find", "winter-list", "--phone", "(212) 200-0001", "--json")).output)
    assert [c["id"] for c in found] == ["c1"]
    await cli("list", "find", "winter-list", code=2)
    await cli("list", "export", "winter-list", str(tmp_path / "out.csv"))
    assert (tmp_path / "out.csv").read_text().splitlines()[1] == "c1,+12122000001,America/New_York"

    # strategies: defaults from pim_config; bad input names field and value (exit 2)
    made = json.loads((await cli("strategy", "create", "office", "--spec", json.dumps(
        {"windows": {"mon": [{"start": "09:00", "end": "17:00"}]}, "treatments": {"busy": {"delay_s": 90}}}),
        "--json")).output)
    assert made["spec"]["max_attempts_per_contact"] == 3 and made["spec"]["min_gap_s"] == 60
    bad = await cli("strategy", "create", "bad", "--spec", '{"min_gap_s": -1}', code=2)
    assert "error: invalid contact strategy: min_gap_s" in bad.output and "-1" in bad.output
    assert await db.fetchval("SELECT count(*) FROM contact_strategies") == 1  # nothing half-saved
    listed = json.loads((await cli("strategy", "list", "--json")).output)
    assert [s["name"] for s in listed] == ["office"]

    # DNC lists: all-or-nothing adds, check, export, attach
    await cli("dnc", "create", "national", "--global")
    await cli("dnc", "create", "winter-optout")
    await cli("dnc", "add", "winter-optout", "(212) 200-0002", "+33123456789", "--region", "US")
    refused = await cli("dnc", "add", "winter-optout", "+12122000003", "12", code=2)
    assert "entry 2" in refused.output and await db.fetchval("SELECT count(*) FROM dnc_numbers") == 2
    (tmp_path / "dnc.txt").write_text("phone\n+12122000004\n")
    await cli("dnc", "import", "national", "--file", str(tmp_path / "dnc.txt"))
    check = json.loads((await cli("dnc", "check", "+12122000004", "--json")).output)
    assert check == {"number": "+12122000004", "blocked": True, "lists": ["national"]}
    await cli("dnc", "remove", "national", "+12122000004")
    assert "not listed" in (await cli("dnc", "check", "+12122000004")).output
    await cli("dnc", "export", "winter-optout", str(tmp_path / "optout.txt"))
    assert (tmp_path / "optout.txt").read_text().split() == ["+12122000002", "+33123456789"]

    # campaigns: create (old command), edit with strategy and DNC, show, list, archive, delete
    (tmp_path / "winter.json").write_text(json.dumps(DEFINITION))
    await cli("campaign", "create", str(tmp_path / "winter.json"))
    edited = json.loads((await cli("campaign", "edit", "Winter", "--strategy", "office", "--dnc", "winter-optout",
                                   "--json")).output)
    assert edited["strategy"] == "office" and edited["dnc_lists"] == ["winter-optout"]
    assert edited["definition"]["strategy"]["retry_intervals_s"] == {"BUSY": 90}
    assert json.loads((await cli("dnc", "check", "+33123456789", "--campaign", "Winter", "--json")).output)["blocked"]
    await cli("campaign", "edit", "Winter", "--pacing", '{"calls_per_second": -3}', code=2)
    await cli("campaign", "edit", "Nope", "--zone", "x", code=1)
    assert "Winter" in (await cli("campaign", "list")).output
    await cli("dnc", "delete", "winter-optout", "--yes", code=1)  # attached
    await cli("strategy", "delete", "office", "--yes", code=1)  # used
    await cli("list", "delete", "winter-list", "--yes", code=1)  # used

    # schedules and calendars
    await cli("schedule", "calendar", "xmas", "--country", "US", "--date", "2026-12-24")
    await cli("schedule", "calendar", "bad", "--country", "US", "--region", "ZZ", code=2)
    sched = json.loads((await cli("schedule", "create", "mornings", "--campaign", "Winter", "--rrule",
                                  "FREQ=DAILY;BYHOUR=9;BYMINUTE=0;BYSECOND=0", "--tz", "America/New_York",
                                  "--calendar", "xmas", "--start", "2026-12-23T00:00:00+00:00", "--json")).output)
    assert sched["next_due"].startswith("2026-12-23T14:00")
    await cli("schedule", "create", "bad", "--campaign", "Winter", "--cron", "61 * * * *", "--tz", "UTC", code=2)
    await cli("schedule", "create", "both", "--campaign", "Winter", "--tz", "UTC", code=2)
    assert "mornings" in (await cli("schedule", "list")).output
    await cli("schedule", "show", "mornings")
    await cli("schedule", "delete", "mornings", "--yes")

    # a running job refuses edit, archive and delete, with the reason
    job = await admin.create_job(db, int(await db.fetchval("SELECT id FROM campaigns WHERE name = 'Winter'")))
    await db.execute("UPDATE jobs SET state = 'Running' WHERE id = $1", job)
    refused = await cli("campaign", "delete", "Winter", "--yes", code=1)
    assert f"active job {job} (Running)" in refused.output
    await cli("campaign", "edit", "Winter", "--zone", "Other", code=1)
    await cli("campaign", "edit", "Winter", "--dnc", "")  # DNC lists may change under a running job
    await cli("campaign", "archive", "Winter", code=1)
    no = await asyncio.to_thread(runner.invoke, main, ["campaign", "delete", "Winter", "--topology",
                                                       str(topology_file)], input="n\n")
    assert no.exit_code == 1 and "not confirmed" in no.output
    await db.execute("UPDATE jobs SET state = 'Completed' WHERE id = $1", job)
    await cli("campaign", "archive", "Winter")
    assert "Winter" not in (await cli("campaign", "list")).output
    await cli("campaign", "delete", "Winter", "--yes")
    await cli("campaign", "show", "Winter", code=1)
    await cli("strategy", "delete", "office", "--yes")
    await cli("dnc", "delete", "winter-optout", "--yes")
    await cli("list", "delete", "winter-list", "--yes")
    assert await db.fetchval("SELECT count(*) FROM contact_lists") == 0


# ---- REST -----------------------------------------------------------------------------------------------
async def test_rest_every_operation_and_its_refusals(db: asyncpg.Connection, stack: Stack, tmp_path: Path) -> None:
    assert {r.role for r in ADMIN_ROUTES if r.method == "DELETE"} == {"admin"}
    assert {r.role for r in ADMIN_ROUTES if r.method == "GET"} == {"viewer"}
    api = RestApi(stack.topo, "pom1")
    if not await db.fetchval("SELECT 1 FROM web_users WHERE name = 'admin-ops-test'"):
        await auth.add_user(db, "admin-ops-test", "admin", secrets.token_urlsafe(16))
    bearer = {"Authorization": f"Bearer {await auth.create_token(db, 'admin-ops-test', 'admin')}"}
    async with TestClient(TestServer(api.app())) as http:

        async def call(method: str, path: str, status: int, body: Any = None) -> Any:
            resp = await http.request(method, path, json=body, headers=bearer)
            text = await resp.text()
            assert resp.status == status, (method, path, resp.status, text)
            return json.loads(text) if resp.content_type == "application/json" else text

        assert (await call("POST", "/v1/lists", 201, {"name": "rest-list", "default_region": "FR"}))["id"] > 0
        bad = await call("POST", "/v1/lists", 400, {"name": "x", "default_region": "Narnia"})
        assert bad["field"] == "default_region" and "Narnia" in bad["error"]
        await call("POST", "/v1/lists", 409, {"name": "rest-list"})
        await call("GET", "/v1/lists/nope", 404)
        csv_path = tmp_path / "in.csv"
        csv_path.write_text("id,phone\na,06 12 34 56 78\n")
        os.chmod(csv_path, 0o644)
        os.chmod(tmp_path, 0o755)
        queued = await call("POST", "/v1/lists/rest-list/imports", 202, {"csv_path": str(csv_path)})
        assert queued["kind"] == "import"
        await call("POST", "/v1/lists/rest-list/imports", 409, {})  # no source

        strategy = await call("POST", "/v1/strategies", 201, {"name": "eu", "spec": {
            "region_overrides": {"FR": {"sat": [{"start": "10:00", "end": "12:00"}]}}}})
        assert strategy["spec"]["region_overrides"]["FR"]["sat"][0]["start"] == "10:00"
        bad = await call("POST", "/v1/strategies", 400, {"name": "x", "spec": {"windows": {"mon": [
            {"start": "10:00", "end": "09:00"}]}}})
        assert bad["field"] == "windows.mon.0" and "10:00" in bad["error"]
        edited = await call("PATCH", "/v1/strategies/eu", 200, {"spec": {"min_gap_s": 600}})
        assert edited["strategy"]["spec"]["min_gap_s"] == 600 and "next check" in edited["detail"]
        assert len((await call("GET", "/v1/strategies", 200))["strategies"]) == 1

        await call("POST", "/v1/dnc", 201, {"name": "eu-optout"})
        added = await call("POST", "/v1/dnc/eu-optout/numbers", 200, {"numbers": ["06 12 34 56 78"],
                                                                       "default_region": "FR"})
        assert added["added"] == 1
        await call("POST", "/v1/dnc/eu-optout/numbers", 400, {"numbers": ["not a number"]})
        check = await call("GET", "/v1/dnc-check?number=%2B33612345678", 200)
        assert check["blocked"] and check["lists"] == ["eu-optout"]
        assert (await call("GET", "/v1/dnc/eu-optout/export", 200)).split() == ["+33612345678"]
        assert (await call("POST", "/v1/dnc/eu-optout/numbers/remove", 200, {"numbers": ["+33612345678"]}))[
            "removed"] == 1
        assert (await call("GET", "/v1/dnc", 200))["dnc_lists"][0]["numbers"] == 0

        made = await call("POST", "/v1/campaigns", 201, {"definition": {**DEFINITION, "name": "Rest",
                                                                        "contact_list": "rest-list"},
                                                         "strategy": "eu", "dnc_lists": ["eu-optout"]})
        assert made["strategy"] == "eu" and made["dnc_lists"] == ["eu-optout"]
        bad = await call("POST", "/v1/campaigns", 400, {"definition": {"name": "bad!", "contact_list": "rest-list",
                                                                       "pacing": {"calls_per_second": 1}}})
        assert bad["field"] == "name"
        await call("POST", "/v1/campaigns", 404, {"definition": DEFINITION, "strategy": "nope"})
        await call("PATCH", "/v1/campaigns/Rest", 400, {"colour": "red"})
        assert (await call("PATCH", "/v1/campaigns/Rest", 200, {"zone": "Default"}))["zone"] == "Default"
        assert [c["name"] for c in (await call("GET", "/v1/campaigns", 200))["campaigns"]] == ["Rest"]
        await call("DELETE", "/v1/dnc/eu-optout", 409)
        await call("DELETE", "/v1/strategies/eu", 409)

        await call("POST", "/v1/calendars", 201, {"name": "fr", "country": "FR"})
        await call("POST", "/v1/calendars", 400, {"name": "zz", "country": "ZZ"})
        sched = await call("POST", "/v1/schedules", 201, {"name": "weekly", "campaign": "Rest", "kind": "cron",
                                                          "expression": "0 9 * * 1", "tz": "Europe/Paris",
                                                          "calendar": "fr", "start": "2026-12-20T00:00:00Z"})
        assert sched["next_due"].startswith("2026-12-21T08:00")
        bad = await call("POST", "/v1/schedules", 400, {"name": "w2", "campaign": "Rest", "kind": "rrule",
                                                        "expression": "FREQ=NEVER", "tz": "UTC"})
        assert bad["field"] == "expression" and "FREQ=NEVER" in bad["error"]
        await call("GET", "/v1/schedules/weekly", 200)
        assert len((await call("GET", "/v1/schedules", 200))["schedules"]) == 1
        await call("DELETE", "/v1/schedules/weekly", 200)

        job = await admin.create_job(db, int(made["id"]))
        refused = await call("DELETE", "/v1/campaigns/Rest", 409)
        assert f"active job {job}" in refused["error"]
        await call("PATCH", "/v1/campaigns/Rest", 409, {"zone": "Other"})
        await db.execute("UPDATE jobs SET state = 'Stopped' WHERE id = $1", job)
        assert (await call("POST", "/v1/campaigns/Rest/archive", 200, {}))["archived"]
        assert (await call("DELETE", "/v1/campaigns/Rest", 200))["jobs_deleted"] == 1
        await call("GET", "/v1/campaigns/Rest", 404)
        await call("DELETE", "/v1/strategies/eu", 200)
        await call("DELETE", "/v1/dnc/eu-optout", 200)
        await call("DELETE", "/v1/lists/rest-list", 200)


# ---- Rule Engine ------------------------------------------------------------------------------------------
async def test_rule_engine_refuses_dnc_numbers_and_closed_windows_of_the_campaign(
    db: asyncpg.Connection, stack: Stack, topology_file: Path, pg_dsn: str
) -> None:
    await svc.create_list(db, svc.ListCreate(name="re-list"))
    await svc.create_strategy(db, svc.StrategyCreate(name="weekdays", spec={
        "windows": {d: [{"start": "09:00", "end": "17:00"}] for d in ("mon", "tue", "wed", "thu", "fri")}}))
    await svc.create_dnc(db, svc.DncCreate(name="global-dnc", is_global=True))
    await svc.create_dnc(db, svc.DncCreate(name="re-optout"))
    await svc.add_dnc_numbers(db, "global-dnc", svc.DncNumbers(numbers=["+12122000010"]))
    await svc.add_dnc_numbers(db, "re-optout", svc.DncNumbers(numbers=["+12122000011"]))
    made = await svc.create_campaign(db, svc.CampaignCreate(
        definition={**DEFINITION, "name": "RE", "contact_list": "re-list"}, strategy="weekdays",
        dnc_lists=["re-optout"]))
    other = await svc.create_campaign(db, svc.CampaignCreate(
        definition={**DEFINITION, "name": "Other", "contact_list": "re-list"}))
    job, other_job = await admin.create_job(db, made.id), await admin.create_job(db, other.id)
    rec = start_daemon(stack.topo, topology_file, "pom1", "rule-engine", name=f"re-admin-{uuid.uuid4().hex[:4]}")
    try:
        async with RuleEngineClient(pg_dsn, stack.topo, timeout_s=2.0) as client:
            assert await client.wait_connected(30), "no Rule Engine master"
            tuesday_10_ny = datetime(2026, 12, 8, 15, 0, tzinfo=UTC)
            ny = {"id": "c1", "phone": "+12122000001", "timezone": "America/New_York"}

            async def verdict(contact: dict[str, str], at: datetime, on_job: int) -> Any:
                return await client.evaluate(contact, ContactHistory(), at, job=str(on_job))

            async def loaded() -> bool:
                v = await verdict({**ny, "phone": "+12122000011"}, tuesday_10_ny, job)
                return not v.allowed
            await until(loaded, "the Rule Engine knows the job's campaign")
            assert (await verdict(ny, tuesday_10_ny, job)).allowed
            blocked = await verdict({**ny, "phone": "+12122000010"}, tuesday_10_ny, job)
            assert blocked.code == "DNC_BLOCKED" and "+12122000010" not in blocked.reason  # masked
            assert (await verdict({**ny, "phone": "+12122000011"}, tuesday_10_ny, job)).code == "DNC_BLOCKED"
            # the campaign's own list does not bind another campaign; the global list does
            assert (await verdict({**ny, "phone": "+12122000011"}, tuesday_10_ny, other_job)).allowed
            assert (await verdict({**ny, "phone": "+12122000010"}, tuesday_10_ny, other_job)).code == "DNC_BLOCKED"
            # Tuesday 18:00 in New York (23:00 UTC): closed in the contact's zone, open for pim_config's default
            closed = await verdict(ny, tuesday_10_ny + timedelta(hours=8), job)
            assert closed.code == "OUTSIDE_CALLING_WINDOW"
            assert closed.retry_at == datetime(2026, 12, 9, 14, 0, tzinfo=UTC)  # Wednesday 09:00 New York
            assert (await verdict(ny, tuesday_10_ny + timedelta(hours=8), other_job)).allowed
            # a Saturday is closed; an edit reaches the Rule Engine without a restart
            saturday = datetime(2026, 12, 12, 15, 0, tzinfo=UTC)
            assert (await verdict(ny, saturday, job)).code == "OUTSIDE_CALLING_WINDOW"
            await svc.edit_strategy(db, "weekdays", {"windows": {"sat": [{"start": "09:00", "end": "17:00"}]}})

            async def saturday_open() -> bool:
                return bool((await verdict(ny, saturday, job)).allowed)
            await until(saturday_open, "the strategy edit applied by the Rule Engine")
    finally:
        await asyncio.to_thread(stop_process, rec, stack.topo.lab_dir() / "run")


# ---- Common CD --------------------------------------------------------------------------------------------
async def test_director_skips_a_holiday_and_rejects_invalid_import_rows(
    db: asyncpg.Connection, stack: Stack, topology_file: Path
) -> None:
    work = stack.topo.lab_dir() / f"admin-{uuid.uuid4().hex[:6]}"  # readable by the director's uid
    await asyncio.to_thread(work.mkdir, parents=True)
    os.chmod(work, 0o777)
    await db.execute("UPDATE ha_lease SET expires_at = now(), released_at = now()"
                     " WHERE service = 'campaign_director' AND holder_instance = 'test'")
    await svc.create_list(db, svc.ListCreate(name="cd-list", default_region="US"))
    made = await svc.create_campaign(db, svc.CampaignCreate(definition={**DEFINITION, "name": "CD",
                                                                        "contact_list": "cd-list"}))
    now = await db.fetchval("SELECT now()")
    today_ny = now.astimezone(ZoneInfo("America/New_York")).date()
    await svc.create_calendar(db, svc.CalendarCreate(name="today-off", custom_dates=[today_ny]))
    await svc.create_calendar(db, svc.CalendarCreate(name="none"))
    # two daily schedules due a second ago: one's calendar makes today a holiday (added after it was made);
    # the other waits (cancelled) until the first was handled
    for name, cal, state in (("holiday", "today-off", "pending"), ("workday", "none", "cancelled")):
        await db.execute(
            "INSERT INTO cd_schedules (kind, campaign_id, due_at, name, recurrence_kind, recurrence, recurrence_start,"
            " tz, calendar_id, state) VALUES ('campaign_start', $1, $2, $3, 'rrule', 'FREQ=DAILY', $2,"
            " 'America/New_York', (SELECT id FROM holiday_calendars WHERE name = $4), $5)",
            made.id, now - timedelta(seconds=1), name, cal, state)
    csv_path = work / "import.csv"
    csv_path.write_text("id,phone,timezone\n"
                        "a,(212) 200-0001,\n"
                        "b,+15550000001,America/New_York\n"   # line 3: not a valid number
                        "c,+18005550100,\n"                   # line 4: no zone from a toll-free number
                        "d,+33 1 23 45 67 89,Europe/Paris\n")
    os.chmod(csv_path, 0o644)
    imp = await admin.queue_import(db, "cd-list", csv_path=str(csv_path))
    rec = start_daemon(stack.topo, topology_file, "pom1", "campaign-director", "--http-port", "7651",
                       "--cache", "off", name=f"cd-admin-{uuid.uuid4().hex[:4]}")
    try:
        async def skipped() -> Any:
            return await db.fetchrow("SELECT state, skipped_count, last_skip, due_at, fired_count FROM cd_schedules"
                                     " WHERE name = 'holiday' AND skipped_count > 0")
        row = await until(skipped, "the holiday occurrence skipped", 45)
        assert row["state"] == "pending" and row["fired_count"] == 0 and "custom date" in row["last_skip"]
        assert row["due_at"] > now and row["due_at"].astimezone(
            ZoneInfo("America/New_York")).date() > today_ny
        assert await db.fetchval("SELECT count(*) FROM jobs") == 0
        event = await db.fetchval("SELECT count(*) FROM ha_event WHERE kind = 'schedule_skipped_holiday'")
        assert event >= 1
        # the same schedule on a working day fires (once, a job queued)
        await db.execute("UPDATE cd_schedules SET state = 'pending', due_at = now() - interval '1 second'"
                         " WHERE name = 'workday'")

        async def fired() -> Any:
            return await db.fetchval("SELECT count(*) FROM jobs WHERE campaign_id = $1", made.id)
        assert await until(fired, "the working-day schedule fired", 30) == 1

        async def imported() -> Any:
            return await db.fetchrow("SELECT state, imported, rejected FROM data_imports WHERE id = $1"
                                     " AND state IN ('completed', 'failed')", imp.id)
        row = await until(imported, "the import ended", 30)
        assert (row["state"], row["imported"], row["rejected"]) == ("completed", 2, 2)
        errors = {r["line"]: r["reason"] for r in await db.fetch(
            "SELECT line, reason FROM import_errors WHERE import_id = $1", imp.id)}
        assert sorted(errors) == [3, 4] and "not a valid number" in errors[3] and "no time zone" in errors[4]
        assert "5550000001" not in errors[3]
        stored = {r["contact_id"]: (r["phone"], r["timezone"]) for r in await db.fetch(
            "SELECT contact_id, phone, timezone FROM contacts")}
        assert stored == {"a": ("+12122000001", "America/New_York"), "d": ("+33123456789", "Europe/Paris")}
    finally:
        await asyncio.to_thread(stop_process, rec, stack.topo.lab_dir() / "run")
