"""``python -m services.rule_engine --server pom1 [--topology FILE] [--port N] [--http-port N]
[--heartbeat-port N] [--instance-tag T]`` (also ``pom-ha run rule-engine ...``)."""

from __future__ import annotations

import argparse
import sys

from pom_ha.ha.daemon_cli import DaemonContext, daemon_parser, run_daemon
from pom_ha.ha.roles import SingletonRole
from services.rule_engine.daemon import SERVICE, RuleEngineDaemon


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = daemon_parser("rule-engine", __doc__)
    p.add_argument("--port", type=int, default=None, help="request port while master (default ports.rule_engine)")
    return p.parse_args(argv)


def build(ctx: DaemonContext) -> RuleEngineDaemon:
    port = ctx.topo.ports.rule_engine if ctx.args.port is None else ctx.args.port
    return RuleEngineDaemon(ctx.config((SingletonRole(SERVICE),)), port=port)


def main(argv: list[str] | None = None) -> int:
    return run_daemon(parse_args(argv), build)


if __name__ == "__main__":
    sys.exit(main())
