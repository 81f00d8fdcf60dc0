"""Operator requests: campaigns, contact lists, imports, starts, job commands, exports and purge schedules.

Every function validates completely before it writes, and writes in one transaction, so a refused
request leaves nothing behind (no half-created campaign). Work that belongs to the Common Campaign
Director is only *requested* here (a Queued job, a queued import, a pending command or schedule): the
master applies it under its lease fence, and a request made while no master is up waits for one.
Errors are :class:`AdminError` with a message meant for the operator.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pom_ha.domain.campaigns import validate_campaign
from pom_ha.domain.jobs import InvalidTransition, JobEvent, JobState, JobStatus, transition

TERMINAL = ("Completed", "Stopped")
COMMAND_EVENTS = {"pause": JobEvent.PAUSE, "resume": JobEvent.RESUME, "stop": JobEvent.STOP}


class AdminError(Exception):
    """A request that was refused; the message says why and what to do. ``kind``: refused | not_found |
    conflict (the REST status: 409, 404, 409)."""

    kind = "refused"


@dataclass(frozen=True)
class Created:
    kind: str
    id: int
    detail: str = ""


def job_status(state: str, ending: str | None) -> JobStatus:
    """A ``jobs`` row's (state, ending) as the domain's JobStatus (a Stopping row without an ending is
    treated as heading for Stopped, the conservative end)."""
    st = JobState(state)
    if st is JobState.STOPPING:
        return JobStatus(st, ending=JobState(ending or "Stopped"))
    return JobStatus(st)


def _readable_file(raw: str) -> str:
    path = Path(raw).absolute()
    if not path.is_file():
        raise AdminError(f"no CSV file at {path}")
    if not os.access(path, os.R_OK):
        raise AdminError(f"CSV file {path} is not readable")
    return str(path)


def _export_target(raw: str) -> str:
    target = Path(raw).absolute()
    if not target.parent.is_dir():
        raise AdminError(f"no folder {target.parent} for the export")
    return str(target)


async def _zone_known(conn: Any, zone: str) -> bool:
    zones = [r["name"] for r in await conn.fetch("SELECT name FROM zones")]
    return not zones or zone in zones


async def create_list(conn: Any, name: str) -> Created:
    name = name.strip()
    if not name or len(name) > 128:
        raise AdminError("a contact list needs a name of 1 to 128 characters")
    list_id = await conn.fetchval(
        "INSERT INTO contact_lists (name) VALUES ($1) ON CONFLICT (name) DO NOTHING RETURNING id", name
    )
    if list_id is None:
        raise AdminError(f"contact list {name!r} already exists")
    return Created("contact_list", int(list_id))


async def create_campaign(conn: Any, data: Mapping[str, Any], *, zone: str = "Default") -> Created:
    """Validate ``data`` (raises :class:`pom_ha.domain.campaigns.InvalidCampaign`), check what it refers to,
    then create the campaign and, if it has ``schedule_start``, its start schedule — all or nothing."""
    definition = validate_campaign(data)
    async with conn.transaction():
        if not await _zone_known(conn, zone):
            raise AdminError(f"unknown zone {zone!r}")
        list_id = await conn.fetchval("SELECT id FROM contact_lists WHERE name = $1", definition.contact_list)
        if list_id is None:
            raise AdminError(
                f"contact list {definition.contact_list!r} does not exist; create it first (pom-ha list create)"
            )
        campaign_id = await conn.fetchval(
            "INSERT INTO campaigns (name, definition, zone) VALUES ($1, $2::jsonb, $3)"
            " ON CONFLICT (name) DO NOTHING RETURNING id",
            definition.name, definition.model_dump_json(), zone,
        )
        if campaign_id is None:
            raise AdminError(f"campaign {definition.name!r} already exists")
        detail = ""
        if definition.schedule_start is not None:
            await conn.execute(
                "INSERT INTO cd_schedules (kind, campaign_id, due_at) VALUES ('campaign_start', $1, $2)",
                campaign_id, definition.schedule_start,
            )
            detail = f"start scheduled at {definition.schedule_start.isoformat()}"
    return Created("campaign", int(campaign_id), detail)


async def _campaign(conn: Any, name: str) -> Any:
    row = await conn.fetchrow("SELECT id, name, definition, zone FROM campaigns WHERE name = $1", name)
    if row is None:
        raise AdminError(f"no campaign named {name!r}")
    return row


async def start_campaign(conn: Any, name: str, *, at: datetime | None = None) -> Created:
    """Start now (a Queued job the Common CD allocates to a Campaign Manager) or at ``at`` (a schedule)."""
    if at is not None and (at.tzinfo is None or at.utcoffset() is None):
        raise AdminError(f"start time {at.isoformat()} needs a time zone (e.g. 2026-12-01T21:00:00+00:00)")
    async with conn.transaction():
        campaign = await _campaign(conn, name)
        if at is not None:
            sid = await conn.fetchval(
                "INSERT INTO cd_schedules (kind, campaign_id, due_at) VALUES ('campaign_start', $1, $2) RETURNING id",
                campaign["id"], at,
            )
            return Created("schedule", int(sid), f"start of {name!r} scheduled at {at.isoformat()}")
        return Created("job", await create_job(conn, campaign["id"]), f"job of {name!r} queued")


async def create_job(conn: Any, campaign_id: int) -> int:
    """A Queued job for the campaign (refused while it has an active job). Used by the admin command and,
    inside a fenced transaction, by the Common CD when a start schedule fires."""
    active = await conn.fetchrow(
        "SELECT id, state FROM jobs WHERE campaign_id = $1 AND state NOT IN ('Completed', 'Stopped')", campaign_id
    )
    if active is not None:
        raise AdminError(f"the campaign already has an active job {active['id']} ({active['state']})")
    row = await conn.fetchrow(
        "SELECT c.zone, l.id AS list_id, c.definition->>'contact_list' AS list_name FROM campaigns c"
        " LEFT JOIN contact_lists l ON l.name = c.definition->>'contact_list' WHERE c.id = $1",
        campaign_id,
    )
    if row is None:
        raise AdminError(f"no campaign with id {campaign_id}")
    if row["list_id"] is None:
        raise AdminError(f"the campaign's contact list {row['list_name']!r} no longer exists")
    return int(await conn.fetchval(
        "INSERT INTO jobs (campaign_id, list_id, zone) VALUES ($1, $2, $3) RETURNING id",
        campaign_id, row["list_id"], row["zone"],
    ))


async def queue_import(
    conn: Any, list_name: str, *, csv_path: str | None = None, table: str | None = None, at: datetime | None = None,
    zone: str | None = None, known_zones: tuple[str, ...] = (),
) -> Created:
    """Queue an import of a CSV file (read by the director, so an absolute path it can read) or of a
    database table (needs columns id, phone, timezone) into a contact list, now or at ``at``; run by the
    Common CD, or by ``zone``'s Zone Director (a zone of ``known_zones`` — the topology's —, of the
    ``zones`` table or one a director already leads)."""
    if (csv_path is None) == (table is None):
        raise AdminError("give exactly one source: a CSV file or a database table")
    if zone is not None:
        led = {r["scope"] for r in await conn.fetch(
            "SELECT scope FROM ha_lease WHERE service = 'zone_director' UNION SELECT name FROM zones")}
        if zone not in led and zone not in known_zones:
            known = ", ".join(sorted(led | set(known_zones))) or "none"
            raise AdminError(f"unknown zone {zone!r} (known: {known})")
    if at is not None and (at.tzinfo is None or at.utcoffset() is None):
        raise AdminError(f"import time {at.isoformat()} needs a time zone")
    if csv_path is not None:
        kind, source = "csv", _readable_file(csv_path)
    else:
        assert table is not None
        resolved = await conn.fetchval("SELECT to_regclass($1)::text", table)
        if resolved is None:
            raise AdminError(f"no database table {table!r}")
        columns = {r["attname"] for r in await conn.fetch(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
            table,
        )}
        missing = [c for c in ("id", "phone", "timezone") if c not in columns]
        if missing:
            raise AdminError(f"table {resolved} lacks column(s) {', '.join(missing)}")
        kind, source = "table", resolved
    async with conn.transaction():
        list_id = await conn.fetchval("SELECT id FROM contact_lists WHERE name = $1", list_name)
        if list_id is None:
            raise AdminError(f"no contact list named {list_name!r}")
        import_id = await conn.fetchval(
            "INSERT INTO data_imports (list_id, source_kind, source, scheduled_at, zone)"
            " VALUES ($1, $2, $3, coalesce($4, now()), $5) RETURNING id",
            list_id, kind, source, at, zone,
        )
    runner = f"zone {zone}'s director" if zone else "the Common CD"
    return Created("import", int(import_id), f"{kind} {source}, run by {runner}")


async def request_job_command(conn: Any, job_id: int, command: str) -> Created:
    """Queue pause/resume/stop for the Common CD; refused at once if the job's state cannot take it."""
    event = COMMAND_EVENTS.get(command)
    if event is None:
        raise AdminError(f"unknown job command {command!r}; use pause, resume or stop")
    row = await conn.fetchrow("SELECT state, ending FROM jobs WHERE id = $1", job_id)
    if row is None:
        raise AdminError(f"no job {job_id}")
    try:
        transition(job_status(row["state"], row["ending"]), event)
    except InvalidTransition as exc:
        raise AdminError(f"job {job_id}: {exc}") from None
    cid = await conn.fetchval(
        "INSERT INTO job_commands (job_id, command) VALUES ($1, $2) RETURNING id", job_id, command
    )
    return Created("command", int(cid), f"{command} of job {job_id} requested (applied by the Common CD)")


