"""``python -m services.rule_engine --server pom1 [--topology FILE] [--port N] [--http-port N]
[--heartbeat-port N] [--instance-tag T]`` (also ``pom-ha run rule-engine ...``)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from pom_ha.config import ConfigError
from pom_ha.ha.daemon_cli import config_error, daemon_context, daemon_parser
from pom_ha.ha.roles import SingletonRole
from services.rule_engine.daemon import SERVICE, RuleEngineDaemon


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = daemon_parser("rule-engine", __doc__)
    p.add_argument("--port", type=int, default=None, help="request port while master (default ports.rule_engine)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ctx = daemon_context(args)
    except ConfigError as exc:
        return config_error(exc)
    config = ctx.config((SingletonRole(SERVICE),))
    port = ctx.topo.ports.rule_engine if args.port is None else args.port
    return asyncio.run(RuleEngineDaemon(config, port=port).main())


if __name__ == "__main__":
    sys.exit(main())
