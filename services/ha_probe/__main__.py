"""``python -m services.ha_probe --server pom1 --role NAME [--zone Z ...] [--pool] [--topology FILE]
[--http-port N] [--heartbeat-port N]`` (also ``pom-ha run ha-probe ...``)."""

from __future__ import annotations

import argparse
import sys

from pom_ha.ha.daemon_cli import DaemonContext, daemon_parser, run_daemon
from pom_ha.ha.roles import PoolMember, RoleKind, SingletonRole, ZoneRole
from services.ha_probe.probe import ProbeDaemon


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = daemon_parser("ha-probe", __doc__)
    p.add_argument("--role", required=True, help="service name of the role (e.g. rule_engine)")
    p.add_argument("--zone", action="append", default=[], help="per-zone role: compete for this zone (repeatable)")
    p.add_argument("--pool", action="store_true", help="pool membership only (all RUNNING, no lease)")
    p.add_argument("--write-interval-ms", type=int, default=20, help="fenced write period while master")
    return p.parse_args(argv)


def build(ctx: DaemonContext) -> ProbeDaemon:
    args = ctx.args
    roles: tuple[RoleKind, ...]
    if args.pool:
        roles = (PoolMember(args.role),)
    elif args.zone:
        roles = tuple(ZoneRole(args.role, z) for z in dict.fromkeys(args.zone))
    else:
        roles = (SingletonRole(args.role),)
    return ProbeDaemon(ctx.config(roles), write_interval_ms=args.write_interval_ms)


def main(argv: list[str] | None = None) -> int:
    return run_daemon(parse_args(argv), build)


if __name__ == "__main__":
    sys.exit(main())
