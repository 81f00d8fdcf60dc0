"""Zone configuration "Save" vs "Save and Apply" with real PostgreSQL, real AM processes (pom1, pom2), in-test
desktop clients and a real desktop-simulator process. Conditions are polled with deadlines, never slept for.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from pom_ha.desktop.protocol import ForcedLogout
from pom_ha.infra.process import kill_process, log_tail, stop_process
from pom_ha.infra.stack import Stack
from pom_ha.lab.daemons import start_daemon
from tests.integration.test_agent_manager import (  # noqa: F401  (db, managers: fixtures)
    AM_SERVERS,
    Desk,
    Managers,
    db,
    holders,
    managers,
    until,
)

pytestmark = pytest.mark.integration
ZONE = "Zone1"


@pytest.fixture
async def zdb(db: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:  # noqa: F811
    await db.execute("DELETE FROM zone_apply_requests")
    await db.execute("UPDATE zones SET allocated_server = NULL")
    yield db


async def zone_cli(topology_file: Path, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pom_ha.zones.cli", "allocate", *args, "--topology", str(topology_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def allocated(pg: asyncpg.Connection, zone: str) -> str | None:
    value = await pg.fetchval("SELECT allocated_server FROM zones WHERE name = $1", zone)
    return None if value is None else str(value)


async def test_save_then_save_and_apply(
    stack: Stack, topology_file: Path, zdb: asyncpg.Connection, managers: Managers,  # noqa: F811
) -> None:
    pg = zdb
    h = await holders(pg)
    src, old_epoch = h[ZONE]
    dst = next(s for s in AM_SERVERS if s != src)
    other_zone = next(z for z in h if z != ZONE)
    addresses = [managers.address(src), managers.address(dst)]
    desks = [Desk(addresses, f"zc-{i}", ZONE) for i in range(4)]
    bystander = Desk([managers.address(h[other_zone][0])], "zc-other", other_zone)
    try:
        await asyncio.gather(*(d.start() for d in [*desks, bystander]))
        assert {d.client.session.master for d in desks if d.client.session} == {src}

        # bad input: nothing written
        code, out = await zone_cli(topology_file, "NoSuchZone", "--server", dst)
        assert code != 0 and "unknown zone 'NoSuchZone'" in out, out
        code, out = await zone_cli(topology_file, ZONE, "--server", "pom99")
        assert code != 0 and "unknown server 'pom99'" in out, out
        assert await allocated(pg, ZONE) is None
        # --apply without --yes: the warning, nothing written
        code, out = await zone_cli(topology_file, ZONE, "--server", dst, "--apply")
        assert code == 1 and "logs out EVERY agent of zone Zone1" in out and "--yes" in out, out
        assert await allocated(pg, ZONE) is None
        assert await pg.fetchval("SELECT count(*) FROM zone_apply_requests") == 0

        # Save: the allocation only
        code, out = await zone_cli(topology_file, ZONE, "--server", dst)
        assert code == 0 and "Nothing changes until it is applied" in out, out
        assert await allocated(pg, ZONE) == dst
        assert await pg.fetchval("SELECT count(*) FROM zone_apply_requests") == 0
        for d in desks:  # a round trip through the zone's master after the save: still there, same term
            await d.client.ready()
        assert (await holders(pg))[ZONE] == (src, old_epoch)
        assert all(d.client.logged_in.is_set() and d.client.session and d.client.session.master == src
                   for d in desks)
        assert not any(isinstance(f, ForcedLogout) for d in desks for f in d.frames)

        # Save and Apply to a server with no live AM: the master refuses it, nobody is logged out
        idle = next(s.name for s in stack.topo.servers if s.name not in AM_SERVERS)
        code, out = await zone_cli(topology_file, ZONE, "--server", idle, "--apply", "--yes")
        assert code == 0, out

        async def refused() -> bool:
            result = await pg.fetchval("SELECT result FROM zone_apply_requests WHERE allocated_server = $1", idle)
            return result is not None
        await until(refused, "the apply to a server without an AM answered")
        result = await pg.fetchval("SELECT result FROM zone_apply_requests WHERE allocated_server = $1", idle)
        assert result.startswith(f"refused: no live Agent Manager on {idle}"), result
        for d in desks:
            await d.client.not_ready()
        assert (await holders(pg))[ZONE] == (src, old_epoch)
        assert not any(isinstance(f, ForcedLogout) for d in desks for f in d.frames)

        # Save and Apply
        code, out = await zone_cli(topology_file, ZONE, "--server", dst, "--apply", "--yes")
        assert code == 0 and "saved and applied" in out, out

        async def forced_out() -> bool:
            return all(any(isinstance(f, ForcedLogout) and f.reason == "zone_reset" for f in d.frames)
                       for d in desks)
        await until(forced_out, "every desktop of the zone got FORCED_LOGOUT zone_reset")

        async def moved() -> bool:
            cur = (await holders(pg)).get(ZONE)
            row = await pg.fetchrow("SELECT available, master_server FROM agent_zone_status WHERE zone = $1", ZONE)
            return (cur is not None and cur[0] == dst and cur[1] > old_epoch and row is not None
                    and row["available"] and row["master_server"] == dst)
        try:
            await until(moved, f"{ZONE} mastered by {dst}", 20)
        except AssertionError:
            print(managers.logs())
            raise
        req = await pg.fetchrow("SELECT * FROM zone_apply_requests WHERE allocated_server = $1", dst)
        assert req["handled_by"] == src and req["logged_out"] == len(desks) and req["released_at"] is not None
        assert req["handled_at"] <= req["released_at"]

        async def back() -> bool:
            return all(d.client.logged_in.is_set() and d.client.available.is_set() and d.client.session
                       and d.client.session.master == dst for d in desks)
        await until(back, f"every desktop logged in again at {dst}")
        rows = await pg.fetch("SELECT agent_id, logged_in, epoch FROM agents WHERE zone = $1", ZONE)
        new_epoch = (await holders(pg))[ZONE][1]
        assert {r["agent_id"] for r in rows} == {d.agent_id for d in desks}
        assert all(r["logged_in"] and r["epoch"] == new_epoch for r in rows)
        # the other zone saw nothing; the zone does not go back to the releasing AM
        assert not any(isinstance(f, ForcedLogout) for f in bystander.frames)
        assert bystander.client.logged_in.is_set() and bystander.client.stats.logins == 1
        for d in desks:
            await d.client.not_ready()
        assert (await holders(pg))[ZONE][0] == dst
    finally:
        await asyncio.gather(*(d.close() for d in [*desks, bystander]))


async def test_desktop_simulator_takes_calls_and_follows_an_apply(
    stack: Stack, topology_file: Path, zdb: asyncpg.Connection, managers: Managers,  # noqa: F811
) -> None:
    pg = zdb
    h = await holders(pg)
    src, old_epoch = h[ZONE]
    dst = next(s for s in AM_SERVERS if s != src)
    prefix = f"sim{uuid.uuid4().hex[:4]}-"
    n = 5
    sim = start_daemon(stack.topo, topology_file, dst, "desktop-simulator", "--zone", ZONE, "--agents", str(n),
                       "--talk-s", "0.2", "--wrap-s", "0.1", "--jitter", "0", "--report-s", "0.3",
                       "--agent-prefix", prefix, "--job", "job-sim", name=f"desksim-{uuid.uuid4().hex[:4]}")
    try:
        async def logged_in(epoch: int | None = None) -> bool:
            rows = await pg.fetch("SELECT logged_in, ready, epoch FROM agents WHERE zone = $1 AND agent_id LIKE $2",
                                  ZONE, prefix + "%")
            return len(rows) == n and all(r["logged_in"] and r["ready"] and (epoch is None or r["epoch"] == epoch)
                                          for r in rows)
        try:
            await until(logged_in, f"{n} simulated agents logged in and ready at {src}", 30)
        except AssertionError:
            print(log_tail(sim.log), managers.logs())
            raise

        async def calls_done(tag: str) -> bool:
            rows = await pg.fetch("SELECT call_state, last_completion_code, last_closed_call_id FROM agents"
                                  " WHERE zone = $1 AND agent_id LIKE $2", ZONE, prefix + "%")
            return all(r["call_state"] == "Idle" and r["last_completion_code"] == "SALE"
                       and (r["last_closed_call_id"] or "").startswith(tag) for r in rows)

        async def offer_all(tag: str) -> None:
            for i in range(1, n + 1):
                await pg.execute("INSERT INTO agent_call_command (zone, agent_id, event, call_id) VALUES"
                                 " ($1, $2, 'offered', $3)", ZONE, f"{prefix}{i:04d}", f"{tag}{i}")
            await until(lambda: calls_done(tag), f"the bots answered, talked and wrapped up {tag} calls", 20)

        await offer_all("c1-")
        code, out = await zone_cli(topology_file, ZONE, "--server", dst, "--apply", "--yes")
        assert code == 0, out

        async def moved() -> bool:
            cur = (await holders(pg)).get(ZONE)
            return cur is not None and cur[0] == dst and cur[1] > old_epoch
        await until(moved, f"{ZONE} at {dst}", 20)
        new_epoch = (await holders(pg))[ZONE][1]
        await until(lambda: logged_in(new_epoch), f"the simulated agents logged in again at {dst}", 30)
        await offer_all("c2-")

        async def reported() -> bool:
            return '"calls_answered": 10' in log_tail(sim.log, 200) or "'calls_answered': 10" in log_tail(sim.log, 200)
        await until(reported, "a simulator report with 10 calls answered", 10)
    finally:
        await asyncio.to_thread(stop_process, sim, stack.topo.lab_dir() / "run", 10)
    assert '"event": "simulator stopped"' in log_tail(sim.log, 50)
    assert '"zone_reset": ' in log_tail(sim.log, 50)


async def test_desktop_simulator_keeps_its_calls_across_an_am_sigkill(
    stack: Stack, topology_file: Path, zdb: asyncpg.Connection, managers: Managers,  # noqa: F811
) -> None:
    """Simulator bots Talking when their zone's master is SIGKILLed: each bot keeps its call across the
    reconnect and reports it (Talking, its call id) to the new master's STATE_QUERY, so Table 9's "nailed,
    customer call kept" row applies — no DESKTOP_ERROR, no forced logout, the call still Talking at the new
    master — and the bot then finishes that call there (released, wrapped up SALE)."""
    pg = zdb
    h = await holders(pg)
    victim, old_epoch = h[ZONE]
    prefix = f"simk{uuid.uuid4().hex[:4]}-"
    n = 6
    agents = [f"{prefix}{i:04d}" for i in range(1, n + 1)]
    # talk long enough that every call outlives the takeover (the bots wrap up only after it)
    sim = start_daemon(stack.topo, topology_file, victim, "desktop-simulator", "--zone", ZONE, "--agents", str(n),
                       "--talk-s", "8", "--wrap-s", "0.1", "--jitter", "0", "--report-s", "0.3",
                       "--agent-prefix", prefix, "--job", "job-sim", name=f"desksim-{uuid.uuid4().hex[:4]}")
    try:
        async def rows() -> list[asyncpg.Record]:
            return await pg.fetch("SELECT * FROM agents WHERE zone = $1 AND agent_id LIKE $2 ORDER BY agent_id",
                                  ZONE, prefix + "%")

        async def ready() -> bool:
            r = await rows()
            return len(r) == n and all(x["logged_in"] and x["ready"] and x["job_id"] == "job-sim" for x in r)
        try:
            await until(ready, f"{n} simulated agents logged in, attached and ready at {victim}", 30)
        except AssertionError:
            print(log_tail(sim.log), managers.logs())
            raise
        for a in agents:
            await pg.execute("INSERT INTO agent_call_command (zone, agent_id, event, call_id) VALUES"
                             " ($1, $2, 'offered', $3)", ZONE, a, f"k-{a}")

        async def talking() -> bool:
            r = await rows()
            return all(x["call_state"] == "Talking" and x["call_id"] == f"k-{x['agent_id']}" for x in r)
        await until(talking, "every bot Talking on its call", 20)

        async def bots_talking() -> bool:
            # the bots' own account too: each has the OK of its answer (the manager persists before it replies,
            # so the table can say Talking while an OK is still on its way; a kill in that instant leaves a desktop
            # that cannot know whether its answer was applied)
            return f'"calls_answered": {n}' in log_tail(sim.log, 20)
        await until(bots_talking, f"a simulator report with {n} calls answered", 10)

        await asyncio.to_thread(kill_process, managers.procs[victim])

        async def available() -> bool:
            row = await pg.fetchrow("SELECT available, epoch FROM agent_zone_status WHERE zone = $1", ZONE)
            return row is not None and row["available"] and row["epoch"] > old_epoch
        try:
            await until(available, f"{ZONE} available again at the survivor", 30)
        except AssertionError:
            print(log_tail(sim.log), managers.logs())
            raise
        log_rows = await pg.fetch("SELECT * FROM agent_failover_log WHERE zone = $1 AND agent_id LIKE $2"
                                  " AND epoch > $3 ORDER BY agent_id", ZONE, prefix + "%", old_epoch)
        assert [r["agent_id"] for r in log_rows] == agents, [dict(r) for r in log_rows]
        for r in log_rows:
            # the desktop's account agreed with the stored one: nailed, customer call kept, nothing closed
            assert (r["before_state"], r["desktop_state"], r["after_state"]) == ("Talking",) * 3, dict(r)
            assert r["nailed"] and not r["force_logout"] and r["completion_code"] is None, dict(r)
            assert r["call_id"] == f"k-{r['agent_id']}", dict(r)
        # the calls are still going at the new master (the bots talk 8 s)
        for x in await rows():
            assert x["logged_in"] and x["epoch"] > old_epoch and x["desktop_errors"] == 0, dict(x)
            assert x["call_state"] == "Talking" and x["call_id"] == f"k-{x['agent_id']}", dict(x)

        async def finished() -> bool:
            r = await rows()
            return all(x["call_state"] == "Idle" and x["last_completion_code"] == "SALE"
                       and x["last_closed_call_id"] == f"k-{x['agent_id']}" and x["desktop_errors"] == 0 for x in r)
        try:
            await until(finished, "every bot released and wrapped up its call (SALE) at the new master", 30)
        except AssertionError:
            print([dict(x) for x in await rows()], log_tail(sim.log), managers.logs())
            raise
        # every call's release and wrap-up were applied by the new master, none refused
        refused = await pg.fetchval("SELECT count(*) FROM agent_call_command WHERE agent_id LIKE $1"
                                    " AND result LIKE 'refused%'", prefix + "%")
        assert refused == 0
    finally:
        await asyncio.to_thread(stop_process, sim, stack.topo.lab_dir() / "run", 10)
    tail = log_tail(sim.log, 50)
    stopped = [json.loads(line) for line in tail.splitlines() if '"simulator stopped"' in line]
    assert stopped, tail
    final = stopped[-1]
    assert final["forced_logouts"] == {} and final["calls_answered"] == n and final["wrapups"] == n, final
    assert final["refused"] == 0, final
