"""The command line every daemon shares (`python -m services.<name>`, `pom-ha run <name>`): the options each
one has (`--server`, `--topology`, `--http-port`, `--heartbeat-port`, `--instance-tag`, `--log-level`) and
the loading of the topology, the server and the HA timings. A daemon adds its own options to the parser."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass

from pom_ha.config import ConfigError, ServerSection, Topology, load_topology
from pom_ha.ha.daemon import DaemonConfig, HADaemon
from pom_ha.ha.logsetup import configure_logging
from pom_ha.ha.roles import RoleKind
from pom_ha.ha.settings import HATimings, load_timings


def daemon_parser(prog: str, description: str | None, *, heartbeat: bool = True) -> argparse.ArgumentParser:
    """A parser with the common options; ``heartbeat=False`` for daemons without an elected role."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--server", required=True, help="POM server name from the topology (pom1)")
    p.add_argument("--topology", default=None, help="topology file (default config/lab.toml or POM_TOPOLOGY)")
    p.add_argument("--http-port", type=int, default=None,
                   help="/health and /metrics port (default: the topology's ports.metrics_<daemon>, else "
                        "ephemeral; 0 = ephemeral)")
    p.set_defaults(daemon_name=prog)
    if heartbeat:
        p.add_argument("--heartbeat-port", type=int, default=0, help="heartbeat server port (0 = ephemeral)")
    p.add_argument("--instance-tag", default=None, help="free-form tag (the lab uses it to find the process)")
    p.add_argument("--log-level", default="INFO")
    return p


def load_daemon_context(args: argparse.Namespace) -> tuple[Topology, ServerSection, HATimings]:
    """Logging configured, then the topology, this daemon's server and the HA timings (and ``args.http_port``
    resolved to the daemon's fixed metrics port unless given); raises
    :class:`pom_ha.config.ConfigError` naming what is wrong."""
    configure_logging(args.log_level)
    topo = load_topology(args.topology)
    if args.http_port is None:
        args.http_port = topo.ports.metrics(args.daemon_name) or 0
    return topo, topo.server(args.server), load_timings()


def add_cache_option(p: argparse.ArgumentParser) -> None:
    """``--cache on|off|auto`` for the daemons that are clients of the cache service (CD, CM, AM)."""
    p.add_argument("--cache", choices=("auto", "on", "off"), default="auto",
                   help="use the Ignite cache service: auto = when the topology runs Ignite (default); off for a "
                        "lab without Ignite (then nothing waits on the cache: job starts are not gated by it)")


def cache_wanted(args: argparse.Namespace, topo: Topology) -> bool:
    choice = getattr(args, "cache", "auto")
    return choice == "on" or (choice == "auto" and bool(topo.servers_running("ignite")))


@dataclass(frozen=True)
class DaemonContext:
    """What a daemon's ``__main__`` loaded: its options, the topology, its server and the HA timings."""

    args: argparse.Namespace
    topo: Topology
    server: ServerSection
    timings: HATimings

    def config(self, roles: tuple[RoleKind, ...], *, dsn: str | None = None) -> DaemonConfig:
        """The daemon's :class:`DaemonConfig` from the common options (``dsn`` defaults to the topology's)."""
        return DaemonConfig(
            server=self.server.name, address=self.server.address, dsn=dsn or self.topo.postgres.dsn(), roles=roles,
            timings=self.timings, http_port=self.args.http_port,
            heartbeat_port=getattr(self.args, "heartbeat_port", 0), instance_tag=self.args.instance_tag,
        )


def daemon_context(args: argparse.Namespace) -> DaemonContext:
    """:func:`load_daemon_context` as one object; raises :class:`pom_ha.config.ConfigError`."""
    return DaemonContext(args, *load_daemon_context(args))


def config_error(exc: Exception) -> int:
    """A daemon's start-up refusal: ``error: ...`` on standard error; the exit code (2) to return."""
    print(f"error: {exc}", file=sys.stderr)
    return 2


def run_daemon(args: argparse.Namespace, build: Callable[[DaemonContext], HADaemon | int],
               errors: tuple[type[Exception], ...] = ()) -> int:
    """A daemon's whole ``main``: load the context, ``build`` the daemon (or an exit code), run it until it stops.
    A :class:`ConfigError` (or one of ``errors``) while loading or building is ``error: ...`` and exit code 2."""
    caught: tuple[type[Exception], ...] = (ConfigError, *errors)
    try:
        daemon = build(daemon_context(args))
    except caught as exc:
        return config_error(exc)
    if isinstance(daemon, int):
        return daemon
    return asyncio.run(daemon.main())
