"""The workspaces scenario, the late desktop's check and TLS on the desktop port, with real PostgreSQL and real
AM processes (pom1, pom2; fixtures of test_agent_manager). Conditions are polled with deadlines, never slept for.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from pom_ha.desktop.protocol import CallEvent, ForcedLogout, LoginOk
from pom_ha.domain.agents import CallState
from pom_ha.infra.stack import Stack
from tests.integration.test_agent_manager import (  # noqa: F401  (db, managers: fixtures)
    AM_SERVERS,
    Desk,
    Managers,
    Scenario,
    _attached,
    _offer,
    _talking,
    db,
    holders,
    managers,
    until,
)

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def wdb(db: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:  # noqa: F811
    await db.execute("DELETE FROM zone_apply_requests")
    yield db
    # the hand-over's reservation must not steer the next test's AMs (zone_config.AllocationSpread)
    await db.execute("DELETE FROM zone_apply_requests")


def _cli(topology_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pom_ha.cli", *args, "--topology", str(topology_file)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


async def test_workspaces_sdk_connection_lost(
    stack: Stack, topology_file: Path, wdb: asyncpg.Connection, managers: Managers  # noqa: F811
) -> None:
    """The agent SDK link of zone Default's master breaks (`pom-ha agents sdk-lost --zone Default`): every agent
    of the zone is logged out with FORCED_LOGOUT sdk_connection_lost, calls in progress are closed DESKTOP_ERROR
    (the pending answered call NUISANCE), the zone goes to the other AM of the zone (the guide's two servers in one
    zone), the desktops reconnect to their secondary address and log in again there; Zone1 is not touched."""
    conn = wdb
    zone = "Default"
    h = await holders(conn)
    primary, old_epoch = h[zone]
    secondary = next(s for s in AM_SERVERS if s != primary)
    addresses = [managers.address(primary), managers.address(secondary)]
    sc = Scenario()
    names = ["idle", "talking", "held", "wrapup", "pending"]
    other = Desk([managers.address(h["Zone1"][0])], "w-z1", "Zone1")
    try:
        for n in names:
            sc.desks[n] = Desk(addresses, f"w-{n}", zone)
        await asyncio.gather(*(d.start() for d in [*sc.desks.values(), other]))
        await asyncio.gather(*(_attached(d) for d in sc.desks.values()))
        d = sc.desks
        for n in ("talking", "held", "wrapup"):
            await _talking(conn, zone, d[n], sc)
        await d["held"].client.call_event(sc.call_of["w-held"], "held")
        await d["held"].wait_state(CallState.HELD)
        await d["wrapup"].client.call_event(sc.call_of["w-wrapup"], "released")
        await d["wrapup"].wait_state(CallState.WRAPUP)
        await _offer(conn, zone, d["pending"], "offered", sc)
        await d["pending"].wait_state(CallState.PENDING_CALL)
        frames_before = {n: len(desk.frames) for n, desk in sc.desks.items()}

        # unknown zone: refused before anything is written, naming it
        bad = await asyncio.to_thread(_cli, topology_file, "agents", "sdk-lost", "--zone", "Atlantis")
        assert bad.returncode == 2 and "Atlantis" in bad.stderr, bad
        assert await conn.fetchval("SELECT count(*) FROM zone_apply_requests") == 0

        done = await asyncio.to_thread(_cli, topology_file, "agents", "sdk-lost", "--zone", zone, "--wait")
        assert done.returncode == 0, (done.stdout, done.stderr, managers.logs())
        assert f"secondary {secondary}" in done.stdout and "5 agent(s) logged out" in done.stdout, done.stdout

        async def all_out() -> bool:
            return all(any(isinstance(f, ForcedLogout) and f.reason == "sdk_connection_lost" for f in desk.frames)
                       for desk in sc.desks.values())
        await until(all_out, "FORCED_LOGOUT sdk_connection_lost at every desktop of the zone")

        # the zone moved to the secondary AM; every desktop logged in again there
        async def moved() -> bool:
            now = await holders(conn)
            return zone in now and now[zone][0] == secondary and now[zone][1] > old_epoch

        async def back_at_secondary() -> bool:
            for n, desk in sc.desks.items():
                s = desk.client.session
                st = desk.state
                if s is None or s.master != secondary or not desk.client.available.is_set():
                    return False
                if st is None or not st.logged_in or len(desk.frames) <= frames_before[n]:
                    return False
            return True
        try:
            await until(moved, f"{zone} handed to {secondary}", 30)
            await until(back_at_secondary, f"every desktop logged in again at {secondary}", 30)
        except AssertionError:
            print(managers.logs())
            raise
        for n, desk in sc.desks.items():
            # the first connection after the forced logout went to the secondary address
            i = next(i for i, f in enumerate(desk.frames) if isinstance(f, ForcedLogout))
            login = next(f for f in desk.frames[i:] if isinstance(f, LoginOk))
            assert login.master == secondary, (n, desk.kinds())
            assert desk.client.stats.forced_logouts.get("sdk_connection_lost") == 1, n
            assert desk.state is not None and desk.state.call_state is CallState.IDLE and desk.state.call_id is None

        rows = {r["agent_id"]: r for r in await conn.fetch("SELECT * FROM agents WHERE zone = $1", zone)}
        for n in ("talking", "held", "wrapup"):  # calls with an agent: DESKTOP_ERROR
            r = rows[f"w-{n}"]
            assert (r["last_completion_code"], r["last_closed_call_id"], r["desktop_errors"]) == (
                "DESKTOP_ERROR", sc.call_of[f"w-{n}"], 1), dict(r)
        r = rows["w-pending"]  # the answered call that had not reached the agent: nuisance
        assert (r["last_completion_code"], r["nuisance_calls"]) == ("NUISANCE", 1), dict(r)
        assert rows["w-idle"]["last_completion_code"] is None and rows["w-idle"]["desktop_errors"] == 0
        for r in rows.values():
            assert r["logged_in"] and r["epoch"] > old_epoch, dict(r)  # logged in again under the new master
        req = await conn.fetchrow("SELECT * FROM zone_apply_requests WHERE reason = 'sdk_connection_lost'")
        assert req["handled_by"] == primary and req["logged_out"] == 5 and req["released_at"] is not None, dict(req)
        # the new session works; a late 'released' of a closed call is recorded as refused, not lost
        await d["talking"].client.not_ready()
        await d["talking"].client.ready()
        cid = await conn.fetchval(
            "INSERT INTO agent_call_command (zone, agent_id, event, call_id) VALUES ($1, 'w-talking', 'released', $2)"
            " RETURNING id", zone, sc.call_of["w-talking"])

        async def refused() -> bool:
            result = await conn.fetchval("SELECT result FROM agent_call_command WHERE id = $1", cid)
            return result is not None and result.startswith("refused")
        await until(refused, "the late release recorded as refused")
        assert not any(isinstance(f, CallEvent) and f.event == "released" and f.call_id == sc.call_of["w-talking"]
                       for f in d["talking"].frames[frames_before["talking"]:])
        # the other zone never noticed
        assert other.client.stats.forced_logouts == {} and other.client.stats.connection_losses == 0
    finally:
        await asyncio.gather(*(desk.close() for desk in [*sc.desks.values(), other]))


async def test_late_desktop_is_checked(
    stack: Stack, db: asyncpg.Connection, managers: Managers  # noqa: F811
) -> None:
    """Two talking agents whose desktops return only after the takeover finished (AppServerWaitTimeOut passed):
    each is checked with its desktop when it logs in. The one whose desktop agrees with its pre-failover state
    gets POM_AVAILABLE, its Table 9 state (unnailed: Wrapup) and the released call; the one whose desktop does
    not gets DESKTOP_ERROR and a forced logout, then logs in again."""
    zone = "Default"
    h = await holders(db)
    victim, old_epoch = h[zone]
    survivor = next(s for s in AM_SERVERS if s != victim)
    addresses = [managers.address(victim), managers.address(survivor)]
    await db.execute("UPDATE pim_config SET value = '1000' WHERE key = 'AppServerWaitTimeOut'")
    sc = Scenario()
    late: list[Desk] = []
    try:
        for n in ("present", "true", "liar"):
            sc.desks[n] = Desk(addresses, f"l-{n}", zone)
        await asyncio.gather(*(d.start() for d in sc.desks.values()))
        await asyncio.gather(*(_attached(d) for d in sc.desks.values()))
        for d in sc.desks.values():
            await _talking(db, zone, d, sc)
        await sc.desks["true"].close()
        await sc.desks["liar"].close()
        from pom_ha.infra.process import kill_process

        await asyncio.to_thread(kill_process, managers.procs[victim])

        async def taken() -> bool:
            row = await db.fetchrow("SELECT available, epoch FROM agent_zone_status WHERE zone = $1", zone)
            return row is not None and row["available"] and row["epoch"] > old_epoch
        await until(taken, f"{survivor} has taken {zone} over", 30)
        logs = {r["agent_id"]: r for r in await db.fetch(
            "SELECT * FROM agent_failover_log WHERE zone = $1 AND epoch > $2", zone, old_epoch)}
        for a in ("l-true", "l-liar"):
            assert logs[a]["desktop_state"] is None and logs[a]["after_state"] == "Wrapup", dict(logs[a])
        assert logs["l-present"]["desktop_state"] == "Talking"

        true_call, liar_call = sc.call_of["l-true"], sc.call_of["l-liar"]
        truthful = Desk([managers.address(survivor)], "l-true", zone)
        truthful.client.state_report = lambda: (CallState.TALKING, true_call, "job-am-1")
        liar = Desk([managers.address(survivor)], "l-liar", zone)
        liar.client.state_report = lambda: (CallState.IDLE, None, None)
        late += [truthful, liar]
        await asyncio.gather(truthful.start(), liar.start())

        # the truthful desktop: checked (POM_NOT_AVAILABLE first), then its state and the call the takeover ended
        kinds = truthful.kinds()
        assert kinds[:2] == ["LoginOk", "PomNotAvailable"] and "PomAvailable" in kinds, kinds
        await truthful.wait_state(CallState.WRAPUP)

        async def released() -> bool:
            return any(isinstance(f, CallEvent) and f.event == "released" and f.call_id == true_call
                       for f in truthful.frames)
        await until(released, "CALL_EVENT released at the late desktop")
        await truthful.client.wrap_up(true_call, "SALE")
        # the lying desktop: DESKTOP_ERROR, forced out, logged in again (no second check) and usable
        assert liar.client.stats.forced_logouts.get("desktop_error") == 1, liar.kinds()
        row = await db.fetchrow("SELECT * FROM agents WHERE zone = $1 AND agent_id = 'l-liar'", zone)
        assert (row["desktop_errors"], row["last_completion_code"], row["last_closed_call_id"]) == (
            1, "DESKTOP_ERROR", liar_call), dict(row)
        assert row["logged_in"] and row["call_state"] == "Idle"
        await liar.client.ready()
        logs = {r["agent_id"]: r for r in await db.fetch(
            "SELECT * FROM agent_failover_log WHERE zone = $1 AND epoch > $2", zone, old_epoch)}
        assert (logs["l-true"]["desktop_state"], logs["l-true"]["force_logout"]) == ("Talking", False)
        assert (logs["l-liar"]["desktop_state"], logs["l-liar"]["force_logout"],
                logs["l-liar"]["completion_code"]) == ("Idle", True, "DESKTOP_ERROR"), dict(logs["l-liar"])
    finally:
        await db.execute("UPDATE pim_config SET value = '30000' WHERE key = 'AppServerWaitTimeOut'")
        await asyncio.gather(*(d.close() for d in [*sc.desks.values(), *late]))


async def test_desktop_tls(stack: Stack, topology_file: Path, db: asyncpg.Connection) -> None:  # noqa: F811
    """An AM with TLS on its desktop port: a desktop with the lab CA logs in and works; a client without the CA
    and a plain-TCP client are refused; a missing or wrong certificate path stops the AM naming the file."""
    import ssl

    from pom_ha.desktop.client import DesktopClient
    from pom_ha.desktop.protocol import Login, ProtocolError, read_frame, write_frame
    from pom_ha.desktop.tls import client_context, lab_desktop_pem
    from pom_ha.infra.process import log_tail, stop_process
    from pom_ha.kafka.tls import Pki
    from pom_ha.lab.daemons import start_daemon

    topo = stack.topo
    server = "pom3"
    address = topo.server(server).address
    port = topo.ports.desktop
    pki = Pki(topo.lab_dir() / "desktop-ssl")
    cert, key = lab_desktop_pem(pki, server, address, topo.lab_dir() / "desktop-tls", uid=topo.server_uid(server))

    # bad paths: the AM refuses to start and names the file
    def am(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "services.agent_manager", "--server", server, "--topology",
                               str(topology_file), *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    missing = await asyncio.to_thread(am, "--desktop-tls-cert", "/nonexistent/am.pem", "--desktop-tls-key", str(key))
    assert missing.returncode == 2 and "/nonexistent/am.pem" in missing.stderr, missing.stderr
    wrong = await asyncio.to_thread(am, "--desktop-tls-cert", str(key), "--desktop-tls-key", str(key))
    assert wrong.returncode == 2 and str(key) in wrong.stderr and "certificate" in wrong.stderr, wrong.stderr

    rec = start_daemon(topo, topology_file, server, "agent-manager", "--zone", "Default",
                       "--desktop-tls-cert", str(cert), "--desktop-tls-key", str(key))
    desk: DesktopClient | None = None
    try:
        async def up() -> bool:
            h = await holders(db)
            ok = await db.fetchval("SELECT available FROM agent_zone_status WHERE zone = 'Default' AND"
                                   " master_server = $1", server)
            return h.get("Default", ("", 0))[0] == server and ok is True
        try:
            await until(up, f"{server} master of Default over TLS", 30)
        except AssertionError:
            print(log_tail(rec.log, 40))
            raise
        desk = DesktopClient([(address, port)], "tls-agent", "Default", ssl_context=client_context(pki.ca_cert))
        desk.start()
        await asyncio.wait_for(desk.available.wait(), 20)
        assert desk.session is not None and desk.session.master == server
        await desk.ready()

        # no CA: the handshake fails on the desktop's side (the AM's certificate is not trusted)
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.wait_for(asyncio.open_connection(address, port, ssl=ssl.create_default_context()), 10)
        # plain TCP to the TLS port: no LOGIN_OK, the connection is closed
        reader, writer = await asyncio.open_connection(address, port)
        await write_frame(writer, Login(req=1, agent_id="tls-plain", zone="Default", desktop_id="d-plain"))
        try:
            got = await asyncio.wait_for(read_frame(reader, "to_desktop"), 10)
        except (ConnectionError, ProtocolError):
            got = None  # the AM's TLS alert is no frame
        assert got is None, got
        writer.close()
        assert await db.fetchval("SELECT count(*) FROM agents WHERE agent_id = 'tls-plain'") == 0
        await desk.not_ready()  # the TLS desktop was not affected
    finally:
        if desk is not None:
            await desk.close()
        await asyncio.to_thread(stop_process, rec, topo.lab_dir() / "run", 10)

        async def gone() -> bool:  # later tests count pom3 as a server without a live AM
            return not await db.fetchval(
                "SELECT count(*) FROM ha_member WHERE service = 'agent_manager' AND server = $1"
                " AND state IN ('MASTER', 'DORMANT') AND seen_at > now() - interval '5 seconds'", server)
        await until(gone, f"{server}'s Agent Manager gone from the member rows", 15)
