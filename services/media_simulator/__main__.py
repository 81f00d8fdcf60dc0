"""``python -m services.media_simulator --server pom1 [--topology FILE] [--port N] [--capacity 500]
[--time-scale 1.0] [--seed N] [--outcomes JSON] [--orphan-hold-s 120] [--call-log FILE] [--instance-tag T]``.

Listens on the server's address at ``ports.media_simulator`` (or ``--port``); no database needed.
``--call-log FILE`` appends one JSON line per call placed (attempt id, job, contact id, attempt number, epoch,
scope, wall-clock time; never the phone number), written through at once so a SIGKILL loses none.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

from pom_ha.config import ConfigError, load_topology
from pom_ha.ha.logsetup import configure_logging
from pom_ha.media.simulator import DEFAULT_OUTCOMES, MediaPlatform, parse_outcomes
from services.media_simulator.server import MediaSimulatorServer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="media-simulator", description=__doc__)
    p.add_argument("--server", required=True, help="POM server name from the topology (pom1)")
    p.add_argument("--topology", default=None, help="topology file (default config/lab.toml or POM_TOPOLOGY)")
    p.add_argument("--port", type=int, default=None, help="listen port (default ports.media_simulator)")
    p.add_argument("--capacity", type=int, default=500, help="ports: maximum concurrent calls")
    p.add_argument("--time-scale", type=float, default=1.0, help="real seconds per simulated second (0.01 = 100x)")
    p.add_argument("--seed", type=int, default=None, help="seed of the outcome RNG (reproducible runs)")
    p.add_argument("--outcomes", default=None,
                   help='JSON weights per completion code, e.g. {"ANSWER_HUMAN": 0.5, "BUSY": 0.5}')
    p.add_argument("--orphan-hold-s", type=float, default=120.0,
                   help="how long an outcome whose connection is gone is held for its scope")
    p.add_argument("--call-log", default=None, help="append one JSON line per call placed to this file")
    p.add_argument("--instance-tag", default=None, help="free-form tag (the lab uses it to find the process)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def call_log_writer(out: TextIO) -> Callable[[dict[str, Any]], None]:
    def write(entry: dict[str, Any]) -> None:
        out.write(json.dumps(entry, separators=(",", ":")) + "\n")
        out.flush()

    return write


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    log_file: TextIO | None = None
    try:
        if args.call_log:
            try:
                log_file = open(args.call_log, "a", buffering=1)
            except OSError as exc:
                raise ValueError(f"--call-log {args.call_log}: {exc.strerror}") from None
        topo = load_topology(args.topology)
        server = topo.server(args.server)
        outcomes = parse_outcomes(args.outcomes) if args.outcomes else DEFAULT_OUTCOMES
        platform = MediaPlatform(
            lambda _owner, _outcome: False, capacity=args.capacity, outcomes=outcomes,
            time_scale=args.time_scale, seed=args.seed, orphan_hold_s=args.orphan_hold_s,
            call_log=call_log_writer(log_file) if log_file is not None else None,
        )
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    port = topo.ports.media_simulator if args.port is None else args.port
    sim = MediaSimulatorServer(platform, server.address, port, server_name=server.name)
    try:
        return asyncio.run(sim.run())
    except OSError as exc:
        print(f"error: cannot listen on {server.address}:{port}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
