"""``python -m services.event_aggregator --server pom1 [--topology FILE] [--org ORG ...] [--http-port N]
[--heartbeat-port N] [--instance-tag T]`` (also ``pom-ha run event-aggregator ...``)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from pom_ha.config import ConfigError, load_topology
from pom_ha.ha.daemon import DaemonConfig
from pom_ha.ha.logsetup import configure_logging
from pom_ha.ha.roles import SingletonRole
from pom_ha.ha.settings import load_timings
from pom_ha.infra.kafka import bootstrap_servers
from pom_ha.kafka.tls import KafkaTlsError, security_config
from services.event_aggregator.daemon import SERVICE, AggregatorSettings, EventAggregatorDaemon, orgs_of


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="event-aggregator", description=__doc__)
    p.add_argument("--server", required=True, help="POM server name from the topology (pom1)")
    p.add_argument("--topology", default=None, help="topology file (default config/lab.toml or POM_TOPOLOGY)")
    p.add_argument("--org", action="append", default=[],
                   help="organization to aggregate (repeatable; default: every zone's organization)")
    p.add_argument("--batch", type=int, default=500, help="records per transaction at most")
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
        security = security_config(topo)
    except (ConfigError, KafkaTlsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    brokers = len(topo.servers_running("kafka"))
    settings = AggregatorSettings(
        bootstrap=bootstrap_servers(topo), security=security,
        orgs=orgs_of([z.org for z in topo.zones], args.org), replication=min(3, max(1, brokers)),
        batch_max_records=args.batch,
    )
    config = DaemonConfig(
        server=server.name, address=server.address, dsn=topo.postgres.dsn(), roles=(SingletonRole(SERVICE),),
        timings=timings, http_port=args.http_port, heartbeat_port=args.heartbeat_port, instance_tag=args.instance_tag,
    )
    return asyncio.run(EventAggregatorDaemon(config, settings).main())


if __name__ == "__main__":
    sys.exit(main())
