"""Campaign Director on real PostgreSQL with real campaign-director processes (pom1..pom3).

Campaign Managers are simulated by their side of the contract: ``ha_member`` rows (RUNNING, refreshed by
a task of the test, or left to go stale as a dead CM) and job rows moved as a CM would move them.
Conditions are polled with deadlines, never slept for; timing figures are printed, not asserted tightly.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pom_ha.campaign import admin
from pom_ha.config import REPO_ROOT, Topology
from pom_ha.domain.campaigns import InvalidCampaign
from pom_ha.infra.process import ProcessRecord, kill_process, log_tail, stop_process
from pom_ha.infra.stack import Stack
from pom_ha.lab.daemons import start_daemon

pytestmark = pytest.mark.integration
SERVERS = ["pom1", "pom2", "pom3"]
CD_HTTP_PORT = 7650  # /health of every director, on its own server's address
CD_TABLES = ("cd_alarms", "cd_purge_runs", "cd_exports", "job_commands", "cd_schedules", "cd_zone_home",
             "import_errors", "data_imports", "attempts", "job_contacts", "jobs", "campaigns", "contacts",
             "contact_lists")


# ---- fixtures and helpers ---------------------------------------------------------------------------------
@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute(f"TRUNCATE {', '.join(CD_TABLES)} RESTART IDENTITY CASCADE")
    await conn.execute("DELETE FROM ha_assignment WHERE service = 'campaign_manager'")
    # a test that played the allocator itself (tests/integration/test_campaign_manager.py) may hold the
    # Common CD lease for an hour: free it, or no director could become master
    await conn.execute("UPDATE ha_lease SET expires_at = now(), released_at = now()"
                       " WHERE service = 'campaign_director' AND holder_instance = 'test'")
    await conn.execute(
        "DELETE FROM ha_member WHERE service IN ('campaign_manager', 'campaign_director', 'zone_director')")
    yield conn
    await conn.close()


@dataclass
class Directors:
    topo: Topology
    topology_file: Path
    procs: dict[str, ProcessRecord] = field(default_factory=dict)

    def start(self, *servers: str) -> None:
        for server in servers or tuple(SERVERS):
            self.procs[server] = start_daemon(self.topo, self.topology_file, server, "campaign-director",
                                              "--http-port", str(CD_HTTP_PORT), "--cache", "off",
                                              name=f"cd-{server}-{uuid.uuid4().hex[:4]}")

    def kill(self, server: str) -> None:
        kill_process(self.procs[server])

    def terminate(self, server: str) -> None:
        stop_process(self.procs[server], self.topo.lab_dir() / "run", timeout_s=15)

    def stop_all(self) -> None:
        for rec in self.procs.values():
            stop_process(rec, self.topo.lab_dir() / "run", timeout_s=10)

    async def wait_heartbeats(self, timeout_s: float = 15.0) -> None:
        """Until every running director sees all the others on the Common CD's heartbeats (only then can a
        dormant corroborate a master's failure and take over before the lease expires)."""
        import aiohttp

        servers = [s for s, r in self.procs.items() if r.alive()]

        async def connected() -> bool:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
                for server in servers:
                    url = f"http://{self.topo.server(server).address}:{CD_HTTP_PORT}/health"
                    try:
                        async with http.get(url) as resp:
                            health = await resp.json()
                    except (aiohttp.ClientError, TimeoutError):
                        return False
                    if len(health["heartbeat"]["campaign_director"]["alive_peers"]) < len(servers) - 1:
                        return False
            return True
        await until(connected, "directors connected by heartbeats", timeout_s)

    def logs(self) -> str:
        return "\n".join(f"--- {s}\n{log_tail(r.log, 30)}" for s, r in self.procs.items())


@pytest.fixture
def directors(stack: Stack, topology_file: Path) -> Iterator[Directors]:
    d = Directors(stack.topo, topology_file)
    try:
        yield d
    finally:
        d.stop_all()


@dataclass
class FakeCMs:
    """Campaign Managers as the CD sees them: ha_member rows kept fresh by this task (or left to go stale)."""

    dsn: str
    alive: dict[str, tuple[str, int]] = field(default_factory=dict)  # server -> (instance, load)
    task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            while True:
                for server, (instance, load) in list(self.alive.items()):
                    await conn.execute(
                        "INSERT INTO ha_member (service, server, instance_id, state, load)"
                        " VALUES ('campaign_manager', $1, $2, 'RUNNING', $3) ON CONFLICT (service, server) DO UPDATE"
                        " SET instance_id = $2, state = 'RUNNING', load = $3, seen_at = now()", server, instance, load)
                await asyncio.sleep(0.1)
        finally:
            await conn.close()

    def add(self, server: str, load: int = 0) -> str:
        instance = uuid.uuid4().hex[:12]
        self.alive[server] = (instance, load)
        return instance

    def die(self, server: str) -> None:
        self.alive.pop(server, None)


@pytest.fixture
async def cms(pg_dsn: str, db: asyncpg.Connection) -> AsyncIterator[FakeCMs]:
    fake = FakeCMs(pg_dsn)
    fake.task = asyncio.create_task(fake.run())
    yield fake
    fake.task.cancel()
    await asyncio.gather(fake.task, return_exceptions=True)


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.05)


async def common_master(db: asyncpg.Connection, newer_than: int = 0, timeout_s: float = 15.0) -> tuple[str, int]:
    async def check() -> Any:
        return await db.fetchrow(
            "SELECT holder_server, epoch FROM ha_lease WHERE service = 'campaign_director' AND scope = ''"
            " AND expires_at > now() AND released_at IS NULL AND epoch > $1", newer_than)
    row = await until(check, f"a Common CD master above epoch {newer_than}", timeout_s)
    return str(row["holder_server"]), int(row["epoch"])


