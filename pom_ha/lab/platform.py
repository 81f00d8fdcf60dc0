"""The lab's pom-ha daemons on every POM server, and the demo campaign that dials.

``start_platform`` starts, on every server of the topology: a cache service (supervising the server's Ignite
node), a media-platform simulator, a Rule Engine, a Campaign Director (Common CD + the topology's zones), a
Campaign Manager, an Agent Manager (the topology's zones) and an Enriched Attempt Aggregator, each under
the server's uid (the cache service as the operator, so that it can start its node under that uid).
``wait_platform`` waits until each HA component has registered on every server and the singletons have a
master. ``create_demo`` makes an agentless campaign over a generated list of contacts (imported by the
Common CD from a CSV file, like an operator's import) and starts it. ``create_agent_demo`` adds an
agent-based (predictive) campaign in each of the topology's first two zones over the same list, and
``start_desktops`` a desktop simulator per zone (``services/desktop_simulator``, 50 bot agents attached
to that zone's job). Everything is idempotent: a second ``lab up`` leaves running daemons alone and does
not create a second demo.
"""

from __future__ import annotations

import asyncio
import csv
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from pom_ha.config import Topology
from pom_ha.infra.base import port_in_use
from pom_ha.infra.process import InfraError, ProcessRecord, records
from pom_ha.lab.daemons import start_daemon

# start order: what the others talk to comes first
PLATFORM_DAEMONS = ("cache-service", "media-simulator", "rule-engine", "campaign-director", "campaign-manager",
                    "agent-manager", "event-aggregator", "rest-api")
HA_SERVICES = {"cache-service": "cache_service", "rule-engine": "rule_engine",
               "campaign-director": "campaign_director", "campaign-manager": "campaign_manager",
               "agent-manager": "agent_manager", "event-aggregator": "event_aggregator"}
SINGLETONS = ("rule_engine", "campaign_director", "event_aggregator")
# the cache service starts its server's Ignite node under that server's uid (setpriv), so it runs as the
# lab operator, like the launchers; every other daemon runs under its server's uid
AS_OPERATOR = frozenset({"cache-service"})
DEMO_CAMPAIGN = "demo-agentless"
AGENT_CAMPAIGN = "demo-agents"  # one per zone: demo-agents-<zone>
AGENTS_PER_ZONE = 50
DEMO_LIST = "demo-contacts"
# time zones the demo contacts live in; only those whose local time is inside the default calling
# window (08:00-21:00) when the demo is created are used, so the demo dials whenever it is started
DEMO_ZONES = (
    "Pacific/Auckland", "Australia/Sydney", "Asia/Tokyo", "Asia/Kolkata", "Asia/Dubai", "Europe/Moscow",
    "Europe/Berlin", "Europe/London", "America/Sao_Paulo", "America/New_York", "America/Chicago",
    "America/Denver", "America/Los_Angeles", "Pacific/Honolulu",
)


def daemon_args(topo: Topology, daemon: str) -> list[str]:
    if daemon == "campaign-director":
        return [arg for zone in topo.zones for arg in ("--zone", zone.name)]
    if daemon == "media-simulator":
        # calls last a tenth of their simulated length: the demo moves along while staying readable
        return ["--time-scale", "0.1"]
    return []


def _record_name(daemon: str, server: str) -> str:
    return f"{daemon}-{server}"


def call_log_path(topo: Topology, server: str) -> Path:
    """The media simulator's call log of ``server`` (one JSON line per call placed; ``pom-ha chaos check``
    reads it). Its folder belongs to the server's uid, which the simulator runs under."""
    return topo.lab_dir() / "calls" / f"{server}.jsonl"


def server_daemon_args(topo: Topology, daemon: str, server: str) -> list[str]:
    """:func:`daemon_args` plus what depends on the server (the media simulator's call log)."""
    args = daemon_args(topo, daemon)
    if daemon == "media-simulator":
        path = call_log_path(topo, server)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o1777)  # every server uid writes its own file here
        args += ["--call-log", str(path)]
    return args


