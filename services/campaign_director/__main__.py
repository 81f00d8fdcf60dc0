"""``python -m services.campaign_director --server pom1 [--topology FILE] [--zone Z ...] [--http-port N]
[--heartbeat-port N] [--instance-tag T]`` (also ``pom-ha run campaign-director ...``).

Zones: ``--zone`` (repeatable) if given, else the topology's zones plus any in the ``zones`` table.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg

from pom_ha.config import ConfigError
from pom_ha.ha.daemon_cli import add_cache_option, cache_wanted, config_error, daemon_context, daemon_parser
from pom_ha.ha.roles import RoleKind, SingletonRole, ZoneRole
from services.campaign_director.daemon import SERVICE, CampaignDirectorDaemon
from services.campaign_director.settings import load_settings
from services.campaign_director.zones import ZONE_SERVICE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = daemon_parser("campaign-director", __doc__)
    p.add_argument("--zone", action="append", default=[], help="lead this zone's director role (repeatable)")
    add_cache_option(p)
    return p.parse_args(argv)


async def _zones_in_database(dsn: str) -> list[str]:
    """Zones an administrator added in the database (best effort: the topology's zones suffice)."""
    try:
        conn = await asyncpg.connect(dsn, timeout=2)
    except (OSError, TimeoutError, asyncpg.PostgresError):
        return []
    try:
        return [r["name"] for r in await conn.fetch("SELECT name FROM zones ORDER BY name", timeout=2)]
    except (OSError, TimeoutError, asyncpg.PostgresError):
        return []
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ctx = daemon_context(args)
        settings = load_settings()
    except ConfigError as exc:
        return config_error(exc)
    topo = ctx.topo
    dsn = topo.postgres.dsn()
    zones = list(dict.fromkeys(args.zone)) or list(dict.fromkeys(
        [z.name for z in topo.zones] + asyncio.run(_zones_in_database(dsn))
    ))
    roles: tuple[RoleKind, ...] = (SingletonRole(SERVICE), *(ZoneRole(ZONE_SERVICE, z) for z in zones))
    config = ctx.config(roles, dsn=dsn)
    cache = None
    if cache_wanted(args, topo):
        from pom_ha.cache.client import OperationalCache, quiet_pyignite_logs

        quiet_pyignite_logs()
        cache = OperationalCache.from_topology(topo)
    return asyncio.run(CampaignDirectorDaemon(config, settings=settings, topology=topo, cache=cache).main())


if __name__ == "__main__":
    sys.exit(main())
