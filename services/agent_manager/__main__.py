"""``python -m services.agent_manager --server pom1 [--topology FILE] [--zone Z ...] [--port N]
[--http-port N] [--heartbeat-port N] [--instance-tag T]`` (also ``pom-ha run agent-manager ...``).

``--zone`` (repeatable) names the zones this AM competes for; default every zone of the topology."""

from __future__ import annotations

import argparse
import asyncio
import sys

from pom_ha.config import ConfigError, load_topology
from pom_ha.ha.daemon import DaemonConfig
from pom_ha.ha.logsetup import configure_logging
from pom_ha.ha.roles import ZoneRole
from pom_ha.ha.settings import load_timings
from services.agent_manager.daemon import SERVICE, AgentManagerDaemon


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="agent-manager", description=__doc__)
    p.add_argument("--server", required=True, help="POM server name from the topology (pom1)")
    p.add_argument("--topology", default=None, help="topology file (default config/lab.toml or POM_TOPOLOGY)")
    p.add_argument("--zone", action="append", default=None, help="zone to manage (repeatable; default: all)")
    p.add_argument("--port", type=int, default=None, help="desktop port (default ports.desktop)")
    p.add_argument("--http-port", type=int, default=0, help="/health and /metrics port (0 = ephemeral)")
    p.add_argument("--heartbeat-port", type=int, default=0, help="heartbeat server port (0 = ephemeral)")
    p.add_argument("--desktop-heartbeat-ms", type=int, default=500, help="desktop heartbeat interval (10-60000)")
    p.add_argument("--desktop-miss-limit", type=int, default=4, help="missed desktop heartbeats before closing")
    p.add_argument("--instance-tag", default=None, help="free-form tag (the lab uses it to find the process)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    try:
        topo = load_topology(args.topology)
        server = topo.server(args.server)
        timings = load_timings()
        known = [z.name for z in topo.zones]
        zones = list(dict.fromkeys(args.zone)) if args.zone else known
        unknown = [z for z in zones if z not in known]
        if unknown:
            raise ConfigError(f"--zone: {unknown} not in the topology's zones {known}")
        if not 10 <= args.desktop_heartbeat_ms <= 60_000 or not 1 <= args.desktop_miss_limit <= 100:
            raise ConfigError("--desktop-heartbeat-ms must be 10..60000 and --desktop-miss-limit 1..100")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    port = topo.ports.desktop if args.port is None else args.port
    config = DaemonConfig(
        server=server.name, address=server.address, dsn=topo.postgres.dsn(),
        roles=tuple(ZoneRole(SERVICE, z) for z in zones), timings=timings, http_port=args.http_port,
        heartbeat_port=args.heartbeat_port, instance_tag=args.instance_tag,
    )
    addresses = {s.name: f"{s.address}:{port}" for s in topo.servers}
    daemon = AgentManagerDaemon(
        config, zones=zones, desktop_port=port, manager_addresses=list(addresses.values()),
        desktop_heartbeat_ms=args.desktop_heartbeat_ms, desktop_miss_limit=args.desktop_miss_limit,
        peer_desktop_addresses=addresses,
    )
    return asyncio.run(daemon.main())


if __name__ == "__main__":
    sys.exit(main())