async def first_action(db: asyncpg.Connection, epoch: int, timeout_s: float = 15.0) -> Any:
    async def check() -> Any:
        return await db.fetchrow(
            "SELECT server, at, detail FROM ha_event WHERE service = 'campaign_director' AND scope = ''"
            " AND kind = 'first_fenced_action' AND epoch = $1", epoch)
    return await until(check, f"first fenced action of epoch {epoch}", timeout_s)


async def make_campaign(
    db: asyncpg.Connection, name: str, *, contacts: int = 0, finish: dict[str, Any] | None = None,
    schedule_start: datetime | None = None, custom_codes: list[dict[str, Any]] | None = None,
) -> int:
    list_name = f"{name}-list"
    made = await admin.create_list(db, list_name)
    if contacts:
        await db.copy_records_to_table("contacts", columns=["list_id", "contact_id", "phone", "timezone"], records=[
            (made.id, f"c{i:05d}", f"+1415555{i:04d}", "America/New_York") for i in range(contacts)])
    data: dict[str, Any] = {"name": name, "contact_list": list_name, "pacing": {"calls_per_second": 5}}
    if finish is not None:
        data["finish"] = finish
    if schedule_start is not None:
        data["schedule_start"] = schedule_start.isoformat()
    if custom_codes:
        data["custom_codes"] = custom_codes
    return (await admin.create_campaign(db, data)).id


async def running_job(db: asyncpg.Connection, campaign_id: int, owner: tuple[str, str] | None = None) -> int:
    """A job as a CM leaves it once filtered: Running, its contacts in job_contacts."""
    job_id = await admin.create_job(db, campaign_id)
    await db.execute("UPDATE jobs SET state = 'Running', started_at = now() WHERE id = $1", job_id)
    await db.execute(
        "INSERT INTO job_contacts (job_id, contact_id) SELECT $1, contact_id FROM contacts c"
        " JOIN jobs j ON j.list_id = c.list_id WHERE j.id = $1", job_id)
    if owner is not None:
        await db.execute(
            "INSERT INTO ha_assignment (service, item, owner_server, owner_instance)"
            " VALUES ('campaign_manager', $1, $2, $3)",
            f"job:{job_id}", owner[0], owner[1])
    return job_id


async def owner_of(db: asyncpg.Connection, job_id: int) -> Any:
    return await db.fetchrow("SELECT owner_server, owner_instance, epoch FROM ha_assignment"
                             " WHERE service = 'campaign_manager' AND item = $1", f"job:{job_id}")


async def _n_rows(fetch: Callable[[], Awaitable[list[Any]]], n: int) -> list[Any] | None:
    rows = await fetch()
    return rows if len(rows) == n else None


def csv_file(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o777)
    path = folder / name
    path.write_text(text)
    path.chmod(0o644)
    return path


@pytest.fixture
def workdir(stack: Stack) -> Path:
    path = stack.topo.lab_dir() / f"cd-work-{uuid.uuid4().hex[:6]}"
    path.mkdir(parents=True)
    path.chmod(0o777)
    return path


# ---- bad input --------------------------------------------------------------------------------------------
async def test_invalid_campaign_is_refused_and_nothing_is_created(
    db: asyncpg.Connection, topology_file: Path, workdir: Path
) -> None:
    await admin.create_list(db, "bad-list")
    bad = {"name": "bad campaign!", "contact_list": "bad-list", "pacing": {"calls_per_second": 5,
           "calls_per_minute": 10}, "strategy": {"max_attempts": 0}, "schedule_start": "2030-01-01T10:00:00+00:00"}
    with pytest.raises(InvalidCampaign) as refused:
        await admin.create_campaign(db, bad)
    fields = {e.field for e in refused.value.errors}
    assert {"name", "pacing", "strategy.max_attempts"} <= fields, fields
    with pytest.raises(admin.AdminError, match="contact list 'nowhere' does not exist"):
        await admin.create_campaign(db, {"name": "ok", "contact_list": "nowhere", "pacing": {"calls_per_second": 1},
                                         "schedule_start": "2030-01-01T10:00:00+00:00"})
    assert await db.fetchval("SELECT count(*) FROM campaigns") == 0
    assert await db.fetchval("SELECT count(*) FROM cd_schedules") == 0

    # the same through the CLI: exit status 2, every bad field named, nothing written
    definition = workdir / "bad.toml"
    definition.write_text('name = "bad campaign!"\ncontact_list = "bad-list"\n[pacing]\ncalls_per_second = -1\n')
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "pom_ha.cli", "campaign", "create", str(definition), "--topology",
                         str(topology_file)], capture_output=True, text=True, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=60)
    assert out.returncode == 2, out
    assert "invalid campaign definition" in out.stderr and "pacing.calls_per_second" in out.stderr, out.stderr
    assert await db.fetchval("SELECT count(*) FROM campaigns") == 0