async def queue_export(conn: Any, job_id: int, path: str) -> Created:
    target = _export_target(path)
    if await conn.fetchval("SELECT 1 FROM jobs WHERE id = $1", job_id) is None:
        raise AdminError(f"no job {job_id}")
    eid = await conn.fetchval("INSERT INTO cd_exports (job_id, path) VALUES ($1, $2) RETURNING id", job_id, target)
    return Created("export", int(eid), target)


async def schedule_purge(conn: Any, *, first_at: datetime, every_s: int, retention_s: int) -> Created:
    if every_s <= 0 or retention_s < 0:
        raise AdminError("a purge needs a positive interval and a retention of 0 or more seconds")
    sid = await conn.fetchval(
        "INSERT INTO cd_schedules (kind, due_at, interval_s, retention_s) VALUES ('purge', $1, $2, $3) RETURNING id",
        first_at, every_s, retention_s,
    )
    return Created("schedule", int(sid), f"purge every {every_s} s of jobs ended over {retention_s} s ago")


async def list_jobs(conn: Any) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT j.id, c.name AS campaign, j.state, j.ending, j.state_reason, a.owner_server, a.epoch"
        " FROM jobs j JOIN campaigns c ON c.id = j.campaign_id"
        " LEFT JOIN ha_assignment a ON a.service = 'campaign_manager' AND a.item = 'job:' || j.id"
        " ORDER BY j.id"
    )
    return [dict(r) for r in rows]


