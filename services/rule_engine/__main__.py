"""``python -m services.rule_engine --server pom1 [--topology FILE] [--port N] [--http-port N]
[--heartbeat-port N] [--instance-tag T]`` (also ``pom-ha run rule-engine ...``)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from pom_ha.config import ConfigError, load_topology
from pom_ha.ha.daemon import DaemonConfig
from pom_ha.ha.logsetup import configure_logging
from pom_ha.ha.roles import SingletonRole
from pom_ha.ha.settings import load_timings
from services.rule_engine.daemon import SERVICE, RuleEngineDaemon


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rule-engine", description=__doc__)
    p.add_argument("--server", required=True, help="POM server name from the topology (pom1)")
    p.add_argument("--topology", default=None, help="topology file (default config/lab.toml or POM_TOPOLOGY)")
    p.add_argument("--port", type=int, default=None, help="request port while master (default ports.rule_engine)")
    p.add_argument("--http-port", type=int, default=0, help="/health and /metrics port (0 = ephemeral)")
    p.add_argument("--heartbeat-port", type=int, default=0, help="heartbeat server port (0 = ephemeral)")
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
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = DaemonConfig(
        server=server.name, address=server.address, dsn=topo.postgres.dsn(), roles=(SingletonRole(SERVICE),),
        timings=timings, http_port=args.http_port, heartbeat_port=args.heartbeat_port, instance_tag=args.instance_tag,
    )
    port = topo.ports.rule_engine if args.port is None else args.port
    return asyncio.run(RuleEngineDaemon(config, port=port).main())


if __name__ == "__main__":
    sys.exit(main())
