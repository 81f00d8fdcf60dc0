"""``pom-ha agents sdk-lost --zone Z`` / ``--server pomN``: the workspaces scenario (the guide's "Deployment of
two POM servers in a single zone for workspaces"), as an operator or a test declares it.

The agent SDK's connection to a zone's Agent Manager broke (the zone's SDK service / application-server link on
the master's server is gone). The command records a ``zone_apply_requests`` row with ``reason =
'sdk_connection_lost'`` (NOTIFY ``zone_apply_requests``) per affected zone, naming the secondary: ``--to`` or the
first live Agent Manager (``ha_member`` seen within 5 s) on another server, in topology order. The zone's master
then logs every agent out (``FORCED_LOGOUT sdk_connection_lost``, calls closed ``DESKTOP_ERROR``, answered calls
still pending for an agent ``NUISANCE``) and hands the zone to the secondary, where the desktops log in again;
with no live secondary it keeps the zone and the desktops log in again there. ``zones.allocated_server`` is
not changed. ``--wait`` waits for the master's ``result``.
"""

from __future__ import annotations

import asyncio
import getpass
import time
from dataclasses import dataclass

import asyncpg
import click

from pom_ha.config import Topology, load_topology
from pom_ha.zones.cli import connect

MEMBER_ALIVE_S = 5.0
GRACE_S = 15.0


class SdkLinkError(Exception):
    """The request cannot be made (unknown zone or server, no master, database unreachable)."""


@dataclass(frozen=True)
class SdkLossRequest:
    zone: str
    master: str
    secondary: str
    request_id: int


async def _connect(topo: Topology) -> asyncpg.Connection:
    return await connect(topo, SdkLinkError)


async def request_sdk_lost(
    topo: Topology, *, zones: list[str] | None = None, server: str | None = None, to: str | None = None,
    grace_s: float = GRACE_S, requested_by: str | None = None,
) -> list[SdkLossRequest]:
    """One request per affected zone: ``zones`` (their current masters), or every zone ``server``'s AM masters."""
    known_zones = [z.name for z in topo.zones]
    servers = [s.name for s in topo.servers]
    for z in zones or []:
        if z not in known_zones:
            raise SdkLinkError(f"unknown zone {z!r}: the topology's zones are {known_zones}")
    for s in (server, to):
        if s is not None and s not in servers:
            raise SdkLinkError(f"unknown server {s!r}: the topology's servers are {servers}")
    if not zones and server is None:
        raise SdkLinkError("name the zone(s) (--zone) or the server whose SDK link broke (--server)")
    conn = await _connect(topo)
    try:
        rows = await conn.fetch(
            "SELECT scope, holder_server FROM ha_lease WHERE service = 'agent_manager' AND holder_server IS NOT NULL"
            " AND expires_at > now() AND released_at IS NULL")
        masters = {r["scope"]: r["holder_server"] for r in rows}
        alive = {r["server"] for r in await conn.fetch(
            "SELECT DISTINCT server FROM ha_member WHERE service = 'agent_manager' AND state IN ('MASTER', 'DORMANT')"
            " AND seen_at > now() - $1 * interval '1 second'", MEMBER_ALIVE_S)}
        targets = list(zones or [z for z in known_zones if masters.get(z) == server])
        if not targets:
            raise SdkLinkError(f"the Agent Manager on {server} is master of no zone: no agent to log out")
        out: list[SdkLossRequest] = []
        async with conn.transaction():
            for zone in targets:
                master = masters.get(zone)
                if master is None:
                    raise SdkLinkError(f"zone {zone} has no Agent Manager master: no agent to log out")
                secondary = to or next((s for s in servers if s != master and s in alive), master)
                req_id = await conn.fetchval(
                    "INSERT INTO zone_apply_requests (zone, allocated_server, requested_by, grace_s, reason)"
                    " VALUES ($1, $2, $3, $4, 'sdk_connection_lost') RETURNING id",
                    zone, secondary, requested_by, grace_s)
                out.append(SdkLossRequest(zone, master, secondary, int(req_id)))
        return out
    finally:
        await conn.close()


async def wait_results(topo: Topology, ids: list[int], timeout_s: float = 30.0) -> dict[int, str]:
    """The masters' ``result`` of each request (polled until handled or ``timeout_s``)."""
    conn = await _connect(topo)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            rows = await conn.fetch("SELECT id, result FROM zone_apply_requests WHERE id = ANY($1::bigint[])"
                                    " AND handled_at IS NOT NULL", ids)
            if len(rows) == len(ids) or time.monotonic() > deadline:
                return {int(r["id"]): str(r["result"]) for r in rows}
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


@click.group("agents")
def agents_group() -> None:
    """Agent operations (docs/agent-manager.md)."""


@agents_group.command("sdk-lost")
@click.option("--zone", "zones", multiple=True, help="zone whose agent SDK link broke (repeatable)")
@click.option("--server", default=None, help="every zone this server's Agent Manager is master of")
@click.option("--to", default=None, help="secondary Agent Manager server (default: a live AM on another server)")
@click.option("--grace", "grace_s", type=click.FloatRange(0, 600), default=GRACE_S, show_default=True,
              help="seconds only the secondary claims the zone")
@click.option("--wait", is_flag=True, help="wait for the master's result")
@click.option("--topology", "topology_path", default=None, help="topology file (default config/lab.toml)")
def sdk_lost(zones: tuple[str, ...], server: str | None, to: str | None, grace_s: float, wait: bool,
             topology_path: str | None) -> None:
    """The agent SDK connection broke: the zone's agents are logged out (calls closed DESKTOP_ERROR) and log
    in again at the secondary Agent Manager."""
    topo = load_topology(topology_path)
    try:
        reqs = asyncio.run(request_sdk_lost(topo, zones=list(zones) or None, server=server, to=to, grace_s=grace_s,
                                            requested_by=getpass.getuser()))
    except SdkLinkError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    for r in reqs:
        click.echo(f"zone {r.zone}: request {r.request_id}: the master {r.master} logs every agent out "
                   f"(sdk_connection_lost); secondary {r.secondary}")
    if wait:
        results = asyncio.run(wait_results(topo, [r.request_id for r in reqs]))
        for r in reqs:
            click.echo(f"zone {r.zone}: {results.get(r.request_id, 'not handled yet (read zone_apply_requests)')}")
