"""``python -m services.ha_probe --server pom1 --role NAME [--zone Z ...] [--pool] [--topology FILE]
[--http-port N] [--heartbeat-port N]`` (also ``pom-ha run ha-probe ...``)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from pom_ha.config import ConfigError
from pom_ha.ha.daemon_cli import config_error, daemon_context, daemon_parser
from pom_ha.ha.roles import PoolMember, RoleKind, SingletonRole, ZoneRole
from services.ha_probe.probe import ProbeDaemon


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = daemon_parser("ha-probe", __doc__)
    p.add_argument("--role", required=True, help="service name of the role (e.g. rule_engine)")
    p.add_argument("--zone", action="append", default=[], help="per-zone role: compete for this zone (repeatable)")
    p.add_argument("--pool", action="store_true", help="pool membership only (all RUNNING, no lease)")
    p.add_argument("--write-interval-ms", type=int, default=20, help="fenced write period while master")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ctx = daemon_context(args)
    except ConfigError as exc:
        return config_error(exc)
    roles: tuple[RoleKind, ...]
    if args.pool:
        roles = (PoolMember(args.role),)
    elif args.zone:
        roles = tuple(ZoneRole(args.role, z) for z in dict.fromkeys(args.zone))
    else:
        roles = (SingletonRole(args.role),)
    config = ctx.config(roles)
    return asyncio.run(ProbeDaemon(config, write_interval_ms=args.write_interval_ms).main())


if __name__ == "__main__":
    sys.exit(main())
