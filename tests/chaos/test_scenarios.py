"""The guide's four HA deployment scenarios (Chapter 3), each on its own topology with real daemons under the
servers' uids and its own PostgreSQL: the component table before and after the failure, checked against the
guide's tables (Tables 1-8) up to the naming of the servers (which one wins an election is not fixed here; the
guide's POM1 is whichever server holds the roles it gives POM1).

The tables' rows checked are the HA components these labs run: Campaign Director (Common CD + zone scopes),
Campaign Manager, Agent Manager (per zone), Rule Engine. ActiveMQ and the cache service need the JVM servers and
are covered by the randomized campaign (tests/chaos/test_campaign.py), not started here. A failed server's
cells must read STOPPED or be no longer confirmed (the table's ``GONE?``: a killed daemon writes nothing).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pom_ha.bench.isolated import isolated_topology
from pom_ha.chaos.faults import ProcessLab, ServerKill
from pom_ha.config import ServerSection, Topology, ZoneSection, dump_topology, load_topology
from pom_ha.infra.stack import Stack
from pom_ha.lab.daemons import start_daemon
from pom_ha.lab.platform import server_daemon_args
from pom_ha.status import read_table

pytestmark = pytest.mark.integration

BLOCK = 26  # this engineer's block for whole labs of its own (PostgreSQL on 127.0.27.1)
DAEMONS = ("rule-engine", "campaign-director", "campaign-manager", "agent-manager")
STALE_S = 8.0  # a live member refreshes its row every second; the machine is loaded

Table = dict[str, dict[str, dict[str, Any]]]


@dataclass
class Lab:
    topo: Topology
    topology_file: Path
    stack: Stack

    @property
    def servers(self) -> list[str]:
        return [s.name for s in self.topo.servers]

    def start(self, server: str, daemons: tuple[str, ...] = DAEMONS) -> None:
        for d in daemons:
            start_daemon(self.topo, self.topology_file, server, d, *server_daemon_args(self.topo, d, server),
                         name=f"{d}-{server}")

    async def table(self) -> Table:
        t = await read_table(self.topo.postgres.dsn(), self.servers)
        comps: Table = t.as_json(stale_after_s=STALE_S)["components"]
        return comps

    async def until(self, what: str, check: Callable[[Table], bool], timeout_s: float = 120.0) -> Table:
        deadline = time.monotonic() + timeout_s
        table: Table = {}
        while time.monotonic() < deadline:
            table = await self.table()
            try:
                if check(table):
                    return table
            except KeyError:
                pass
            await asyncio.sleep(0.3)
        raise AssertionError(f"not within {timeout_s:.0f} s: {what}; table: {render(table)}")


def render(table: Table) -> str:
    return "; ".join(f"{svc}: " + ", ".join(f"{srv}={c['state']}{c['scopes'] or ''}{' stale' if c['stale'] else ''}"
                                            for srv, c in cells.items()) for svc, cells in sorted(table.items()))


def live(cell: dict[str, Any] | None) -> str:
    """The cell as the guide prints it: STOPPED for a member that stopped or is no longer confirmed."""
    if cell is None or cell["state"] == "STOPPED" or cell["stale"]:
        return "STOPPED"
    return str(cell["state"])


def masters(table: Table, service: str) -> dict[str, list[str]]:
    """server -> scopes it is MASTER of (live members only)."""
    return {srv: c["scopes"] for srv, c in table.get(service, {}).items() if live(c) == "MASTER"}


def zone_master(table: Table, zone: str, service: str = "agent_manager") -> str | None:
    """The one live master of ``zone``; None while there is none or, for a moment after a kill, the dead
    master's last row is not yet stale beside its successor's (the checker judges split brain by fenced
    writes, not by this table)."""
    found = [srv for srv, scopes in masters(table, service).items() if zone in scopes]
    return found[0] if len(found) == 1 else None


def common_cd(table: Table) -> str | None:
    found = list(masters(table, "campaign_director"))
    return found[0] if len(found) == 1 else None


def states(table: Table, service: str, servers: list[str]) -> list[str]:
    return [live(table.get(service, {}).get(s)) for s in servers]


@pytest.fixture
async def make_lab() -> AsyncIterator[Callable[[int, list[str]], Any]]:
    made: list[Lab] = []

    async def make(n: int, zones: list[str]) -> Lab:
        base = load_topology()
        topo = base.model_copy(update={
            "servers": [ServerSection(name=f"pom{i}", address=f"127.0.1.{i}", runs=[]) for i in range(1, n + 1)],
            "zones": [ZoneSection(name=z) for z in zones]})
        topo = isolated_topology(topo, block=BLOCK)
        stack = Stack(topo)
        lab = Lab(topo, dump_topology(topo, topo.lab_dir() / "topology.toml"), stack)
        made.append(lab)
        await stack.up(only=["postgres"])
        return lab

    try:
        yield make
    finally:
        for lab in made:
            await lab.stack.down()
            shutil.rmtree(lab.topo.lab_dir(), ignore_errors=True)


async def fail_servers(lab: Lab, *servers: str) -> None:
    plab = ProcessLab(lab.topo, lab.topology_file)
    await asyncio.gather(*(ServerKill(server=s).inject(plab) for s in servers))


async def test_two_servers_one_zone(make_lab: Callable[[int, list[str]], Any]) -> None:
    """Tables 1 and 2: POM1 master of everything, POM2 dormant; POM1 fails, POM2 master of everything."""
    lab: Lab = await make_lab(2, ["Default"])
    lab.start("pom1")
    await lab.until("pom1 master of the zone's Agent Manager and the Rule Engine",
                    lambda t: zone_master(t, "Default") == "pom1" and "pom1" in masters(t, "rule_engine")
                    and common_cd(t) == "pom1")
    lab.start("pom2")
    before = await lab.until("Table 1", lambda t: states(t, "agent_manager", lab.servers) == ["MASTER", "DORMANT"]
                             and states(t, "rule_engine", lab.servers) == ["MASTER", "DORMANT"]
                             and states(t, "campaign_director", lab.servers) == ["MASTER", "DORMANT"]
                             and states(t, "campaign_manager", lab.servers) == ["RUNNING", "RUNNING"])
    print("\nTable 1 (before):", render(before))
    await fail_servers(lab, "pom1")
    after = await lab.until("Table 2", lambda t: states(t, "agent_manager", lab.servers) == ["STOPPED", "MASTER"]
                            and zone_master(t, "Default") == "pom2"
                            and states(t, "rule_engine", lab.servers) == ["STOPPED", "MASTER"]
                            and states(t, "campaign_director", lab.servers) == ["STOPPED", "MASTER"]
                            and common_cd(t) == "pom2" and zone_master(t, "Default", "zone_director") == "pom2"
                            and states(t, "campaign_manager", lab.servers) == ["STOPPED", "RUNNING"])
    print("Table 2 (after):", render(after))


async def test_three_servers_two_zones(make_lab: Callable[[int, list[str]], Any]) -> None:
    """Tables 3 and 4: AM masters of zone1 and zone2 on two servers, the third dormant; the server of zone 2's
    AM fails: zone 2 goes to the dormant server, zone 1 and the Common CD stay where they were."""
    lab: Lab = await make_lab(3, ["Default", "Zone2"])
    lab.start("pom1")
    lab.start("pom2")  # started together: the AMs' claim spread gives them one zone each
    await lab.until("pom1 and pom2 masters of one zone each",
                    lambda t: {zone_master(t, "Default"), zone_master(t, "Zone2")} == {"pom1", "pom2"})
    lab.start("pom3")
    before = await lab.until(
        "Table 3: two AM masters of one zone each, one dormant",
        lambda t: sorted(states(t, "agent_manager", lab.servers)) == ["DORMANT", "MASTER", "MASTER"]
        and zone_master(t, "Default") not in (None, zone_master(t, "Zone2"))
        and states(t, "campaign_manager", lab.servers) == ["RUNNING"] * 3
        and sorted(states(t, "rule_engine", lab.servers)) == ["DORMANT", "DORMANT", "MASTER"])
    print("\nTable 3 (before):", render(before))
    zone1, failed = zone_master(before, "Default"), zone_master(before, "Zone2")
    assert zone1 and failed
    dormant = next(s for s in lab.servers if s not in (zone1, failed))
    cd = common_cd(before)
    await fail_servers(lab, failed)
    after = await lab.until(
        "Table 4: zone 2 taken by a survivor, zone 1 kept",
        lambda t: zone_master(t, "Zone2") in (dormant, zone1) and zone_master(t, "Default") == zone1
        and live(t["agent_manager"][failed]) == "STOPPED"
        and (cd == failed or common_cd(t) == cd) and common_cd(t) not in (None, failed)
        and states(t, "campaign_manager", [s for s in lab.servers if s != failed]) == ["RUNNING"] * 2
        and len(masters(t, "rule_engine")) == 1 and failed not in masters(t, "rule_engine"))
    print("Table 4 (after):", render(after))
    if zone_master(after, "Zone2") != dormant:
        # the same gap as in the four-server scenario: the takeover goes to whichever AM wins, here the busy one
        pytest.xfail(f"known gap: the guide gives zone 2 to the dormant {dormant}; here {render(after)}")


async def test_four_servers_two_zones_two_fail_zones_go_to_separate_survivors(
    make_lab: Callable[[int, list[str]], Any]
) -> None:
    """Tables 5 and 6: POM1 and POM2 (AM masters of zone 1 and zone 2) fail together; the zones go to separate
    survivors, the Common CD and the Rule Engine to a survivor."""
    lab: Lab = await make_lab(4, ["Default", "Zone2"])
    lab.start("pom1")
    lab.start("pom2")
    await lab.until("pom1 and pom2 masters of one zone each",
                    lambda t: {zone_master(t, "Default"), zone_master(t, "Zone2")} == {"pom1", "pom2"})
    lab.start("pom3")
    lab.start("pom4")
    before = await lab.until(
        "Table 5", lambda t: states(t, "agent_manager", lab.servers)[2:] == ["DORMANT", "DORMANT"]
        and states(t, "campaign_manager", lab.servers) == ["RUNNING"] * 4
        and states(t, "rule_engine", lab.servers)[2:] == ["DORMANT", "DORMANT"])
    print("\nTable 5 (before):", render(before))
    await fail_servers(lab, "pom1", "pom2")
    after = await lab.until(
        "Table 6: both zones on survivors, the Common CD and the Rule Engine on a survivor",
        lambda t: {zone_master(t, "Default"), zone_master(t, "Zone2")} <= {"pom3", "pom4"}
        and states(t, "agent_manager", lab.servers)[:2] == ["STOPPED", "STOPPED"]
        and common_cd(t) in ("pom3", "pom4") and len(masters(t, "rule_engine")) == 1
        and {zone_master(t, "Default", "zone_director"), zone_master(t, "Zone2", "zone_director")} <= {"pom3", "pom4"}
        and set(masters(t, "rule_engine")) <= {"pom3", "pom4"}
        and states(t, "campaign_manager", lab.servers) == ["STOPPED", "STOPPED", "RUNNING", "RUNNING"])
    print("Table 6 (after):", render(after))
    zones = {zone_master(after, "Default"), zone_master(after, "Zone2")}
    if zones != {"pom3", "pom4"}:
        # the Zone Directors do spread (asserted above); the Agent Managers' takeover does not yet: one
        # surviving AM takes every zone of the failed masters (services/agent_manager ClaimSpread spreads only
        # free zones at start, "takeovers are never delayed by the spread")
        pytest.xfail(f"known gap: the guide puts the zones on separate survivors; here {render(after)}")


async def test_two_servers_one_zone_for_workspaces(make_lab: Callable[[int, list[str]], Any]) -> None:
    """Tables 7 and 8: the Agent Manager of the zone on POM1 with agents logged in; POM1 fails: POM2's AM is
    master of the zone and the agents (desktops that walk their address list) log in there again."""
    lab: Lab = await make_lab(2, ["Default"])
    lab.start("pom1", ("agent-manager",))
    await lab.until("pom1 master of the zone", lambda t: zone_master(t, "Default") == "pom1")
    lab.start("pom2", ("agent-manager",))
    desktops = start_daemon(lab.topo, lab.topology_file, "pom2", "desktop-simulator", "--zone", "Default",
                            "--agents", "5", "--agent-prefix", "ws-", name="desktop-simulator-ws")
    assert desktops.pid
    import asyncpg

    conn = await asyncpg.connect(lab.topo.postgres.dsn())
    try:
        async def logged_in_on(epoch_above: int) -> int:
            n: int = await conn.fetchval("SELECT count(*) FROM agents WHERE zone = 'Default' AND logged_in"
                                         " AND epoch > $1", epoch_above)
            return n

        before = await lab.until("Table 7", lambda t: states(t, "agent_manager", lab.servers) == ["MASTER", "DORMANT"])
        deadline = time.monotonic() + 60
        while await logged_in_on(0) < 5:
            assert time.monotonic() < deadline, "5 agents not logged in on pom1 within 60 s"
            await asyncio.sleep(0.3)
        epoch = await conn.fetchval("SELECT epoch FROM ha_lease WHERE service = 'agent_manager' AND scope = 'Default'")
        print("\nTable 7 (before):", render(before))
        await fail_servers(lab, "pom1")
        after = await lab.until("Table 8", lambda t: states(t, "agent_manager", lab.servers) == ["STOPPED", "MASTER"]
                                and zone_master(t, "Default") == "pom2")
        print("Table 8 (after):", render(after))
        deadline = time.monotonic() + 90
        while await logged_in_on(epoch) < 5:
            assert time.monotonic() < deadline, "the agents did not log in again on pom2 within 90 s"
            await asyncio.sleep(0.3)
    finally:
        await conn.close()
