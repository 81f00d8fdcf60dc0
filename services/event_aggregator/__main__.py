"""``python -m services.event_aggregator --server pom1 [--topology FILE] [--org ORG ...] [--http-port N]
[--heartbeat-port N] [--instance-tag T]`` (also ``pom-ha run event-aggregator ...``)."""

from __future__ import annotations

import argparse
import sys

from pom_ha.config.addresses import bootstrap_servers
from pom_ha.ha.daemon_cli import DaemonContext, daemon_parser, run_daemon
from pom_ha.ha.roles import SingletonRole
from pom_ha.kafka.tls import KafkaTlsError, security_config
from services.event_aggregator.daemon import SERVICE, AggregatorSettings, EventAggregatorDaemon, orgs_of


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = daemon_parser("event-aggregator", __doc__)
    p.add_argument("--org", action="append", default=[],
                   help="organization to aggregate (repeatable; default: every zone's organization)")
    p.add_argument("--batch", type=int, default=500, help="records per transaction at most")
    return p.parse_args(argv)


def build(ctx: DaemonContext) -> EventAggregatorDaemon:
    topo = ctx.topo
    brokers = len(topo.servers_running("kafka"))
    settings = AggregatorSettings(
        bootstrap=bootstrap_servers(topo), security=security_config(topo),
        orgs=orgs_of([z.org for z in topo.zones], ctx.args.org), replication=min(3, max(1, brokers)),
        batch_max_records=ctx.args.batch,
    )
    return EventAggregatorDaemon(ctx.config((SingletonRole(SERVICE),)), settings)


def main(argv: list[str] | None = None) -> int:
    return run_daemon(parse_args(argv), build, (KafkaTlsError,))


if __name__ == "__main__":
    sys.exit(main())
