"""``python -m services.campaign_manager --server pom1 [--topology FILE] [--media HOST:PORT ...]
[--http-port N] [--instance-tag T]`` (also ``pom-ha run campaign-manager ...``)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from pom_ha.config import ConfigError, Topology
from pom_ha.ha.daemon_cli import add_cache_option, cache_wanted, config_error, daemon_context, daemon_parser
from pom_ha.ha.roles import PoolMember
from pom_ha.media.client import Address
from services.campaign_manager.daemon import SERVICE, CampaignManagerDaemon, CMOptions
from services.campaign_manager.dial_loop import RunnerOptions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = daemon_parser("campaign-manager", __doc__, heartbeat=False)
    p.add_argument("--media", action="append", default=[], metavar="HOST:PORT",
                   help="media platform address, in order of preference (repeatable; default: every server of "
                        "the topology at ports.media_simulator)")
    p.add_argument("--reconcile-interval-s", type=float, default=5.0,
                   help="re-read the job assignments this often even without a NOTIFY")
    p.add_argument("--attempt-timeout-s", type=float, default=600.0,
                   help="an attempt without an outcome this long is recorded as a network failure")
    p.add_argument("--re-timeout-s", type=float, default=1.0,
                   help="a Rule Engine evaluation not answered within this pauses dialing")
    add_cache_option(p)
    return p.parse_args(argv)


def media_addresses(topo: Topology, raw: list[str]) -> list[Address]:
    if not raw:
        return [(s.address, topo.ports.media_simulator) for s in topo.servers]
    out: list[Address] = []
    for item in raw:
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"--media {item!r}: expected HOST:PORT")
        out.append((host, int(port)))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ctx = daemon_context(args)
        topo = ctx.topo
        media = media_addresses(topo, args.media)
    except ConfigError as exc:
        return config_error(exc)
    config = ctx.config((PoolMember(SERVICE),))
    options = CMOptions(
        reconcile_interval_s=args.reconcile_interval_s,
        runner=RunnerOptions(re_timeout_s=args.re_timeout_s, attempt_timeout_s=args.attempt_timeout_s),
    )
    cache = None
    if cache_wanted(args, topo):  # job statistics and CACHE_REBUILT (services/campaign_manager/cache_link.py)
        from pom_ha.cache.client import OperationalCache, quiet_pyignite_logs

        quiet_pyignite_logs()
        cache = OperationalCache.from_topology(topo)
    return asyncio.run(CampaignManagerDaemon(config, topology=topo, media=media, options=options,
                                             cache=cache).main())


if __name__ == "__main__":
    sys.exit(main())
