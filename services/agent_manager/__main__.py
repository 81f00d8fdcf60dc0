"""``python -m services.agent_manager --server pom1 [--topology FILE] [--zone Z ...] [--port N]
[--http-port N] [--heartbeat-port N] [--instance-tag T]`` (also ``pom-ha run agent-manager ...``).

``--zone`` (repeatable) names the zones this AM competes for; default every zone of the topology."""

from __future__ import annotations

import argparse
import asyncio
import sys

from pom_ha.config import ConfigError
from pom_ha.desktop.tls import DesktopTlsError, server_context
from pom_ha.ha.daemon_cli import add_cache_option, cache_wanted, config_error, daemon_context, daemon_parser
from pom_ha.ha.roles import ZoneRole
from services.agent_manager.daemon import SERVICE, AgentManagerDaemon


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = daemon_parser("agent-manager", __doc__)
    p.add_argument("--zone", action="append", default=None, help="zone to manage (repeatable; default: all)")
    p.add_argument("--port", type=int, default=None, help="desktop port (default ports.desktop)")
    p.add_argument("--desktop-heartbeat-ms", type=int, default=500, help="desktop heartbeat interval (10-60000)")
    p.add_argument("--desktop-miss-limit", type=int, default=4, help="missed desktop heartbeats before closing")
    p.add_argument("--desktop-tls-cert", default=None,
                   help="PEM certificate (chain) for TLS on the desktop port (with --desktop-tls-key)")
    p.add_argument("--desktop-tls-key", default=None, help="PEM key of --desktop-tls-cert (unencrypted)")
    add_cache_option(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ctx = daemon_context(args)
        topo = ctx.topo
        known = [z.name for z in topo.zones]
        zones = list(dict.fromkeys(args.zone)) if args.zone else known
        unknown = [z for z in zones if z not in known]
        if unknown:
            raise ConfigError(f"--zone: {unknown} not in the topology's zones {known}")
        if not 10 <= args.desktop_heartbeat_ms <= 60_000 or not 1 <= args.desktop_miss_limit <= 100:
            raise ConfigError("--desktop-heartbeat-ms must be 10..60000 and --desktop-miss-limit 1..100")
        if (args.desktop_tls_cert is None) != (args.desktop_tls_key is None):
            raise ConfigError("--desktop-tls-cert and --desktop-tls-key go together")
        desktop_ssl = None if args.desktop_tls_cert is None else server_context(args.desktop_tls_cert,
                                                                                args.desktop_tls_key)
    except (ConfigError, DesktopTlsError) as exc:
        return config_error(exc)
    port = topo.ports.desktop if args.port is None else args.port
    config = ctx.config(tuple(ZoneRole(SERVICE, z) for z in zones))
    addresses = {s.name: f"{s.address}:{port}" for s in topo.servers}
    daemon = AgentManagerDaemon(
        config, zones=zones, desktop_port=port, manager_addresses=list(addresses.values()),
        desktop_heartbeat_ms=args.desktop_heartbeat_ms, desktop_miss_limit=args.desktop_miss_limit,
        peer_desktop_addresses=addresses, desktop_ssl=desktop_ssl,
    )
    if cache_wanted(args, topo):  # agent states and callbacks (services/agent_manager/cache_link.py)
        from pom_ha.cache.client import OperationalCache, quiet_pyignite_logs
        from services.agent_manager.cache_link import AgentCacheLink

        quiet_pyignite_logs()
        daemon.cache_link = AgentCacheLink(OperationalCache.from_topology(topo))
    return asyncio.run(daemon.main())


if __name__ == "__main__":
    sys.exit(main())