def start_platform(topo: Topology, topology_file: Path, echo: Callable[[str], None] = print) -> list[ProcessRecord]:
    """Start every platform daemon that is not already running; returns the records of those started."""
    run_dir = topo.lab_dir() / "run"
    running = {r.name for r in records(run_dir) if r.alive()}
    started: list[ProcessRecord] = []
    for daemon in PLATFORM_DAEMONS:
        for server in topo.servers:
            name = _record_name(daemon, server.name)
            if name in running:
                continue
            started.append(start_daemon(topo, topology_file, server.name, daemon,
                                        *server_daemon_args(topo, daemon, server.name),
                                        name=name, as_server_uid=daemon not in AS_OPERATOR))
        echo(f"  {daemon}: started on {', '.join(s.name for s in topo.servers)}")
    return started


async def wait_platform(topo: Topology, timeout_s: float = 90.0) -> None:
    """Until every HA component is registered on every server (not STOPPED), each singleton has a master,
    and every media simulator listens. Raises InfraError naming what is missing, with its log file."""
    servers = [s.name for s in topo.servers]
    deadline = time.monotonic() + timeout_s
    missing: list[str] = []
    conn = await asyncpg.connect(topo.postgres.dsn(), timeout=5)
    try:
        while time.monotonic() < deadline:
            rows = await conn.fetch(
                "SELECT service, server, state FROM ha_member WHERE state <> 'STOPPED'"
                " AND seen_at > now() - interval '5 seconds'"
            )
            have = {(r["service"], r["server"]) for r in rows}
            masters = {r["service"] for r in rows if r["state"] == "MASTER"}
            missing = [f"{svc} on {srv}" for svc in HA_SERVICES.values() for srv in servers if (svc, srv) not in have]
            missing += [f"a {svc} master" for svc in SINGLETONS if svc not in masters]
            missing += [
                f"media-simulator on {s.name}" for s in topo.servers
                if not port_in_use(s.address, topo.ports.media_simulator)
            ]
            if not missing:
                return
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    logs = topo.lab_dir() / "logs"
    raise InfraError(f"platform not up within {timeout_s:.0f} s: missing {', '.join(missing)} (logs in {logs})")


def write_demo_csv(path: Path, contacts: int, *, now: datetime | None = None, seed: int = 7) -> int:
    """A CSV of ``contacts`` contacts in time zones where it is now calling time; returns the rows written."""
    now = now or datetime.now(UTC)
    zones = [z for z in DEMO_ZONES if 9 <= now.astimezone(ZoneInfo(z)).hour < 20] or ["Pacific/Kiritimati"]
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["id", "phone", "timezone", "segment"])
        for i in range(contacts):
            # valid numbers (libphonenumber checks imports): New York 212, exchanges 200-999
            out.writerow([f"demo-{i:06d}", f"+1212{2_000_000 + i:07d}", rng.choice(zones),
                          rng.choice(["gold", "silver", "new"])])
    path.chmod(0o644)
    return contacts


def demo_definition(calls_per_second: float) -> dict[str, Any]:
    return {
        "name": DEMO_CAMPAIGN,
        "contact_list": DEMO_LIST,
        "pacing": {"calls_per_second": calls_per_second},
        "strategy": {"max_attempts": 3, "default_retry_interval_s": 30,
                     "retry_intervals_s": {"BUSY": 10, "NO_ANSWER": 20}},
        "finish": {"all_contacts_done": True},
    }


