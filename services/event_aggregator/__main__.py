"""``python -m services.event_aggregator --server pom1 [--topology FILE] [--org ORG ...] [--http-port N]
[--heartbeat-port N] [--instance-tag T]`` (also ``pom-ha run event-aggregator ...``)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from pom_ha.config import ConfigError
from pom_ha.config.addresses import bootstrap_servers
from pom_ha.ha.daemon_cli import config_error, daemon_context, daemon_parser
from pom_ha.ha.roles import SingletonRole
from pom_ha.kafka.tls import KafkaTlsError, security_config
from services.event_aggregator.daemon import SERVICE, AggregatorSettings, EventAggregatorDaemon, orgs_of


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = daemon_parser("event-aggregator", __doc__)
    p.add_argument("--org", action="append", default=[],
                   help="organization to aggregate (repeatable; default: every zone's organization)")
    p.add_argument("--batch", type=int, default=500, help="records per transaction at most")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ctx = daemon_context(args)
        security = security_config(ctx.topo)
    except (ConfigError, KafkaTlsError) as exc:
        return config_error(exc)
    topo = ctx.topo
    brokers = len(topo.servers_running("kafka"))
    settings = AggregatorSettings(
        bootstrap=bootstrap_servers(topo), security=security,
        orgs=orgs_of([z.org for z in topo.zones], args.org), replication=min(3, max(1, brokers)),
        batch_max_records=args.batch,
    )
    config = ctx.config((SingletonRole(SERVICE),))
    return asyncio.run(EventAggregatorDaemon(config, settings).main())


if __name__ == "__main__":
    sys.exit(main())