def load_definition_file(path: str) -> dict[str, Any]:
    """A campaign definition from a JSON or TOML file, as raw data for :func:`create_campaign`."""
    import tomllib

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise AdminError(f"cannot read {p}: {exc.strerror}") from None
    try:
        data: Any = json.loads(text) if p.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise AdminError(f"{p} is not valid {'JSON' if p.suffix.lower() == '.json' else 'TOML'}: {exc}") from None
    if not isinstance(data, dict):
        raise AdminError(f"{p}: a campaign definition is a table/object")
    return data


@dataclass(frozen=True)
class RuntimeTarget:
    """The Campaign Manager that runs a job now (``ha_assignment``), for a runtime change over ActiveMQ."""

    job_id: int
    state: str
    owner_server: str
    owner_instance: str
    epoch: int


async def runtime_target(conn: Any, job_id: int, action: str) -> RuntimeTarget:
    """Who must apply a runtime change of ``job_id``; refused at once when no CM runs the job or its state
    cannot take ``action`` (pacing_rate, pause, resume)."""
    row = await conn.fetchrow(
        "SELECT j.state, j.ending, a.owner_server, a.owner_instance, a.epoch FROM jobs j"
        " LEFT JOIN ha_assignment a ON a.service = 'campaign_manager' AND a.item = 'job:' || j.id WHERE j.id = $1",
        job_id)
    if row is None:
        raise AdminError(f"no job {job_id}")
    state = str(row["state"])
    if state in TERMINAL or state == "Stopping":
        raise AdminError(f"job {job_id} is {state}: runtime changes apply to active jobs only")
    if action in ("pause", "resume"):
        try:
            transition(job_status(state, row["ending"]), COMMAND_EVENTS[action])
        except InvalidTransition as exc:
            raise AdminError(f"job {job_id}: {exc}") from None
    if row["owner_instance"] is None:
        raise AdminError(f"job {job_id} is not assigned to a Campaign Manager yet (state {state}); "
                         "a runtime change needs the CM that runs it")
    return RuntimeTarget(job_id, state, str(row["owner_server"]), str(row["owner_instance"]), int(row["epoch"]))