async def create_demo(
    topo: Topology, *, contacts: int = 10_000, calls_per_second: float = 25.0, timeout_s: float = 120.0,
    echo: Callable[[str], None] = print,
) -> str:
    """Create and start the demo campaign unless it exists; returns what was done."""
    from pom_ha.campaign import admin

    conn = await asyncpg.connect(topo.postgres.dsn(), timeout=5)
    try:
        if await conn.fetchval("SELECT 1 FROM campaigns WHERE name = $1", DEMO_CAMPAIGN):
            return f"demo campaign {DEMO_CAMPAIGN!r} exists already"
        csv_path = topo.lab_dir() / "demo" / "contacts.csv"
        # the Common CD runs under a server uid: the folder and file must be readable by it
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        csv_path.parent.chmod(0o755)
        write_demo_csv(csv_path, contacts)
        if not await conn.fetchval("SELECT 1 FROM contact_lists WHERE name = $1", DEMO_LIST):
            await admin.create_list(conn, DEMO_LIST)
        imp = await admin.queue_import(conn, DEMO_LIST, csv_path=str(csv_path))
        echo(f"  demo: import {imp.id} of {contacts} contacts queued ({csv_path})")
        deadline = time.monotonic() + timeout_s
        state = None
        while time.monotonic() < deadline:
            row = await conn.fetchrow("SELECT state, imported, rejected, error FROM data_imports WHERE id = $1", imp.id)
            state = row["state"]
            if state in ("completed", "failed"):
                break
            await asyncio.sleep(0.2)
        if state != "completed":
            raise InfraError(f"demo import {imp.id} did not complete within {timeout_s:.0f} s (state {state})")
        echo(f"  demo: imported {row['imported']} contacts, rejected {row['rejected']}")
        await admin.create_campaign(conn, demo_definition(calls_per_second))
        job = await admin.start_campaign(conn, DEMO_CAMPAIGN)
        return f"demo campaign {DEMO_CAMPAIGN!r} started: job {job.id} dials at {calls_per_second:g} calls/s"
    finally:
        await conn.close()


def agent_definition(zone: str) -> dict[str, Any]:
    return {
        "name": f"{AGENT_CAMPAIGN}-{zone}",
        "contact_list": DEMO_LIST,
        "pacing": {"kind": "predictive", "abandon_cap": 0.03},
        "strategy": {"max_attempts": 3, "default_retry_interval_s": 30,
                     "retry_intervals_s": {"BUSY": 10, "NO_ANSWER": 20}},
        "finish": {"all_contacts_done": True},
    }


def agent_zones(topo: Topology) -> list[str]:
    """The zones that get an agent-based demo campaign: the topology's first two."""
    return [z.name for z in topo.zones[:2]]


async def create_agent_demo(topo: Topology, echo: Callable[[str], None] = print) -> dict[str, int]:
    """A predictive campaign per zone of :func:`agent_zones` over the demo list (which ``create_demo``
    imported), started unless it exists; returns each zone's job id."""
    from pom_ha.campaign import admin

    jobs: dict[str, int] = {}
    conn = await asyncpg.connect(topo.postgres.dsn(), timeout=5)
    try:
        for zone in agent_zones(topo):
            name = f"{AGENT_CAMPAIGN}-{zone}"
            job = await conn.fetchval("SELECT j.id FROM jobs j JOIN campaigns c ON c.id = j.campaign_id"
                                      " WHERE c.name = $1 ORDER BY j.id DESC LIMIT 1", name)
            if job is None:
                if not await conn.fetchval("SELECT 1 FROM campaigns WHERE name = $1", name):
                    await admin.create_campaign(conn, agent_definition(zone), zone=zone)
                job = (await admin.start_campaign(conn, name)).id
                echo(f"  demo: agent-based campaign {name!r} (predictive, abandon cap 3 %) started: job {job}"
                     f" in zone {zone}")
            jobs[zone] = int(job)
    finally:
        await conn.close()
    return jobs


def start_desktops(topo: Topology, topology_file: Path, jobs: dict[str, int], *, agents: int = AGENTS_PER_ZONE,
                   echo: Callable[[str], None] = print) -> list[ProcessRecord]:
    """A desktop simulator per zone of ``jobs`` (``agents`` bots attached to the zone's job), beside a
    different server each; those already running are left alone. Returns the records of those started."""
    run_dir = topo.lab_dir() / "run"
    running = {r.name for r in records(run_dir) if r.alive()}
    started: list[ProcessRecord] = []
    for i, (zone, job) in enumerate(sorted(jobs.items())):
        name = f"desktop-simulator-{zone}"
        if name in running:
            continue
        server = topo.servers[i % len(topo.servers)].name
        started.append(start_daemon(topo, topology_file, server, "desktop-simulator", "--zone", zone, "--agents",
                                    str(agents), "--job", str(job), "--agent-prefix", f"sim-{zone}-", name=name))
        echo(f"  desktop-simulator: {agents} agents of zone {zone} on job {job} (beside {server})")
    return started
