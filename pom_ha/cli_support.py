"""What every `pom-ha` command group shares: the ``--topology`` option, loading it, running a coroutine, and
failing with ``error: ...`` on standard error and exit code 2 (bad configuration, a server that is down)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

import click

from pom_ha.config import ConfigError, Topology, load_topology
from pom_ha.infra.process import InfraError

T = TypeVar("T")

topology_option = click.option(
    "--topology",
    "topology_path",
    type=click.Path(dir_okay=False),
    default=None,
    envvar="POM_TOPOLOGY",
    help="topology file (default config/lab.toml)",
)


def fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def topology_or_exit(path: str | None) -> Topology:
    try:
        return load_topology(path)
    except ConfigError as exc:
        fail(str(exc))


def run_or_exit(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``; a configuration or infrastructure error ends the command with its message."""
    try:
        return asyncio.run(coro)
    except (ConfigError, InfraError) as exc:
        fail(str(exc))
