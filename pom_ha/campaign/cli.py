"""``pom-ha campaign | list | job``: the operator's campaign administration, over :mod:`pom_ha.campaign.admin`.

Each command opens one database connection (the topology's PostgreSQL), makes one request and prints
what was created; a refused request prints ``error: <reason>`` (every bad field for a campaign) and
exits with status 2, having written nothing.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from pom_ha.campaign import admin
from pom_ha.domain.campaigns import InvalidCampaign

T = TypeVar("T")

topology_option = click.option("--topology", "topology_path", type=click.Path(dir_okay=False), default=None,
                               envvar="POM_TOPOLOGY", help="topology file (default config/lab.toml)")


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _with_db(topology_path: str | None, action: Callable[[Any], Awaitable[T]]) -> T:
    import asyncpg

    from pom_ha.config import ConfigError, load_topology

    try:
        topo = load_topology(topology_path)
    except ConfigError as exc:
        _fail(str(exc))
        raise

    async def go() -> T:
        try:
            conn = await asyncpg.connect(topo.postgres.dsn(), timeout=5)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise admin.AdminError(f"cannot reach PostgreSQL at {topo.postgres.address}:{topo.postgres.port}: "
                                   f"{type(exc).__name__}") from None
        try:
            return await action(conn)
        finally:
            await conn.close()

    try:
        return asyncio.run(go())
    except (admin.AdminError, InvalidCampaign) as exc:
        _fail(str(exc))
        raise


def _when(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        _fail(f"--at {value!r}: expected an ISO 8601 time with a zone, e.g. 2026-12-01T21:00:00+00:00")
        raise
    if at.tzinfo is None:
        _fail(f"--at {value!r}: give the time zone (e.g. +00:00 or Z)")
    return at


# ---- campaign -------------------------------------------------------------------------------------------
@click.group("campaign")
def campaign() -> None:
    """Campaigns: create from a definition file, start now or at a time."""


@campaign.command("create")
@click.argument("definition_file", type=click.Path(dir_okay=False))
@click.option("--zone", default="Default", show_default=True, help="the zone the campaign's jobs run in")
@topology_option
def campaign_create(definition_file: str, zone: str, topology_path: str | None) -> None:
    """Create a campaign from a TOML or JSON definition (refused as a whole if any field is bad)."""
    try:
        data = admin.load_definition_file(definition_file)
    except admin.AdminError as exc:
        _fail(str(exc))
        return
    made = _with_db(topology_path, lambda conn: admin.create_campaign(conn, data, zone=zone))
    click.echo(f"campaign {data.get('name')!r} created (id {made.id})" + (f"; {made.detail}" if made.detail else ""))


@campaign.command("start")
@click.argument("name")
@click.option("--at", "at", default=None, help="start at this ISO 8601 time (with zone) instead of now")
@topology_option
def campaign_start(name: str, at: str | None, topology_path: str | None) -> None:
    """Queue a job of the campaign now (the Common CD gives it to a Campaign Manager), or schedule it."""
    when = _when(at)
    made = _with_db(topology_path, lambda conn: admin.start_campaign(conn, name, at=when))
    click.echo(f"{made.detail} ({made.kind} {made.id})")


# ---- list -----------------------------------------------------------------------------------------------
@click.group("list")
def contact_list() -> None:
    """Contact lists: create, import from a CSV file or a database table."""


@contact_list.command("create")
@click.argument("name")
@click.option("--region", default=None, help="default region of national numbers (ISO 3166, e.g. US)")
@topology_option
def list_create(name: str, region: str | None, topology_path: str | None) -> None:
    """Create an empty contact list (national numbers of its imports are read in --region)."""
    from pom_ha.campaign import service

    try:
        req = service.ListCreate(name=name, default_region=region)
    except ValueError as exc:
        _fail(str(exc))
        return
    made = _with_db(topology_path, lambda conn: service.create_list(conn, req))
    click.echo(f"contact list {name!r} created (id {made.id})")


@contact_list.command("import")
@click.argument("name")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None,
              help="CSV file (id,phone,timezone,...)")
@click.option("--table", default=None, help="database table with columns id, phone, timezone")
@click.option("--at", "at", default=None, help="run at this ISO 8601 time (with zone) instead of now")
@click.option("--zone", default=None, help="run it in this zone's director (default: the Common CD)")
@topology_option
def list_import(name: str, csv_path: str | None, table: str | None, at: str | None, zone: str | None,
                topology_path: str | None) -> None:
    """Queue an import; the Common CD (or the zone's director) runs it, resuming after a failover (bad rows
    are reported per line, see `list errors`)."""
    from pom_ha.config import ConfigError, load_topology

    when = _when(at)
    try:
        zones = tuple(z.name for z in load_topology(topology_path).zones)
    except ConfigError:
        zones = ()
    made = _with_db(topology_path, lambda conn: admin.queue_import(conn, name, csv_path=csv_path, table=table,
                                                                   at=when, zone=zone, known_zones=zones))
    click.echo(f"import {made.id} queued ({made.detail})")


@contact_list.command("errors")
@click.argument("import_id", type=int)
@topology_option
def list_errors(import_id: int, topology_path: str | None) -> None:
    """Progress of an import and its rejected lines (line number and reason)."""

    async def go(conn: Any) -> tuple[Any, list[Any]]:
        row = await conn.fetchrow("SELECT state, checkpoint, imported, rejected, error FROM data_imports WHERE id = $1",
                                  import_id)
        if row is None:
            raise admin.AdminError(f"no import {import_id}")
        return row, await conn.fetch("SELECT line, reason FROM import_errors WHERE import_id = $1 ORDER BY line",
                                     import_id)

    row, errors = _with_db(topology_path, go)
    click.echo(f"import {import_id}: {row['state']}, {row['imported']} imported, {row['rejected']} rejected, "
               f"{row['checkpoint']} lines processed" + (f"; error: {row['error']}" if row["error"] else ""))
    for e in errors:
        click.echo(f"  line {e['line']}: {e['reason']}")


@campaign.command("alarms")
@click.option("--all", "show_all", is_flag=True, help="cleared alarms too")
@topology_option
def campaign_alarms(show_all: bool, topology_path: str | None) -> None:
    """Alarms raised by the Common CD (nuisance rate over the cap, schedules that fired late)."""

    async def go(conn: Any) -> list[Any]:
        return list(await conn.fetch(
            "SELECT id, kind, job_id, message, raised_at, cleared_at FROM cd_alarms"
            " WHERE $1 OR cleared_at IS NULL ORDER BY id", show_all))

    rows = _with_db(topology_path, go)
    if not rows:
        click.echo("no alarms" if show_all else "no open alarms")
    for r in rows:
        state = f"cleared {r['cleared_at']:%Y-%m-%d %H:%M:%S}" if r["cleared_at"] else "OPEN"
        job = f" job {r['job_id']}" if r["job_id"] else ""
        click.echo(f"{r['id']:>5}  {r['raised_at']:%Y-%m-%d %H:%M:%S}  {state:<27} {r['kind']}{job}: {r['message']}")


# ---- job ------------------------------------------------------------------------------------------------
@click.group("job")
def job() -> None:
    """Jobs: list them; pause, resume or stop one (applied by the Common CD); change a running one over
    ActiveMQ (``job set``)."""


@job.command("list")
@topology_option
def job_list(topology_path: str | None) -> None:
    """Every job: state (and ending), its Campaign Manager and assignment epoch, the last reason."""
    rows = _with_db(topology_path, admin.list_jobs)
    if not rows:
        click.echo("no jobs")
        return
    header = ["JOB", "CAMPAIGN", "STATE", "CAMPAIGN MANAGER", "REASON"]
    table = [[str(r["id"]), r["campaign"], r["state"] + (f" -> {r['ending']}" if r["ending"] else ""),
              f"{r['owner_server']} (epoch {r['epoch']})" if r["owner_server"] else "-", r["state_reason"] or ""]
             for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *table, strict=False)]
    for line in [header, *table]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)).rstrip())


def _job_command(command: str) -> Callable[..., None]:
    @topology_option
    @click.argument("job_id", type=int)
    def run(job_id: int, topology_path: str | None) -> None:
        made = _with_db(topology_path, lambda conn: admin.request_job_command(conn, job_id, command))
        click.echo(made.detail)

    run.__doc__ = f"Request {command} of a job (applied by the Common CD master, refused now if impossible)."
    return run


for _command in ("pause", "resume", "stop"):
    job.command(_command)(_job_command(_command))


@job.command("set")
@click.argument("job_id", type=int)
@click.option("--pacing-rate", type=click.FloatRange(min=0, min_open=True, max=100_000), default=None,
              help="new dialing rate, calls per second")
@click.option("--pause", "action", flag_value="pause", default=None, help="pause the job")
@click.option("--resume", "action", flag_value="resume", help="resume the paused job")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.5, max=300), default=10.0, show_default=True,
              help="seconds to wait for a broker to accept the change and its Campaign Manager to apply it")
@topology_option
def job_set(job_id: int, pacing_rate: float | None, action: str | None, timeout_s: float,
            topology_path: str | None) -> None:
    """Change a running job now, over ActiveMQ: the Campaign Manager that runs it applies the change and
    answers (exit 0: applied; 2: refused or not answered, with the reason; nothing was applied then)."""
    from pom_ha.config import load_topology
    from pom_ha.config.addresses import stomp_addresses
    from pom_ha.ha.logsetup import configure_logging
    from pom_ha.messaging.runtime import RuntimeChange, RuntimeChangeError, new_request_id, send_runtime_change

    if (pacing_rate is None) == (action is None):
        _fail("give exactly one of --pacing-rate N, --pause, --resume")
    configure_logging("WARNING")  # broker failovers on stderr; stdout has the answer only
    what = "pacing_rate" if pacing_rate is not None else str(action)
    target = _with_db(topology_path, lambda conn: admin.runtime_target(conn, job_id, what))
    brokers = stomp_addresses(load_topology(topology_path))
    if not brokers:
        _fail("the topology has no ActiveMQ broker")
    import time

    change = RuntimeChange(job_id=job_id, action=what, request_id=new_request_id(),
                           owner_instance=target.owner_instance, epoch=target.epoch, pacing_rate=pacing_rate,
                           expires_ms=int((time.time() + timeout_s) * 1000))
    try:
        reply = asyncio.run(send_runtime_change(brokers, change, timeout_s=timeout_s))
    except RuntimeChangeError as exc:
        _fail(f"job {job_id}: {exc}")
        return
    where = f" by the Campaign Manager on {reply.cm_server}" if reply.cm_server else ""
    if reply.status != "applied":
        _fail(f"refused{where}: {reply.detail} (request {change.request_id})")
    click.echo(f"applied{where}: {reply.detail} (request {change.request_id})")


@job.command("export")
@click.argument("job_id", type=int)
@click.argument("path", type=click.Path(dir_okay=False))
@topology_option
def job_export(job_id: int, path: str, topology_path: str | None) -> None:
    """Queue a CSV export of a job's attempts (written by the Common CD, resumed after a failover)."""
    made = _with_db(topology_path, lambda conn: admin.queue_export(conn, job_id, path))
    click.echo(f"export {made.id} queued to {made.detail}")


@job.command("purge-schedule")
@click.option("--every", "every_s", type=click.IntRange(1), required=True, help="seconds between purges")
@click.option("--retention", "retention_s", type=click.IntRange(0), required=True,
              help="delete jobs that ended more than this many seconds ago")
@click.option("--at", "at", default=None, help="first purge at this ISO 8601 time (default now)")
@topology_option
def job_purge_schedule(every_s: int, retention_s: int, at: str | None, topology_path: str | None) -> None:
    """Purge ended jobs on a schedule (a purge cut off by a failover waits for its next occurrence)."""
    first = _when(at) or datetime.now(UTC)
    made = _with_db(topology_path, lambda conn: admin.schedule_purge(conn, first_at=first, every_s=every_s,
                                                                     retention_s=retention_s))
    click.echo(f"{made.detail} (schedule {made.id}, first at {first.isoformat()})")
