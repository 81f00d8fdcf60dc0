"""What every `pom-ha` command group shares: the ``--topology`` option, loading it, running a coroutine,
failing with ``error: ...`` on standard error and exit code 2 (bad configuration, a server that is down), and the
tables the commands print (``pom_ha/cli.py`` and the groups it registers import this, never each other)."""

from __future__ import annotations

import asyncio
import json
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


def table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, a dashed line under the header."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_server_status(stack: Any) -> None:
    """One row per server process of ``stack`` (a :class:`pom_ha.infra.stack.Stack`)."""
    rows = run_or_exit(stack.status())
    click.echo(
        table(
            ["SERVER", "KIND", "ADDRESS", "PID", "STATE"],
            [[r.pom_server, r.kind, r.endpoint, str(r.pid or "-"), r.state] for r in rows],
        )
    )


def print_component_table(topo: Topology, stale_after_s: float, as_json: bool) -> None:
    """The component table (``pom-ha status``): one row per component, one column per server."""
    import asyncpg

    from pom_ha.status import read_table

    async def go() -> Any:
        try:
            return await read_table(topo.postgres.dsn(), [s.name for s in topo.servers])
        except (OSError, asyncpg.PostgresError) as exc:
            raise InfraError(
                f"cannot read the status rows from PostgreSQL at {topo.postgres.address}:{topo.postgres.port}: "
                f"{exc.__class__.__name__}"
            ) from None

    status = run_or_exit(go())
    if as_json:
        click.echo(json.dumps(status.as_json(stale_after_s), default=str))
    elif not status.rows:
        click.echo("no component has registered yet (no ha_member rows)")
    else:
        click.echo(table(status.header(), status.lines(stale_after_s)))
