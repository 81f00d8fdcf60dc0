"""``pom-ha chaos run | check``: a randomized fault campaign on a running lab, and its independent checker.

(``pom-ha chaos simulate`` — the deterministic simulation — joins this group from its own module.)
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import click

from pom_ha.chaos.simulate import simulate_command
from pom_ha.cli_support import topology_option
from pom_ha.config import ConfigError, Topology, load_topology


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _topology(path: str | None) -> Topology:
    try:
        return load_topology(path)
    except ConfigError as exc:
        _fail(str(exc))


def _topology_file(topo: Topology, path: str | None) -> Path:
    if path:
        return Path(path).resolve()
    lab_copy = topo.lab_dir() / "topology.toml"
    if not lab_copy.exists():
        _fail(f"the lab is not running: no {lab_copy} (start it with: pom-ha lab up)")
    return lab_copy


@click.group("chaos")
def chaos() -> None:
    """Fault campaigns on a running lab, and the history checker that judges them."""


@chaos.command("run")
@click.option("--faults", type=click.IntRange(1, 1_000_000), default=25, show_default=True,
              help="faults to inject")
@click.option("--seed", type=int, default=1, show_default=True, help="seed of the random draw")
@click.option("--concurrency", type=click.IntRange(1, 16), default=1, show_default=True,
              help="faults active at once (at most; the survivability plan may allow fewer)")
@click.option("--minutes", type=click.FloatRange(0.1, 24 * 60), default=None,
              help="stop drawing new faults after this long")
@click.option("--kinds", default=None, help="comma list of fault kinds (default: all)")
@click.option("--history", "history_path", type=click.Path(dir_okay=False), default=None,
              help="JSONL history file (default <lab>/chaos/history-<seed>.jsonl)")
@click.option("--contacts", type=click.IntRange(0, 100_000), default=300, show_default=True,
              help="contacts of the run's agentless campaign (0: no campaigns of its own)")
@click.option("--calls-per-second", type=click.FloatRange(0.1, 500), default=3.0, show_default=True)
@click.option("--agents", type=click.IntRange(0, 500), default=10, show_default=True,
              help="bot agents of the run's agent-based campaign (0: none)")
@click.option("--recovery-timeout", type=click.FloatRange(1, 3600), default=120.0, show_default=True,
              help="seconds a fault may take to recover before it counts as not recovered")
@click.option("--check/--no-check", default=True, show_default=True, help="run the checker at the end")
@click.option("--json", "as_json", is_flag=True, help="last line: one JSON object with the results")
@topology_option
def run(faults: int, seed: int, concurrency: int, minutes: float | None, kinds: str | None,
        history_path: str | None, contacts: int, calls_per_second: float, agents: int, recovery_timeout: float,
        check: bool, as_json: bool, topology_path: str | None) -> None:
    """Inject FAULTS random faults (up to CONCURRENCY at once) while campaigns dial, heal them all, let the
    campaigns finish, then run the checker. Exit 1 on a violation, a leftover or an unrecovered fault."""
    from pom_ha.chaos.faults import FAULT_KINDS, ProcessLab
    from pom_ha.chaos.runner import Runner, RunOptions, RunRefused, render_summary

    topo = _topology(topology_path)
    chosen = tuple(k.strip() for k in kinds.split(",") if k.strip()) if kinds else FAULT_KINDS
    unknown = [k for k in chosen if k not in FAULT_KINDS]
    if unknown:
        raise click.BadParameter(f"unknown fault kind(s) {unknown}; known: {', '.join(FAULT_KINDS)}",
                                 param_hint="--kinds")
    lab = ProcessLab(topo, _topology_file(topo, topology_path))
    history = Path(history_path) if history_path else topo.lab_dir() / "chaos" / f"history-{seed}.jsonl"
    opts = RunOptions(faults=faults, seed=seed, concurrency=concurrency, minutes=minutes, kinds=chosen,
                      history=history, contacts=contacts, calls_per_second=calls_per_second, agents=agents,
                      recovery_timeout_s=recovery_timeout, check=check)
    runner = Runner(lab, opts, echo=click.echo)
    try:
        result = asyncio.run(runner.run())
    except RunRefused as exc:
        _fail(str(exc))
    click.echo("")
    click.echo(render_summary(result))
    for v in result.violations:
        click.echo(v.render())
    for left in result.leftovers:
        click.echo(f"LEFTOVER {left}")
    for crash in result.crashes:
        click.echo(f"CRASH {crash}")
    summary = result.summary()
    click.echo(f"faults {summary['faults']}, seed {seed}, violations {summary['violations']}, "
               f"leftovers {len(result.leftovers)}, unrecovered {result.unrecovered}, crashes {len(result.crashes)}, "
               f"history {history}")
    if as_json:
        click.echo(json.dumps(summary))
    if result.interrupted:
        sys.exit(130)
    if result.violations or result.leftovers or result.unrecovered or result.crashes or result.check_error:
        sys.exit(1)


@chaos.command("check")
@click.argument("history_path", type=click.Path(dir_okay=False))
@click.option("--kafka/--no-kafka", default=True, show_default=True, help="read the POM.<org>.* topics")
@click.option("--json", "as_json", is_flag=True, help="last line: one JSON object with the results")
@topology_option
def check(history_path: str, kafka: bool, as_json: bool, topology_path: str | None) -> None:
    """Judge a chaos run by what the lab left behind (tables, call logs, Kafka topics). Exit 1 on a
    violation, and on a history that is truncated or of another lab."""
    from pom_ha.chaos.checker import by_kind
    from pom_ha.chaos.history import HistoryError, read_history

    topo = _topology(topology_path)
    try:
        hist = read_history(history_path)
    except HistoryError as exc:
        _fail(str(exc))
    try:
        violations = asyncio.run(_check(topo, hist, kafka))
    except HistoryError as exc:
        _fail(str(exc))
    except (OSError, RuntimeError) as exc:
        _fail(f"cannot read the lab's witnesses: {exc}")
    for v in violations:
        click.echo(v.render())
    out: dict[str, Any] = {"faults": len(hist.faults), "seed": hist.header.get("seed"), "jobs": hist.jobs,
                           "violations": len(violations), "violations_by_kind": by_kind(violations),
                           "leftovers": hist.end.get("leftovers", [])}
    click.echo(f"checked {hist.path}: {len(hist.faults)} faults, jobs {hist.jobs}, "
               f"{len(violations)} violation(s)")
    if as_json:
        click.echo(json.dumps(out))
    if violations:
        sys.exit(1)


async def _check(topo: Topology, hist: Any, kafka: bool) -> list[Any]:
    import asyncpg

    from pom_ha.chaos.checker import collect, judge
    from pom_ha.chaos.history import HistoryError, lab_fingerprint, same_lab

    try:
        conn = await asyncpg.connect(topo.postgres.dsn(), timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        raise OSError(f"PostgreSQL at {topo.postgres.address}:{topo.postgres.port}: {type(exc).__name__}") from None
    try:
        diff = same_lab(hist.lab, await lab_fingerprint(conn, topo))
        if diff:
            raise HistoryError(f"{hist.path}: a history of another lab ({'; '.join(diff)})")
        ev = await collect(conn, topo, jobs=hist.jobs, since=hist.started_at - timedelta(seconds=5),
                           until=hist.ended_at + timedelta(seconds=5), kafka=kafka)
    finally:
        await conn.close()
    from pom_ha.chaos.checker import Violation

    found: list[Violation] = judge(ev)
    return found


# the deterministic simulation of the HA core (pom_ha/chaos/simulate.py)
chaos.add_command(simulate_command)
chaos_group = chaos
