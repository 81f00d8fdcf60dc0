"""``python -m services.cache_service --server pom1 [--topology FILE] [--http-port N] [--instance-tag T]
[--stop-node-on-exit]`` (also ``pom-ha run cache-service ...``).

Supervises the Ignite node of that POM server (start if down, restart after a crash, health) and rebuilds
the cache from PostgreSQL after the whole cache was lost. The node keeps running when the daemon stops
(a supervisor restart must not drop a replica) unless ``--stop-node-on-exit``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from pom_ha.cache.client import OperationalCache, quiet_pyignite_logs
from pom_ha.config import ConfigError, load_topology
from pom_ha.ha.daemon import DaemonConfig
from pom_ha.ha.logsetup import configure_logging
from pom_ha.ha.roles import PoolMember
from pom_ha.ha.settings import load_timings
from pom_ha.infra.ignite import IgniteLauncher
from services.cache_service.daemon import SERVICE, CacheServiceDaemon
from services.cache_service.supervisor import NodeSupervisor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cache-service", description=__doc__)
    p.add_argument("--server", required=True, help="POM server name from the topology (pom1)")
    p.add_argument("--topology", default=None, help="topology file (default config/lab.toml or POM_TOPOLOGY)")
    p.add_argument("--http-port", type=int, default=0, help="/health and /metrics port (0 = ephemeral)")
    p.add_argument("--instance-tag", default=None, help="free-form tag (the lab uses it to find the process)")
    p.add_argument("--check-interval-ms", type=int, default=500, help="node health check interval")
    p.add_argument("--stagger-s", type=float, default=10.0,
                   help="whole-cluster start: the N-th server waits up to N x this for a peer to join")
    p.add_argument("--stop-node-on-exit", action="store_true", help="stop the local Ignite node on exit")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    try:
        topo = load_topology(args.topology)
        server = topo.server(args.server)
        timings = load_timings()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if "ignite" not in server.runs:
        print(f"error: {server.name} runs no Ignite node in {topo.source}", file=sys.stderr)
        return 2
    config = DaemonConfig(
        server=server.name, address=server.address, dsn=topo.postgres.dsn(), roles=(PoolMember(SERVICE),),
        timings=timings, http_port=args.http_port, instance_tag=args.instance_tag,
    )
    quiet_pyignite_logs()
    launcher = IgniteLauncher(topo, server)
    ignite_servers = [s.name for s in topo.servers_running("ignite")]
    peers = [(s.address, topo.ports.ignite_thin_client) for s in topo.servers_running("ignite") if s is not server]
    daemon = CacheServiceDaemon(
        config, launcher=launcher, cache=OperationalCache.from_topology(topo),
        supervisor=NodeSupervisor(launcher, interval_s=args.check_interval_ms / 1000, peers=peers,
                                  rank=ignite_servers.index(server.name), stagger_s=args.stagger_s),
        stop_node_on_exit=args.stop_node_on_exit,
    )
    return asyncio.run(daemon.main())


if __name__ == "__main__":
    sys.exit(main())