async def test_csv_with_bad_rows_reports_lines_and_imports_good_rows(
    db: asyncpg.Connection, directors: Directors, workdir: Path, topology_file: Path
) -> None:
    await admin.create_list(db, "imports")
    text = (
        "id,phone,timezone,name\n"
        "a1,+14155550101,America/New_York,Ann\n"
        "a2,not-a-phone,America/New_York,Bob\n"       # line 3: bad phone
        "a3,+14155550103,Mars/Olympus,Cy\n"           # line 4: unknown time zone
        "a4,+14155550104,Europe/Paris,Di\n"
        ",+14155550105,Europe/Paris,Ed\n"             # line 6: missing id
        "a1,+14155550106,Europe/Paris,Fay\n"          # line 7: duplicate id
        "a7,+14155550107,Europe/Paris,Gus,extra\n"    # line 8: too many fields
        "a8,0044 20 7946 0958,Europe/London,Hal\n"
    )
    path = csv_file(workdir, "contacts.csv", text)
    queued = await admin.queue_import(db, "imports", csv_path=str(path))
    # a database-table source too, one bad row in it
    await db.execute("DROP TABLE IF EXISTS cd_test_source")
    await db.execute("CREATE TABLE cd_test_source (id text, phone text, timezone text, segment text)")
    await db.executemany("INSERT INTO cd_test_source VALUES ($1, $2, $3, $4)", [
        ("t1", "+33123456789", "Europe/Paris", "gold"), ("t2", "+33123456780", "Nowhere/Land", "x"),
        ("t3", "+33123456781", "Europe/Paris", None)])
    from_table = await admin.queue_import(db, "imports", table="cd_test_source")
    headless = await admin.queue_import(db, "imports",
                                        csv_path=str(csv_file(workdir, "no-ph.csv", "id,timezone\n1,UTC\n")))
    directors.start("pom1")

    async def finished() -> Any:
        return await db.fetchval("SELECT count(*) = 3 FROM data_imports WHERE state IN ('completed', 'failed')")
    await until(finished, "the three imports ended", 20)
    failed = await db.fetchrow("SELECT state, error FROM data_imports WHERE id = $1", headless.id)
    assert failed["state"] == "failed" and "missing required column(s): phone" in failed["error"], dict(failed)
    row = await db.fetchrow("SELECT imported, rejected, checkpoint, state FROM data_imports WHERE id = $1", queued.id)
    assert (row["imported"], row["rejected"], row["checkpoint"]) == (3, 5, 9), dict(row)
    errors = {r["line"]: r["reason"] for r in await db.fetch(
        "SELECT line, reason FROM import_errors WHERE import_id = $1", queued.id)}
    assert sorted(errors) == [3, 4, 6, 7, 8], errors
    assert "bad phone" in errors[3] and "unknown time zone 'Mars/Olympus'" in errors[4]
    assert "missing field 'id'" in errors[6] and "duplicate id 'a1'" in errors[7] and "too many fields" in errors[8]
    phones = {r["contact_id"]: r["phone"] for r in await db.fetch("SELECT contact_id, phone FROM contacts")}
    assert phones == {"a1": "+14155550101", "a4": "+14155550104", "a8": "+442079460958",
                      "t1": "+33123456789", "t3": "+33123456781"}, phones
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "pom_ha.cli", "list", "errors", str(queued.id), "--topology",
                         str(topology_file)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert out.returncode == 0, out
    assert "3 imported, 5 rejected" in out.stdout and "line 4: unknown time zone 'Mars/Olympus'" in out.stdout, out
    table_errors = await db.fetch("SELECT line, reason FROM import_errors WHERE import_id = $1", from_table.id)
    assert [(r["line"], "Nowhere/Land" in r["reason"]) for r in table_errors] == [(2, True)]


async def test_interrupted_import_resumes_from_its_checkpoint(
    db: asyncpg.Connection, directors: Directors, workdir: Path
) -> None:
    made = await admin.create_list(db, "resume")
    lines = ["id,phone,timezone"] + [f"r{i:04d},+1415555{i:04d},America/Chicago" for i in range(2500)]
    path = csv_file(workdir, "big.csv", "\n".join(lines) + "\n")
    queued = await admin.queue_import(db, "resume", csv_path=str(path))
    # what a master killed after committing its first batch leaves: 1,000 rows and checkpoint line 1001
    await db.copy_records_to_table("contacts", columns=["list_id", "contact_id", "phone", "timezone"], records=[
        (made.id, f"r{i:04d}", f"+1415555{i:04d}", "America/Chicago") for i in range(1000)])
    await db.execute("UPDATE data_imports SET state = 'running', checkpoint = 1001, imported = 1000,"
                     " started_at = now(), last_epoch = 999999 WHERE id = $1", queued.id)
    directors.start("pom1")

    async def done() -> Any:
        return await db.fetchrow("SELECT * FROM data_imports WHERE id = $1 AND state = 'completed'", queued.id)
    row = await until(done, "the import completed", 20)
    assert (row["imported"], row["rejected"], row["checkpoint"], row["resumed"]) == (2500, 0, 2501, 1), dict(row)
    assert await db.fetchval("SELECT count(*) FROM contacts WHERE list_id = $1", made.id) == 2500
    assert await db.fetchval("SELECT count(*) FROM import_errors") == 0


