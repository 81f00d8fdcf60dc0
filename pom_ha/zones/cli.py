"""``pom-ha zone allocate ZONE --server pomN [--apply [--yes]]``: the administrator's zone configuration.

"Save" (no ``--apply``) records ``zones.allocated_server`` only: no agent is touched, the zone stays with its
current Agent Manager until an apply. "Save and Apply" (``--apply``) warns that every agent of the zone will
be logged out and needs ``--yes``; it then records the allocation and a ``zone_apply_requests`` row (NOTIFY
``zone_apply_requests``): the zone's current AM master forces its agents out (``FORCED_LOGOUT zone_reset``)
and releases the zone lease, and the allocated server's AM takes it (see docs/agent-manager.md).

A zone or server outside the topology is refused before anything is written.
"""

from __future__ import annotations

import asyncio
import getpass
from dataclasses import dataclass

import asyncpg
import click

from pom_ha.config import Topology, load_topology

DEFAULT_GRACE_S = 15.0


class ZoneConfigError(Exception):
    """An allocation that cannot be made (unknown zone or server, database unreachable)."""


@dataclass(frozen=True)
class Allocation:
    zone: str
    server: str
    previous: str | None
    apply_id: int | None


def apply_warning(zone: str, server: str) -> str:
    """What "Save and Apply" does to the zone's agents (the CLI and the REST API ask for a confirmation)."""
    return (f"Save and Apply logs out EVERY agent of zone {zone} (their calls are closed); "
            f"the zone then moves to {server}'s Agent Manager and the desktops log in again there.")


async def connect(topo: Topology, error: type[Exception]) -> asyncpg.Connection:
    """A connection to the lab's PostgreSQL, or ``error`` saying it cannot be reached (no secret in it)."""
    try:
        return await asyncpg.connect(topo.postgres.dsn(), timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        raise error(f"cannot reach PostgreSQL at {topo.postgres.address}:{topo.postgres.port}: "
                    f"{type(exc).__name__}") from None


def validate(topo: Topology, zone: str, server: str) -> None:
    zones = [z.name for z in topo.zones]
    servers = [s.name for s in topo.servers]
    if zone not in zones:
        raise ZoneConfigError(f"unknown zone {zone!r}: the topology's zones are {zones}")
    if server not in servers:
        raise ZoneConfigError(f"unknown server {server!r}: the topology's servers are {servers}")


async def allocate(topo: Topology, zone: str, server: str, *, apply: bool, grace_s: float = DEFAULT_GRACE_S,
                   requested_by: str | None = None) -> Allocation:
    """Record the allocation (and, with ``apply``, the apply request) in one transaction."""
    validate(topo, zone, server)
    conn = await connect(topo, ZoneConfigError)
    try:
        async with conn.transaction():
            address = topo.server(server).address
            await conn.execute(
                "INSERT INTO servers (name, address) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING", server, address)
            previous = await conn.fetchval("SELECT allocated_server FROM zones WHERE name = $1 FOR UPDATE", zone)
            await conn.execute(
                "INSERT INTO zones (name, allocated_server) VALUES ($1, $2)"
                " ON CONFLICT (name) DO UPDATE SET allocated_server = EXCLUDED.allocated_server", zone, server)
            apply_id = None
            if apply:
                apply_id = await conn.fetchval(
                    "INSERT INTO zone_apply_requests (zone, allocated_server, requested_by, grace_s)"
                    " VALUES ($1, $2, $3, $4) RETURNING id", zone, server, requested_by, grace_s)
        return Allocation(zone, server, previous, None if apply_id is None else int(apply_id))
    finally:
        await conn.close()


@dataclass(frozen=True)
class ZoneAllocation:
    """What "Save" recorded for a zone, and its latest "Save and Apply" request with the AM's outcome."""

    zone: str
    allocated_server: str | None
    last_apply: dict[str, object] | None


async def read_allocation(topo: Topology, zone: str) -> ZoneAllocation:
    """The zone's recorded allocation and latest apply request (``result`` is written by the zone's AM)."""
    if zone not in [z.name for z in topo.zones]:
        raise ZoneConfigError(f"unknown zone {zone!r}: the topology's zones are {[z.name for z in topo.zones]}")
    conn = await connect(topo, ZoneConfigError)
    try:
        server = await conn.fetchval("SELECT allocated_server FROM zones WHERE name = $1", zone)
        row = await conn.fetchrow(
            "SELECT id, allocated_server, requested_at, requested_by, grace_s, handled_at, handled_by, logged_out,"
            " result, released_at FROM zone_apply_requests WHERE zone = $1 ORDER BY id DESC LIMIT 1", zone)
    finally:
        await conn.close()
    last = None
    if row is not None:
        last = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in dict(row).items()}
    return ZoneAllocation(zone, None if server is None else str(server), last)


@click.group("zone")
def zone_group() -> None:
    """Zone configuration: which POM server's Agent Manager a zone is allocated to."""


@zone_group.command("allocate")
@click.argument("zone")
@click.option("--server", required=True, help="POM server the zone is allocated to (pom2)")
@click.option("--apply", "apply_", is_flag=True, help='"Save and Apply": log the zone\'s agents out and move it now')
@click.option("--yes", is_flag=True, help="confirm --apply (every agent of the zone is logged out)")
@click.option("--grace", "grace_s", type=click.FloatRange(0, 600), default=DEFAULT_GRACE_S, show_default=True,
              help="seconds during which only the allocated server's Agent Manager claims the released zone")
@click.option("--topology", "topology_path", default=None, help="topology file (default config/lab.toml)")
def allocate_cmd(zone: str, server: str, apply_: bool, yes: bool, grace_s: float, topology_path: str | None) -> None:
    """Save (default) or Save and Apply (--apply --yes) the zone's allocation to SERVER."""
    try:
        topo = load_topology(topology_path)
        validate(topo, zone, server)
    except Exception as exc:  # ConfigError or ZoneConfigError: both say what is wrong
        raise click.ClickException(str(exc)) from None
    if apply_ and not yes:
        click.echo(f"WARNING: {apply_warning(zone, server)}\n"
                   "Nothing was written. Run again with --yes to proceed.", err=True)
        raise SystemExit(1)
    try:
        result = asyncio.run(allocate(topo, zone, server, apply=apply_, grace_s=grace_s,
                                      requested_by=_who()))
    except (ZoneConfigError, OSError, asyncpg.PostgresError) as exc:
        raise click.ClickException(str(exc)) from None
    was = f" (was {result.previous})" if result.previous else ""
    if result.apply_id is None:
        click.echo(f"saved: zone {zone} allocated to {server}{was}. Nothing changes until it is applied "
                   f"(pom-ha zone allocate {zone} --server {server} --apply --yes).")
    else:
        click.echo(f"saved and applied: zone {zone} allocated to {server}{was}; apply request {result.apply_id}: "
                   f"the zone's Agent Manager logs its agents out and hands the zone to {server}.")


def _who() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


if __name__ == "__main__":  # ``python -m pom_ha.zones.cli allocate ...`` (same as ``pom-ha zone ...``)
    zone_group()
