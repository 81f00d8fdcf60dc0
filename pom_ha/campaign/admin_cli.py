"""``pom-ha campaign | list | dnc | strategy | schedule`` administration commands over
:mod:`pom_ha.campaign.service` (the REST API calls the same functions).

Exit status: 0 done; 1 refused (``error: <reason>`` on stderr: not found, conflict, a job runs...); 2 bad
usage or invalid input (every bad field named). Reads take ``--json``; deletions ask for confirmation
unless ``--yes``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import BaseModel

from pom_ha.campaign import service as svc
from pom_ha.campaign.admin import AdminError
from pom_ha.campaign.cli import campaign, contact_list, job, topology_option
from pom_ha.domain.campaigns import InvalidCampaign
from pom_ha.domain.contact_strategy import InvalidSpec

T = TypeVar("T")
json_option = click.option("--json", "as_json", is_flag=True, help="print JSON")
yes_option = click.option("--yes", is_flag=True, help="do not ask for confirmation")


def _exit(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _run(topology_path: str | None, action: Callable[[Any], Awaitable[T]]) -> T:
    import asyncpg

    from pom_ha.config import ConfigError, load_topology

    try:
        topo = load_topology(topology_path)
    except ConfigError as exc:
        _exit(str(exc), 2)
        raise

    async def go() -> T:
        try:
            conn = await asyncpg.connect(topo.postgres.dsn(), timeout=5)
        except (OSError, asyncpg.PostgresError) as exc:
            raise AdminError(f"PostgreSQL at {topo.postgres.address}:{topo.postgres.port} unreachable: {exc}") \
                from None
        try:
            return await action(conn)
        finally:
            await conn.close()

    try:
        return asyncio.run(go())
    except (InvalidSpec, InvalidCampaign, ValueError) as exc:
        if isinstance(exc, AdminError):
            _exit(str(exc), 1)
        _exit(str(exc), 2)
        raise
    except AdminError as exc:
        _exit(str(exc), 1)
        raise


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value


def _show(value: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    if as_json:
        click.echo(json.dumps(_dump(value), indent=2, default=str))
    else:
        click.echo(text(value))


def _spec(model: type[Any], data: dict[str, Any], what: str) -> Any:
    try:
        return svc.parse(model, data, what)
    except InvalidSpec as exc:
        _exit(str(exc), 2)
        raise


def _confirm(yes: bool, what: str) -> None:
    if not yes and not click.confirm(f"{what}?", default=False):
        _exit("not confirmed (give --yes to skip the question)", 1)


def _json_arg(raw: str | None, option: str) -> Any:
    if raw is None:
        return None
    text = Path(raw[1:]).read_text() if raw.startswith("@") else raw
    try:
        return json.loads(text)
    except ValueError as exc:
        _exit(f"{option}: not valid JSON: {exc}", 2)
        raise


# ---- campaign -------------------------------------------------------------------------------------------
def _campaign_line(c: svc.CampaignSummary) -> str:
    job = f"job {c.active_job} {c.active_state}" if c.active_job else "no active job"
    return (f"{c.name:<24} list={c.contact_list} strategy={c.strategy or '-'} zone={c.zone} "
            f"dnc={','.join(c.dnc_lists) or '-'} {'ARCHIVED ' if c.archived else ''}{job}")


@campaign.command("list")
@click.option("--all", "include_archived", is_flag=True, help="archived campaigns too")
@json_option
@topology_option
def campaign_list(include_archived: bool, as_json: bool, topology_path: str | None) -> None:
    """Every campaign: list, strategy, zone, DNC lists, active job."""
    rows = _run(topology_path, lambda c: svc.list_campaigns(c, include_archived=include_archived))
    _show(rows, as_json, lambda rs: "\n".join(_campaign_line(r) for r in rs) or "no campaigns")


@campaign.command("show")
@click.argument("name")
@json_option
@topology_option
def campaign_show(name: str, as_json: bool, topology_path: str | None) -> None:
    """One campaign with its definition."""
    row = _run(topology_path, lambda c: svc.show_campaign(c, name))
    _show(row, as_json, lambda r: _campaign_line(r) + "\n" + json.dumps(r.definition, indent=2))


@campaign.command("edit")
@click.argument("name")
@click.option("--name", "new_name", default=None, help="rename")
@click.option("--strategy", default=None, help="contact strategy ('' to detach)")
@click.option("--pacing", default=None, help="pacing as JSON (or @file)")
@click.option("--finish", default=None, help="finish criteria as JSON (or @file)")
@click.option("--zone", default=None)
@click.option("--dnc", "dnc", multiple=True, help="the campaign's own DNC list (repeat); --dnc '' for none")
@json_option
@topology_option
def campaign_edit(name: str, new_name: str | None, strategy: str | None, pacing: str | None, finish: str | None,
                  zone: str | None, dnc: tuple[str, ...], as_json: bool, topology_path: str | None) -> None:
    """Change a campaign (refused while a job of it runs, except its DNC lists)."""
    edit = _spec(svc.CampaignEdit, {k: v for k, v in {
        "name": new_name, "strategy": strategy, "pacing": _json_arg(pacing, "--pacing"),
        "finish": _json_arg(finish, "--finish"), "zone": zone,
        "dnc_lists": [d for d in dnc if d] if dnc else None}.items() if v is not None}, "campaign edit")
    row = _run(topology_path, lambda c: svc.edit_campaign(c, name, edit))
    _show(row, as_json, lambda r: "changed: " + _campaign_line(r))


@campaign.command("archive")
@click.argument("name")
@click.option("--undo", is_flag=True, help="bring an archived campaign back")
@topology_option
def campaign_archive(name: str, undo: bool, topology_path: str | None) -> None:
    """Archive a campaign (hidden from `campaign list`, cannot be scheduled)."""
    row = _run(topology_path, lambda c: svc.archive_campaign(c, name, archived=not undo))
    click.echo(("archived: " if row.archived else "restored: ") + row.name)


@campaign.command("delete")
@click.argument("name")
@yes_option
@topology_option
def campaign_delete(name: str, yes: bool, topology_path: str | None) -> None:
    """Delete a campaign with its ended jobs (refused while a job runs)."""
    _confirm(yes, f"delete campaign {name!r} and its ended jobs")
    out = _run(topology_path, lambda c: svc.delete_campaign(c, name))
    click.echo(f"deleted campaign {name!r} ({out['jobs_deleted']} ended job(s))")


# ---- list -----------------------------------------------------------------------------------------------
def _list_line(s: svc.ListSummary) -> str:
    states = ", ".join(f"{k} {v}" for k, v in sorted(s.states.items()))
    return (f"{s.name:<24} {s.contacts} contact(s) region={s.default_region or '-'} "
            f"campaigns={','.join(s.campaigns) or '-'}" + (f" active: {states}" if states else ""))


@contact_list.command("ls")
@json_option
@topology_option
def list_ls(as_json: bool, topology_path: str | None) -> None:
    """Every contact list with its counts."""
    _show(_run(topology_path, svc.list_lists), as_json,
          lambda rs: "\n".join(_list_line(r) for r in rs) or "no contact lists")


@contact_list.command("show")
@click.argument("name")
@json_option
@topology_option
def list_show(name: str, as_json: bool, topology_path: str | None) -> None:
    """A contact list: contacts, campaigns, contacts of active jobs by state."""
    _show(_run(topology_path, lambda c: svc.show_list(c, name)), as_json, _list_line)


@contact_list.command("find")
@click.argument("name")
@click.option("--id", "contact_id", default=None)
@click.option("--phone", default=None)
@json_option
@topology_option
def list_find(name: str, contact_id: str | None, phone: str | None, as_json: bool, topology_path: str | None) -> None:
    """Contacts of a list by id or number."""
    if contact_id is None and phone is None:
        _exit("give --id or --phone", 2)
    rows = _run(topology_path, lambda c: svc.find_contacts(c, name, contact_id=contact_id, phone=phone))
    _show(rows, as_json, lambda rs: "\n".join(f"{r['id']} {r['phone']} {r['timezone']}" for r in rs) or "no match")


@contact_list.command("export")
@click.argument("name")
@click.argument("path", type=click.Path(dir_okay=False))
@topology_option
def list_export(name: str, path: str, topology_path: str | None) -> None:
    """Write a contact list to a CSV file (id, phone, timezone)."""
    text = _run(topology_path, lambda c: svc.export_list(c, name))
    Path(path).write_text(text)
    click.echo(f"{text.count(chr(10)) - 1} contact(s) written to {path}")


@contact_list.command("delete")
@click.argument("name")
@yes_option
@topology_option
def list_delete(name: str, yes: bool, topology_path: str | None) -> None:
    """Delete a contact list and its contacts (refused while a campaign uses it)."""
    _confirm(yes, f"delete contact list {name!r} and its contacts")
    out = _run(topology_path, lambda c: svc.delete_list(c, name))
    click.echo(f"deleted contact list {name!r} ({out['contacts_deleted']} contact(s))")


# ---- dnc ------------------------------------------------------------------------------------------------
@click.group("dnc")
def dnc() -> None:
    """Do-not-call lists: named, global or attached to campaigns; consulted by the Rule Engine."""


def _dnc_line(d: svc.DncSummary) -> str:
    scope = "global" if d.is_global else f"campaigns={','.join(d.campaigns) or '-'}"
    return f"{d.name:<24} {d.numbers} number(s) {scope}"


@dnc.command("create")
@click.argument("name")
@click.option("--global", "is_global", is_flag=True, help="applies to every campaign")
@click.option("--description", default="")
@json_option
@topology_option
def dnc_create(name: str, is_global: bool, description: str, as_json: bool, topology_path: str | None) -> None:
    """Create a DNC list."""
    req = _spec(svc.DncCreate, {"name": name, "is_global": is_global, "description": description}, "DNC list")
    _show(_run(topology_path, lambda c: svc.create_dnc(c, req)), as_json, lambda r: "created: " + _dnc_line(r))


@dnc.command("list")
@json_option
@topology_option
def dnc_list(as_json: bool, topology_path: str | None) -> None:
    """Every DNC list."""
    _show(_run(topology_path, svc.list_dnc), as_json, lambda rs: "\n".join(_dnc_line(r) for r in rs) or "no DNC lists")


@dnc.command("show")
@click.argument("name")
@json_option
@topology_option
def dnc_show(name: str, as_json: bool, topology_path: str | None) -> None:
    """One DNC list."""
    _show(_run(topology_path, lambda c: svc.show_dnc(c, name)), as_json, _dnc_line)


def _numbers(numbers: tuple[str, ...], file: str | None) -> list[str]:
    out = list(numbers)
    if file is not None:
        try:
            out += [ln.strip() for ln in Path(file).read_text().splitlines() if ln.strip() and ln.strip() != "phone"]
        except OSError as exc:
            _exit(f"cannot read {file}: {exc.strerror}", 2)
    if not out:
        _exit("give numbers or --file", 2)
    return out


def _dnc_change(op: str) -> Callable[..., None]:
    @click.argument("name")
    @click.argument("numbers", nargs=-1)
    @click.option("--file", "file", type=click.Path(dir_okay=False), default=None, help="one number a line")
    @click.option("--region", default=None, help="region of national numbers")
    @topology_option
    def run(name: str, numbers: tuple[str, ...], file: str | None, region: str | None,
            topology_path: str | None) -> None:
        req = _spec(svc.DncNumbers, {"numbers": _numbers(numbers, file), "default_region": region}, "DNC numbers")
        action = svc.add_dnc_numbers if op == "add" else svc.remove_dnc_numbers
        out = _run(topology_path, lambda c: action(c, name, req))
        click.echo(", ".join(f"{k} {v}" for k, v in out.items() if k != "list") + f" ({name})")

    run.__doc__ = f"{op.capitalize()} numbers (arguments or --file; all refused if one is invalid)."
    return run


dnc.command("add")(_dnc_change("add"))
dnc.command("remove")(_dnc_change("remove"))
dnc.command("import")(_dnc_change("add"))


@dnc.command("check")
@click.argument("number")
@click.option("--campaign", default=None, help="as that campaign's calls are checked (global + its own lists)")
@click.option("--region", default=None)
@json_option
@topology_option
def dnc_check(number: str, campaign: str | None, region: str | None, as_json: bool, topology_path: str | None) -> None:
    """Is a number blocked, and by which lists (exit 0 either way)."""
    out = _run(topology_path, lambda c: svc.check_dnc(c, number, campaign=campaign, default_region=region))
    _show(out, as_json, lambda r: f"{r.number}: " + (f"BLOCKED by {', '.join(r.lists)}" if r.blocked else "not listed"))


@dnc.command("export")
@click.argument("name")
@click.argument("path", type=click.Path(dir_okay=False))
@topology_option
def dnc_export(name: str, path: str, topology_path: str | None) -> None:
    """Write a DNC list to a file, one E.164 number a line."""
    phones = _run(topology_path, lambda c: svc.export_dnc(c, name))
    Path(path).write_text("".join(p + "\n" for p in phones))
    click.echo(f"{len(phones)} number(s) written to {path}")


@dnc.command("delete")
@click.argument("name")
@yes_option
@topology_option
def dnc_delete(name: str, yes: bool, topology_path: str | None) -> None:
    """Delete a DNC list (refused while attached to a campaign)."""
    _confirm(yes, f"delete DNC list {name!r}")
    out = _run(topology_path, lambda c: svc.delete_dnc(c, name))
    click.echo(f"deleted DNC list {name!r} ({out['numbers_deleted']} number(s))")


# ---- strategy -------------------------------------------------------------------------------------------
@click.group("strategy")
def strategy() -> None:
    """Contact strategies: calling windows per weekday and region, gaps, attempt caps, retry treatments."""


def _strategy_text(s: svc.StrategySummary) -> str:
    return f"{s.name}: used by {', '.join(s.campaigns) or 'no campaign'}\n" + json.dumps(
        s.spec.model_dump(mode="json"), indent=2)


@strategy.command("create")
@click.argument("name")
@click.option("--spec", "spec", default=None, help="StrategySpec as JSON or @file (absent fields: pim_config)")
@json_option
@topology_option
def strategy_create(name: str, spec: str | None, as_json: bool, topology_path: str | None) -> None:
    """Create a contact strategy (defaults: today's pim_config Rule Engine settings)."""
    req = _spec(svc.StrategyCreate, {"name": name, "spec": _json_arg(spec, "--spec") or {}}, "contact strategy")
    _show(_run(topology_path, lambda c: svc.create_strategy(c, req)), as_json, _strategy_text)


@strategy.command("list")
@json_option
@topology_option
def strategy_list(as_json: bool, topology_path: str | None) -> None:
    """Every contact strategy."""
    _show(_run(topology_path, svc.list_strategies), as_json,
          lambda rs: "\n".join(f"{r.name:<24} campaigns={','.join(r.campaigns) or '-'}" for r in rs) or "no strategies")


@strategy.command("show")
@click.argument("name")
@json_option
@topology_option
def strategy_show(name: str, as_json: bool, topology_path: str | None) -> None:
    """One contact strategy."""
    _show(_run(topology_path, lambda c: svc.show_strategy(c, name)), as_json, _strategy_text)


@strategy.command("edit")
@click.argument("name")
@click.option("--spec", "spec", required=True, help="fields to change, as JSON or @file")
@json_option
@topology_option
def strategy_edit(name: str, spec: str, as_json: bool, topology_path: str | None) -> None:
    """Change a strategy: the Rule Engine applies windows at its next check; says when treatments apply."""
    changes = _json_arg(spec, "--spec")
    if not isinstance(changes, dict):
        _exit("--spec: a JSON object", 2)
    out = _run(topology_path, lambda c: svc.edit_strategy(c, name, changes))
    _show(out, as_json, lambda r: f"changed {name}: {r['detail']}")


@strategy.command("delete")
@click.argument("name")
@yes_option
@topology_option
def strategy_delete(name: str, yes: bool, topology_path: str | None) -> None:
    """Delete a strategy (refused while a campaign uses it)."""
    _confirm(yes, f"delete contact strategy {name!r}")
    _run(topology_path, lambda c: svc.delete_strategy(c, name))
    click.echo(f"deleted contact strategy {name!r}")


# ---- schedule -------------------------------------------------------------------------------------------
@click.group("schedule")
def schedule() -> None:
    """Recurring campaign starts (RFC 5545 rule or cron, in a time zone) and holiday calendars."""


def _schedule_line(s: svc.ScheduleSummary) -> str:
    return (f"{s.id:>4} {s.name or '-':<20} {s.campaign or '-':<16} {s.kind} {s.expression or ''} {s.tz or ''} "
            f"cal={s.calendar or '-'} {s.state} next={s.next_due.isoformat()} fired={s.fired_count} "
            f"skipped={s.skipped_count}")


@schedule.command("create")
@click.argument("name")
@click.option("--campaign", required=True)
@click.option("--rrule", default=None, help="RFC 5545 rule, e.g. FREQ=WEEKLY;BYDAY=MO,WE;BYHOUR=9;BYMINUTE=0")
@click.option("--cron", default=None, help="cron expression, e.g. '0 9 * * 1-5'")
@click.option("--tz", required=True, help="IANA time zone the rule reads its wall clock in")
@click.option("--calendar", default=None, help="holiday calendar: no start on its days")
@click.option("--start", default=None, help="first possible occurrence (ISO 8601 with zone; default now)")
@json_option
@topology_option
def schedule_create(name: str, campaign: str, rrule: str | None, cron: str | None, tz: str, calendar: str | None,
                    start: str | None, as_json: bool, topology_path: str | None) -> None:
    """A recurring start of a campaign (a missed one fires once, late, when a Common CD is back)."""
    if (rrule is None) == (cron is None):
        _exit("give exactly one of --rrule and --cron", 2)
    req = _spec(svc.ScheduleCreate, {"name": name, "campaign": campaign, "kind": "rrule" if rrule else "cron",
                                     "expression": rrule or cron, "tz": tz, "calendar": calendar, "start": start},
                "schedule")
    made = _run(topology_path, lambda c: svc.create_schedule(c, req))
    _show(made, as_json, lambda r: "created: " + _schedule_line(r))


@schedule.command("list")
@json_option
@topology_option
def schedule_list(as_json: bool, topology_path: str | None) -> None:
    """Every schedule (one-shot, interval and recurring)."""
    _show(_run(topology_path, svc.list_schedules), as_json,
          lambda rs: "\n".join(_schedule_line(r) for r in rs) or "no schedules")


@schedule.command("show")
@click.argument("name")
@json_option
@topology_option
def schedule_show(name: str, as_json: bool, topology_path: str | None) -> None:
    """One schedule (by name or id), with its last holiday skip."""
    _show(_run(topology_path, lambda c: svc.show_schedule(c, name)), as_json,
          lambda r: _schedule_line(r) + (f"\nlast skipped: {r.last_skip}" if r.last_skip else ""))


@schedule.command("delete")
@click.argument("name")
@yes_option
@topology_option
def schedule_delete(name: str, yes: bool, topology_path: str | None) -> None:
    """Cancel a schedule."""
    _confirm(yes, f"cancel schedule {name!r}")
    _run(topology_path, lambda c: svc.delete_schedule(c, name))
    click.echo(f"cancelled schedule {name!r}")


@schedule.command("calendar")
@click.argument("name")
@click.option("--country", default=None, help="ISO 3166 country of the public holidays")
@click.option("--region", "subdivision", default=None, help="state or region, e.g. CA")
@click.option("--date", "dates", multiple=True, help="a custom holiday (YYYY-MM-DD), repeat")
@json_option
@topology_option
def schedule_calendar(name: str, country: str | None, subdivision: str | None, dates: tuple[str, ...],
                      as_json: bool, topology_path: str | None) -> None:
    """Create a holiday calendar."""
    try:
        parsed = [date.fromisoformat(d) for d in dates]
    except ValueError as exc:
        _exit(f"--date: {exc}", 2)
        return
    req = _spec(svc.CalendarCreate, {"name": name, "country": country, "subdivision": subdivision,
                                     "custom_dates": parsed}, "holiday calendar")
    _show(_run(topology_path, lambda c: svc.create_calendar(c, req)), as_json,
          lambda r: f"created holiday calendar {r['name']} (id {r['id']})")


GROUPS = (dnc, strategy, schedule)


#: every group of campaign administration, for pom_ha/cli.py (this module adds its commands to campaign and list)
COMMANDS: tuple[click.Group, ...] = (campaign, contact_list, job, dnc, strategy, schedule)