# ---- the guide's table: no Common CD up, then recovery -------------------------------------------------------
async def test_jobs_commands_schedules_and_imports_wait_for_a_master_then_run(
    db: asyncpg.Connection, directors: Directors, cms: FakeCMs, workdir: Path, topology_file: Path
) -> None:
    """Job state, pause/resume, job allocation (with a dead CM), scheduled starts and imports."""
    busy = cms.add("cmA", load=5)
    cms.add("cmB", load=0)
    dead_instance = uuid.uuid4().hex[:12]
    await db.execute("INSERT INTO ha_member (service, server, instance_id, state, seen_at) VALUES"
                     " ('campaign_manager', 'cmDead', $1, 'RUNNING', now() - interval '1 minute')", dead_instance)
    queued_c = await make_campaign(db, "queued", contacts=3)
    queued = await admin.start_campaign(db, "queued")  # started from the UI while no CD is up
    paused_c = await make_campaign(db, "to-pause", contacts=3)
    to_pause = await running_job(db, paused_c, owner=("cmA", busy))
    pause = await admin.request_job_command(db, to_pause, "pause")
    orphan_c = await make_campaign(db, "orphan", contacts=3)
    orphan = await running_job(db, orphan_c, owner=("cmDead", dead_instance))
    now = await db.fetchval("SELECT now()")
    await make_campaign(db, "missed-start", contacts=3)
    missed = await admin.start_campaign(db, "missed-start", at=now - timedelta(seconds=30))
    await admin.create_list(db, "late-import")
    path = csv_file(workdir, "late.csv", "id,phone,timezone\nx1,+14155550111,UTC\n")
    late_import = await admin.queue_import(db, "late-import", csv_path=str(path), at=now - timedelta(seconds=20))

    # no Common CD: nothing moves (the processes that could move it do not exist)
    assert await db.fetchval("SELECT state FROM jobs WHERE id = $1", queued.id) == "Queued"
    assert await owner_of(db, queued.id) is None
    assert await db.fetchval("SELECT state FROM jobs WHERE id = $1", to_pause) == "Running"
    assert (await owner_of(db, orphan))["owner_server"] == "cmDead"
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE campaign_id = (SELECT id FROM campaigns"
                             " WHERE name = 'missed-start')") == 0

    t0 = time.monotonic()
    directors.start("pom1", "pom2")
    _server, epoch = await common_master(db)
    await first_action(db, epoch)

    async def allocated() -> Any:
        return await owner_of(db, queued.id)
    got = await until(allocated, "the queued job allocated to a Campaign Manager")
    assert got["owner_server"] == "cmB", "the least busy CM gets the job"  # cmA publishes load 5
    print(f"queued job allocated {time.monotonic() - t0:.2f} s after the directors started")

    async def paused() -> Any:
        return await db.fetchval("SELECT state = 'Paused' FROM jobs WHERE id = $1", to_pause)
    await until(paused, "the pause requested while no CD was up applied")
    assert await db.fetchval("SELECT state FROM job_commands WHERE id = $1", pause.id) == "applied"

    async def moved() -> Any:
        row = await owner_of(db, orphan)
        return row is not None and row["owner_server"] != "cmDead" and row
    row = await until(moved, "the dead CM's job reallocated")
    assert row["epoch"] == 2 and row["owner_server"] in ("cmA", "cmB")

    async def recorded() -> Any:
        return await db.fetch("SELECT detail FROM ha_event WHERE kind = 'job_reallocated' AND epoch = $1", epoch)
    events = await until(recorded, "the reallocation recorded in ha_event")
    assert len(events) == 1 and '"from_server": "cmDead"' in events[0]["detail"], events

    async def fired() -> Any:
        return await db.fetchrow("SELECT * FROM cd_schedules WHERE id = $1 AND state = 'fired'", missed.id)
    sched = await until(fired, "the missed campaign start fired")
    assert sched["fired_count"] == 1 and sched["fired_late_ms"] >= 20000, dict(sched)
    jobs_of_missed = await db.fetch("SELECT j.id FROM jobs j JOIN campaigns c ON c.id = j.campaign_id"
                                    " WHERE c.name = 'missed-start'")
    assert len(jobs_of_missed) == 1, "a missed schedule fires ONCE"

    async def imported() -> Any:
        return await db.fetchrow("SELECT * FROM data_imports WHERE id = $1 AND state = 'completed'", late_import.id)
    imp = await until(imported, "the missed import ran")
    assert imp["imported"] == 1 and imp["fired_late_ms"] >= 15000

    async def reported() -> Any:
        rows = await db.fetch("SELECT decision FROM ha_event WHERE kind = 'schedule_fired_late' AND epoch = $1",
                              epoch)
        alarms = await db.fetchval("SELECT count(*) FROM cd_alarms WHERE kind = 'schedule_late'")
        return len(rows) == 2 and alarms == 2 and rows
    late_events = await until(reported, "both late firings reported (ha_event and alarm)")
    assert all("fired late" in r["decision"] for r in late_events), late_events
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "pom_ha.cli", "campaign", "alarms", "--topology", str(topology_file)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.count("OPEN") == 2 and "missed-start" in out.stdout, out
    # they stay fired once: a graceful handover to the other director fires nothing again
    assert await db.fetchval("SELECT count(*) FROM jobs j JOIN campaigns c ON c.id = j.campaign_id"
                             " WHERE c.name = 'missed-start'") == 1
    assert queued_c != orphan_c


