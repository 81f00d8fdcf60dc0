"""``python -m services.cache_service --server pom1 [--topology FILE] [--http-port N] [--instance-tag T]
[--stop-node-on-exit]`` (also ``pom-ha run cache-service ...``).

Supervises the Ignite node of that POM server (start if down, restart after a crash, health) and rebuilds
the cache from PostgreSQL after the whole cache was lost. The node keeps running when the daemon stops
(a supervisor restart must not drop a replica) unless ``--stop-node-on-exit``.
"""

from __future__ import annotations

import argparse
import sys

from pom_ha.cache.client import OperationalCache, quiet_pyignite_logs
from pom_ha.config import ConfigError
from pom_ha.ha.daemon_cli import DaemonContext, daemon_parser, run_daemon
from pom_ha.ha.roles import PoolMember
from pom_ha.infra.ignite import IgniteLauncher
from services.cache_service.daemon import SERVICE, CacheServiceDaemon
from services.cache_service.supervisor import NodeSupervisor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = daemon_parser("cache-service", __doc__, heartbeat=False)
    p.add_argument("--check-interval-ms", type=int, default=500, help="node health check interval")
    p.add_argument("--stagger-s", type=float, default=10.0,
                   help="whole-cluster start: the N-th server waits up to N x this for a peer to join")
    p.add_argument("--stop-node-on-exit", action="store_true", help="stop the local Ignite node on exit")
    return p.parse_args(argv)


def build(ctx: DaemonContext) -> CacheServiceDaemon:
    args, topo, server = ctx.args, ctx.topo, ctx.server
    if "ignite" not in server.runs:
        raise ConfigError(f"{server.name} runs no Ignite node in {topo.source}")
    quiet_pyignite_logs()
    launcher = IgniteLauncher(topo, server)
    ignite_servers = [s.name for s in topo.servers_running("ignite")]
    peers = [(s.address, topo.ports.ignite_thin_client) for s in topo.servers_running("ignite") if s is not server]
    return CacheServiceDaemon(
        ctx.config((PoolMember(SERVICE),)), launcher=launcher, cache=OperationalCache.from_topology(topo),
        supervisor=NodeSupervisor(launcher, interval_s=args.check_interval_ms / 1000, peers=peers,
                                  rank=ignite_servers.index(server.name), stagger_s=args.stagger_s),
        stop_node_on_exit=args.stop_node_on_exit,
    )


def main(argv: list[str] | None = None) -> int:
    return run_daemon(parse_args(argv), build)


if __name__ == "__main__":
    sys.exit(main())