async def test_finish_criteria_nuisance_export_and_purge_wait_for_a_master(
    db: asyncpg.Connection, directors: Directors, cms: FakeCMs, workdir: Path
) -> None:
    """Finish criteria, nuisance alarm, export resume and a purge cut off by a failure."""
    cm = cms.add("cmA")
    now = await db.fetchval("SELECT now()")
    finish = {"all_contacts_done": True, "end_time": (now - timedelta(minutes=1)).isoformat()}
    ended_c = await make_campaign(db, "end-time", contacts=4, finish=finish)
    past_end = await running_job(db, ended_c, owner=("cmA", cm))
    noisy_c = await make_campaign(db, "noisy", contacts=60)
    noisy = await running_job(db, noisy_c, owner=("cmA", cm))
    # 40 live answers in the window, 10 of them nuisance calls: 25 % > the 3 % cap
    await db.executemany(
        "INSERT INTO attempts (job_id, contact_id, attempt_no, state, code, cm_server, cm_instance, assignment_epoch,"
        " completed_at) VALUES ($1, $2, 1, 'completed', $3, 'cmA', $4, 1, now())",
        [(noisy, f"c{i:05d}", "NUISANCE" if i < 10 else "ANSWER_HUMAN", cm) for i in range(40)])
    # an export cut off after 20 of its 40 rows, plus half a row the failed master wrote after that checkpoint
    export_path = workdir / "noisy.csv"
    rows = await db.fetch("SELECT contact_id, attempt_no, state, code, cm_server, created_at, completed_at, duration_ms"
                          " FROM attempts WHERE job_id = $1 ORDER BY contact_id, attempt_no LIMIT 20", noisy)
    from services.campaign_director.exporter import HEADER, _csv_bytes
    written = _csv_bytes([HEADER]) + _csv_bytes([
        [noisy, r["contact_id"], r["attempt_no"], r["state"], r["code"], r["cm_server"], r["created_at"].isoformat(),
         r["completed_at"].isoformat(), ""] for r in rows])
    export_path.write_bytes(written + b"99,c9999,1,half-writ")
    export_path.chmod(0o666)
    export = await admin.queue_export(db, noisy, str(export_path))
    await db.execute("UPDATE cd_exports SET state = 'running', rows_written = 20, bytes_written = $2,"
                     " last_contact_id = $3, last_attempt_no = 1, last_epoch = 999999 WHERE id = $1",
                     export.id, len(written), rows[-1]["contact_id"])
    # a purge cut off by a failure; its schedule's next occurrence is a few seconds away
    old_c = await make_campaign(db, "old")
    old_job = await admin.create_job(db, old_c)
    await db.execute("UPDATE jobs SET state = 'Completed', ended_at = now() - interval '2 days' WHERE id = $1", old_job)
    purge = await admin.schedule_purge(db, first_at=now + timedelta(seconds=10), every_s=3600, retention_s=86400)
    cut_off = await db.fetchval("INSERT INTO cd_purge_runs (schedule_id, epoch) VALUES ($1, 999999) RETURNING id",
                                purge.id)

    # post-processing cut off: one ended job summarised by the failed master, one not yet
    ended_jobs = []
    for name in ("post-a", "post-b"):
        c = await make_campaign(db, name, contacts=2)
        j = await running_job(db, c, owner=("cmA", cm))
        await db.execute("UPDATE job_contacts SET state = 'done', final_code = 'BUSY' WHERE job_id = $1", j)
        await db.execute("UPDATE jobs SET state = 'Completed', ended_at = now() WHERE id = $1", j)
        ended_jobs.append(j)
    await db.execute("INSERT INTO cd_job_results (job_id, ended_state, contacts_total, contacts_done, attempts,"
                     " epoch) VALUES ($1, 'Completed', 2, 2, 0, 999999)", ended_jobs[0])

    directors.start("pom1")
    _server, epoch = await common_master(db)
    await first_action(db, epoch)

    async def post_processed() -> Any:
        return await db.fetch("SELECT job_id, epoch, contacts_done FROM cd_job_results WHERE job_id = ANY($1)"
                              " ORDER BY job_id", ended_jobs)
    results = await until(lambda: _n_rows(post_processed, 2), "post-processing resumed with the job left")
    assert [(r["epoch"] == epoch, r["contacts_done"]) for r in results] == [(False, 2), (True, 2)], results

    async def stopping() -> Any:
        return await db.fetchrow("SELECT state, ending, state_reason FROM jobs WHERE id = $1 AND state = 'Stopping'",
                                 past_end)
    job = await until(stopping, "finish criteria applied by the recovered CD")
    assert job["ending"] == "Completed" and "end time" in job["state_reason"], dict(job)
    assert await db.fetchval("SELECT state FROM jobs WHERE id = $1", noisy) == "Running"

    async def alarm() -> Any:
        return await db.fetch("SELECT * FROM cd_alarms WHERE kind = 'nuisance' AND job_id = $1", noisy)
    alarms = await until(alarm, "nuisance alarm raised")
    assert len(alarms) == 1 and "25.00%" in alarms[0]["message"], [dict(a) for a in alarms]

    async def trend() -> Any:
        return await db.fetchrow("SELECT * FROM cd_job_trends WHERE job_id = $1 AND epoch = $2", noisy, epoch)
    sample = await until(trend, "a trend sample of the running job")
    assert (sample["contacts_total"], sample["attempts"], sample["live_answers"], sample["nuisance"]) == (
        60, 40, 40, 10), dict(sample)

    async def exported() -> Any:
        return await db.fetchrow("SELECT * FROM cd_exports WHERE id = $1 AND state = 'completed'", export.id)
    done = await until(exported, "the export resumed and completed")
    assert done["rows_written"] == 40 and done["resumed"] == 1, dict(done)
    lines = export_path.read_text().splitlines()
    assert lines[0].startswith("job_id,contact_id") and len(lines) == 41
    assert len({line.split(",")[1] for line in lines[1:]}) == 40 and "c9999" not in export_path.read_text()

    async def abandoned() -> Any:
        return await db.fetchrow("SELECT * FROM cd_purge_runs WHERE id = $1 AND state = 'abandoned'", cut_off)
    run = await until(abandoned, "the cut-off purge marked abandoned")
    assert "not resumed" in run["note"]
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE id = $1", old_job) == 1, "purge waits for its schedule"

    async def purged() -> Any:
        return await db.fetchval("SELECT count(*) = 0 FROM jobs WHERE id = $1", old_job) and await db.fetchval(
            "SELECT count(*) = 0 FROM cd_purge_runs WHERE state = 'running'")
    await until(purged, "the next scheduled purge ran", 20)
    runs = await db.fetch("SELECT state, deleted_jobs, epoch FROM cd_purge_runs ORDER BY id")
    assert [(r["state"], r["deleted_jobs"]) for r in runs] == [("abandoned", 0), ("completed", 1)]
    assert await db.fetchval("SELECT due_at > now() + interval '50 minutes' FROM cd_schedules WHERE id = $1", purge.id)


# ---- failover -------------------------------------------------------------------------------------------------
async def test_sigkill_of_the_common_cd_a_dormant_takes_over(
    db: asyncpg.Connection, directors: Directors, cms: FakeCMs
) -> None:
    cms.add("cmA")
    directors.start()
    first, epoch = await common_master(db)
    await first_action(db, epoch)
    await directors.wait_heartbeats()
    await make_campaign(db, "after-kill", contacts=2)
    t_kill = time.monotonic()
    directors.kill(first)
    second, epoch2 = await common_master(db, newer_than=epoch, timeout_s=10)
    action = await first_action(db, epoch2)
    took_ms = (time.monotonic() - t_kill) * 1000
    assert second != first and action["server"] == second
    print(f"SIGKILL of the Common CD -> first fenced action of the new master: {took_ms:.0f} ms (test-side)")
    job = await admin.start_campaign(db, "after-kill")

    async def allocated() -> Any:
        return await owner_of(db, job.id)
    assert (await until(allocated, "a job allocated by the new master"))["owner_server"] == "cmA"

    async def shown_master() -> Any:
        return await db.fetchval("SELECT state = 'MASTER' FROM ha_member WHERE service = 'campaign_director'"
                                 " AND server = $1", second)
    await until(shown_master, f"{second} shown MASTER in ha_member")


async def test_graceful_stop_hands_over_at_once(db: asyncpg.Connection, directors: Directors) -> None:
    directors.start()
    first, epoch = await common_master(db)
    await first_action(db, epoch)
    t0 = time.monotonic()
    directors.terminate(first)
    second, epoch2 = await common_master(db, newer_than=epoch, timeout_s=5)
    await first_action(db, epoch2)
    print(f"graceful stop of the Common CD -> new master's first fenced action: {(time.monotonic() - t0) * 1000:.0f} ms"
          " (includes the old process's exit)")
    assert second != first
    gap = await db.fetchval(
        "SELECT EXTRACT(EPOCH FROM (f.at - r.at)) FROM ha_event r, ha_event f WHERE r.service = 'campaign_director'"
        " AND r.scope = '' AND r.kind = 'released' AND r.epoch = $1 AND f.kind = 'first_fenced_action'"
        " AND f.epoch = $2", epoch, epoch2)
    assert gap is not None and gap < 2.0, gap  # loose: the figure is the benchmark's to judge
    print(f"release -> first fenced action of the next master: {gap * 1000:.0f} ms")


async def test_a_recovered_cd_takes_its_zones_back(db: asyncpg.Connection, directors: Directors) -> None:
    directors.start()

    async def zones_held() -> Any:
        rows = await db.fetch("SELECT scope, holder_server FROM ha_lease WHERE service = 'zone_director'"
                              " AND expires_at > now() AND released_at IS NULL")
        homes = await db.fetchval("SELECT count(*) FROM cd_zone_home")
        return len(rows) == 2 and homes == 2 and {r["scope"]: r["holder_server"] for r in rows}
    before = await until(zones_held, "both zones held and their homes recorded", 20)
    zone, home = sorted(before.items())[0]
    assert await db.fetchval("SELECT home_server FROM cd_zone_home WHERE zone = $1", zone) == home
    common, _epoch = await common_master(db)
    directors.kill(home)

    async def taken_over() -> Any:
        holder = await db.fetchval("SELECT holder_server FROM ha_lease WHERE service = 'zone_director' AND scope = $1"
                                   " AND expires_at > now()", zone)
        return holder not in (None, home) and holder
    taker = await until(taken_over, f"zone {zone} taken over from {home}", 10)
    restarted_at = await db.fetchval("SELECT now()")
    directors.start(home)
    t0 = time.monotonic()

    async def back() -> Any:
        return await db.fetchval("SELECT holder_server = $2 FROM ha_lease WHERE service = 'zone_director'"
                                 " AND scope = $1 AND expires_at > now() AND released_at IS NULL", zone, home)
    await until(back, f"zone {zone} back with {home}", 20)
    print(f"zone {zone} back with its home {home} {time.monotonic() - t0:.2f} s after the restart")
    handed = await db.fetch("SELECT server, decision FROM ha_event WHERE kind = 'zone_handed_back' AND scope = $1"
                            " AND at > $2 ORDER BY id", zone, restarted_at)
    # the taker hands it back; if a third director wins the free lease first, it hands it back in turn
    assert handed and handed[0]["server"] == taker, handed
    assert all(r["server"] != home and f"back to {home}" in r["decision"] for r in handed), handed

    async def member_state() -> Any:
        return await db.fetchval("SELECT state FROM ha_member WHERE service = 'campaign_director' AND server = $1"
                                 " AND started_at > now() - interval '1 minute'", home)
    state = await until(member_state, "the recovered CD's member row")
    if common == home:
        assert state == "DORMANT", "a recovered Common CD comes back DORMANT"

    async def shown() -> Any:
        return await db.fetchval("SELECT $2 = ANY(scopes) FROM ha_member WHERE service = 'zone_director'"
                                 " AND server = $1", home, zone)
    await until(shown, f"{home}'s zone_director member row lists {zone}")


async def test_sigkill_mid_import_the_new_master_resumes_it(
    db: asyncpg.Connection, directors: Directors, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POM_CD_IMPORT_BATCH_ROWS", "500")
    made = await admin.create_list(db, "killed-import")
    total = 100_000
    lines = ["id,phone,timezone"] + [f"k{i:06d},+1415{2_000_000 + i:07d},America/Denver" for i in range(total)]
    lines[1001] = "bad,12,America/Denver"  # one bad row, line 1002
    path = csv_file(workdir, "killed.csv", "\n".join(lines) + "\n")
    directors.start("pom1", "pom2")
    first, epoch = await common_master(db)
    await first_action(db, epoch)
    queued = await admin.queue_import(db, "killed-import", csv_path=str(path))

    async def under_way() -> Any:
        return await db.fetchval("SELECT checkpoint > 2000 FROM data_imports WHERE id = $1 AND state = 'running'",
                                 queued.id)
    await until(under_way, "the import under way", 20)
    directors.kill(first)
    cut_at = await db.fetchval("SELECT checkpoint FROM data_imports WHERE id = $1", queued.id)

    async def done() -> Any:
        return await db.fetchrow("SELECT * FROM data_imports WHERE id = $1 AND state = 'completed'", queued.id)
    row = await until(done, "the import completed by the new master", 40)
    print(f"import cut at line {cut_at} by SIGKILL, resumed by the new master; {dict(row)}")
    if cut_at < total + 1:  # killed before its end (almost always): someone resumed it
        assert row["resumed"] >= 1 and row["last_epoch"] > epoch, dict(row)
    assert (row["imported"], row["rejected"], row["checkpoint"]) == (total - 1, 1, total + 1), dict(row)
    assert await db.fetchval("SELECT count(*) FROM contacts WHERE list_id = $1", made.id) == total - 1
    assert [tuple(r) for r in await db.fetch("SELECT line, reason LIKE 'bad phone%' FROM import_errors")] == [
        (1002, True)]


async def test_sigkill_mid_export_the_new_master_resumes_it_exactly(
    db: asyncpg.Connection, directors: Directors, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POM_CD_EXPORT_CHUNK_ROWS", "100")
    campaign = await make_campaign(db, "exported")
    job = await admin.create_job(db, campaign)
    total = 20_000
    await db.execute(
        "INSERT INTO attempts (job_id, contact_id, attempt_no, state, code, cm_server, cm_instance, assignment_epoch,"
        " completed_at) SELECT $1, 'c' || lpad(g::text, 6, '0'), 1 + g % 3, 'completed', 'BUSY', 'cmA', 'x', 1,"
        " now() FROM generate_series(1, $2) g", job, total)
    directors.start("pom1", "pom2")
    first, epoch = await common_master(db)
    await first_action(db, epoch)
    target = workdir / "big-export.csv"
    export = await admin.queue_export(db, job, str(target))

    async def under_way() -> Any:
        return await db.fetchval("SELECT rows_written > 1000 FROM cd_exports WHERE id = $1 AND state = 'running'",
                                 export.id)
    await until(under_way, "the export under way", 20)
    directors.kill(first)

    async def done() -> Any:
        return await db.fetchrow("SELECT * FROM cd_exports WHERE id = $1 AND state = 'completed'", export.id)
    row = await until(done, "the export completed by the new master", 40)
    assert row["rows_written"] == total and row["resumed"] >= 1 and row["last_epoch"] > epoch, dict(row)
    lines = target.read_text().splitlines()
    assert len(lines) == total + 1 and lines[0].startswith("job_id,")
    keys = [tuple(line.split(",")[1:3]) for line in lines[1:]]
    assert len(set(keys)) == total and keys == sorted(keys), "every attempt exactly once, in key order"
    assert target.stat().st_size == row["bytes_written"]


async def test_sigkill_mid_purge_it_is_not_resumed_the_next_schedule_purges(
    db: asyncpg.Connection, directors: Directors, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POM_CD_PURGE_BATCH_JOBS", "5")
    campaign = await make_campaign(db, "purged")
    old = 3000
    list_id = await db.fetchval("SELECT id FROM contact_lists WHERE name = 'purged-list'")
    await db.execute(
        "INSERT INTO jobs (campaign_id, list_id, state, ended_at) SELECT $1, $2, 'Completed',"
        " now() - interval '3 days' FROM generate_series(1, $3)", campaign, list_id, old)
    directors.start("pom1", "pom2")
    first, epoch = await common_master(db)
    await first_action(db, epoch)
    now = await db.fetchval("SELECT now()")
    every_s = 8
    purge = await admin.schedule_purge(db, first_at=now, every_s=every_s, retention_s=86400)

    async def under_way() -> Any:
        return await db.fetchval("SELECT deleted_jobs > 50 FROM cd_purge_runs WHERE state = 'running'")
    await until(under_way, "the purge under way", 20)
    directors.kill(first)

    async def abandoned() -> Any:
        return await db.fetchrow("SELECT * FROM cd_purge_runs WHERE state = 'abandoned'")
    cut = await until(abandoned, "the cut-off purge abandoned by the new master", 15)
    left = await db.fetchval("SELECT count(*) FROM jobs WHERE campaign_id = $1", campaign)
    assert 0 < left < old, left
    assert cut["epoch"] == epoch and "not resumed" in cut["note"]

    async def purged() -> Any:
        left = await db.fetchval("SELECT count(*) FROM jobs WHERE campaign_id = $1", campaign)
        return left == 0 and await db.fetchval("SELECT count(*) = 0 FROM cd_purge_runs WHERE state = 'running'")
    await until(purged, "the next scheduled purge deleted the rest", 30)
    runs = await db.fetch("SELECT state, started_at, epoch FROM cd_purge_runs ORDER BY id")
    assert [r["state"] for r in runs] == ["abandoned", "completed"], runs
    assert runs[1]["started_at"] >= now + timedelta(seconds=every_s), "the rest waited for the next occurrence"
    assert runs[1]["epoch"] > epoch
    assert await db.fetchval("SELECT fired_count FROM cd_schedules WHERE id = $1", purge.id) == 2


# ---- with the real Campaign Managers (the contract end to end) ----------------------------------------------------
def _noon_zone() -> str:
    """An Etc/GMT zone where it is about noon now: the calling window (08:00-21:00 local) is open."""
    offset = (12 - datetime.now(UTC).hour) % 24
    offset = offset - 24 if offset > 12 else offset
    return f"Etc/GMT{-offset:+d}"


async def test_campaigns_complete_with_real_campaign_managers_and_survive_a_cm_kill(
    stack: Stack, topology_file: Path, db: asyncpg.Connection, directors: Directors
) -> None:
    gap_before = await db.fetchval(
        "UPDATE pim_config p SET value = '0' FROM pim_config o WHERE p.key = o.key"
        " AND p.key = 'RuleEngineMinGapBetweenAttemptsMs' RETURNING o.value")
    run_dir = stack.topo.lab_dir() / "run"
    media = (stack.topo.server("pom3").address, stack.topo.ports.media_simulator)
    others = [
        start_daemon(stack.topo, topology_file, "pom1", "rule-engine", name=f"re-pom1-{uuid.uuid4().hex[:4]}"),
        start_daemon(stack.topo, topology_file, "pom3", "media-simulator", "--time-scale", "0.01", "--capacity",
                     "2000", "--seed", "7", "--outcomes", '{"ANSWER_HUMAN": 0.6, "BUSY": 0.2, "NO_ANSWER": 0.2}',
                     name=f"media-pom3-{uuid.uuid4().hex[:4]}"),
    ]
    cm_procs = {s: start_daemon(stack.topo, topology_file, s, "campaign-manager", "--media", f"{media[0]}:{media[1]}",
                                name=f"cm-{s}-{uuid.uuid4().hex[:4]}") for s in ("pom2", "pom3")}
    try:
        directors.start("pom1", "pom2")
        zone = _noon_zone()

        async def campaign(name: str, contacts: int, cps: int) -> int:
            made = await admin.create_list(db, f"{name}-list")
            await db.copy_records_to_table("contacts", columns=["list_id", "contact_id", "phone", "timezone"],
                                           records=[(made.id, f"c{i:05d}", f"+1415{len(name):03d}{i:05d}", zone)
                                                    for i in range(contacts)])
            await admin.create_campaign(db, {"name": name, "contact_list": f"{name}-list", "pacing": {
                "calls_per_second": cps}, "strategy": {"max_attempts": 3, "default_retry_interval_s": 0}})
            return (await admin.start_campaign(db, name)).id

        async def ended(job: int, timeout_s: float) -> str:
            async def check() -> Any:
                state = await db.fetchval("SELECT state FROM jobs WHERE id = $1", job)
                return state if state in ("Completed", "Stopped") else None
            try:
                return str(await until(check, f"job {job} ended", timeout_s))
            except AssertionError:
                tails = "\n".join(f"--- {r.name}\n{log_tail(r.log, 20)}" for r in [*cm_procs.values(), *others])
                raise AssertionError(f"{await db.fetchval('SELECT state FROM jobs WHERE id = $1', job)}\n"
                                     f"{directors.logs()}\n{tails}") from None

        first = await campaign("e2e-small", 30, 100)
        assert await ended(first, 40) == "Completed"

        async def unassigned() -> Any:
            return await owner_of(db, first) is None
        await until(unassigned, "the ended job unassigned by the Common CD")

        second = await campaign("e2e-kill", 400, 40)

        async def dialing() -> Any:
            owner = await owner_of(db, second)
            n = await db.fetchval("SELECT count(*) FROM attempts WHERE job_id = $1", second)
            return owner is not None and n >= 40 and owner
        owner = await until(dialing, "the second job dialing", 30)
        victim = str(owner["owner_server"])
        kill_process(cm_procs[victim])
        t_kill = time.monotonic()

        async def moved() -> Any:
            row = await owner_of(db, second)
            return row is not None and row["owner_server"] != victim and row
        moved_to = await until(moved, "the dead CM's job moved by the Common CD", 15)
        print(f"CM {victim} killed -> job moved to {moved_to['owner_server']} in "
              f"{(time.monotonic() - t_kill) * 1000:.0f} ms")
        assert await ended(second, 60) == "Completed"
        n, distinct = await db.fetchrow("SELECT count(*), count(DISTINCT (contact_id, attempt_no)) FROM attempts"
                                        " WHERE job_id = $1", second)
        assert n == distinct
        states = dict(await db.fetch("SELECT state, count(*) FROM job_contacts WHERE job_id = $1 GROUP BY state",
                                     second))
        assert states == {"done": 400}, states
    finally:
        for rec in [*cm_procs.values(), *others]:
            await asyncio.to_thread(stop_process, rec, run_dir, 10)
        await db.execute("UPDATE pim_config SET value = $1 WHERE key = 'RuleEngineMinGapBetweenAttemptsMs'",
                         gap_before)


async def test_a_zone_import_resumes_on_the_zones_next_director(
    db: asyncpg.Connection, directors: Directors, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guide's "Impact of the Zone Director failure": the running import resumes in the director that
    takes the zone over."""
    monkeypatch.setenv("POM_CD_IMPORT_BATCH_ROWS", "500")
    made = await admin.create_list(db, "zone-import")
    total = 60_000
    lines = ["id,phone,timezone"] + [f"z{i:06d},+1416{2_000_000 + i:07d},America/Toronto" for i in range(total)]
    path = csv_file(workdir, "zone.csv", "\n".join(lines) + "\n")
    directors.start()

    async def zone_holder() -> Any:
        return await db.fetchrow("SELECT holder_server, epoch FROM ha_lease WHERE service = 'zone_director'"
                                 " AND scope = 'Zone1' AND expires_at > now() AND released_at IS NULL")
    holder = await until(zone_holder, "a director for Zone1", 20)
    await directors.wait_heartbeats()
    with pytest.raises(admin.AdminError, match="unknown zone 'Nowhere'"):
        await admin.queue_import(db, "zone-import", csv_path=str(path), zone="Nowhere")
    queued = await admin.queue_import(db, "zone-import", csv_path=str(path), zone="Zone1")

    async def under_way() -> Any:
        return await db.fetchval("SELECT checkpoint > 2000 FROM data_imports WHERE id = $1 AND state = 'running'",
                                 queued.id)
    await until(under_way, "the zone import under way", 20)
    assert await db.fetchval("SELECT last_epoch FROM data_imports WHERE id = $1", queued.id) == holder["epoch"]
    directors.kill(holder["holder_server"])

    async def done() -> Any:
        return await db.fetchrow("SELECT * FROM data_imports WHERE id = $1 AND state = 'completed'", queued.id)
    row = await until(done, "the zone import completed by the zone's next director", 40)
    taker = await zone_holder()
    assert taker["holder_server"] != holder["holder_server"] and row["last_epoch"] == taker["epoch"], dict(row)
    assert row["resumed"] >= 1 and (row["imported"], row["rejected"]) == (total, 0), dict(row)
    assert await db.fetchval("SELECT count(*) FROM contacts WHERE list_id = $1", made.id) == total
