"""``pom-ha kafka``: the Event SDK cluster's HA commands (enable-ha, verify, sizing).

A thin layer over ``pom_ha.kafka.render``, ``verify`` and ``sizing``; registered on the main group with
``main.add_command(kafka_group)``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from pom_ha.cli_support import fail, topology_option, topology_or_exit
from pom_ha.config import ConfigError
from pom_ha.infra.process import InfraError
from pom_ha.kafka.render import ExternalServer, RenderError, plan_cluster, render_cluster
from pom_ha.kafka.sizing import (
    DEFAULT_RETENTION_HOURS,
    SizingError,
    compute,
    format_table,
    guide_example,
    load_input,
)
from pom_ha.kafka.tls import KafkaTlsError
from pom_ha.kafka.verify import all_passed, format_checks, verify_cluster

_topology_option = topology_option
_fail = fail
_topology = topology_or_exit


@click.group("kafka")
def kafka_group() -> None:
    """Event SDK (Kafka) high availability: render HA configs, verify a cluster, size its disks."""


@kafka_group.command("enable-ha")
@_topology_option
@click.option("--brokers", type=int, default=None,
              help="expected broker count (odd, >= 3); must match the servers chosen")
@click.option("--server", "servers", multiple=True, metavar="NAME",
              help="POM server that gets a ZooKeeper member and a broker (repeat; default: the topology's "
                   "kafka servers)")
@click.option("--external", "externals", multiple=True, metavar="NAME=ADDRESS",
              help="a Kafka/ZooKeeper server where POM is not installed (at most one)")
@click.option("--ssl", is_flag=True, help="create a CA and PKCS12 stores; brokers listen on SSL with client auth")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="folder to write into (default: the topology's lab folder)")
def enable_ha(topology_path: str | None, brokers: int | None, servers: tuple[str, ...],
              externals: tuple[str, ...], ssl: bool, out_dir: str | None) -> None:
    """Render ZooKeeper and broker configs for an HA cluster (myid, server.N, broker.id, listeners,
    replication factor 3, min ISR 2). Bad input is refused and nothing is written."""
    topo = _topology(topology_path)
    try:
        plan = plan_cluster(topo, servers, [ExternalServer.parse(e) for e in externals], brokers, ssl)
    except RenderError as exc:
        _fail(f"{exc}; nothing was written")
    out = Path(out_dir) if out_dir else topo.lab_dir()
    try:
        files = render_cluster(plan, out)
    except (OSError, KafkaTlsError) as exc:
        _fail(f"rendering into {out} failed: {exc}")
    count = len(plan.servers_running("kafka"))
    click.echo(f"Kafka HA for {count} brokers ({'SSL, client auth required' if ssl else 'PLAINTEXT'}) "
               f"rendered into {out.resolve()}:")
    for f in files:
        click.echo(f"  {f.server:8} {f.what:40} {f.path}")
    click.echo(f"start it with: pom-ha infra up --topology {out.resolve() / 'topology.toml'}")


@kafka_group.command("verify")
@_topology_option
@click.option("--org", default="Default", show_default=True, help="organization of the Event SDK topics")
@click.option("--create-topics", is_flag=True, help="create missing Event SDK topics (RF 3, one partition)")
@click.option("--no-disruptive", "no_disruptive", is_flag=True,
              help="skip stopping and restarting a partition leader")
@click.option("--timeout", "timeout_s", type=click.FloatRange(1, 3600), default=120.0, show_default=True,
              help="seconds each step may take")
@click.option("--json", "as_json", is_flag=True, help="print the rows as one JSON object on the last line")
def verify(topology_path: str | None, org: str, create_topics: bool, no_disruptive: bool, timeout_s: float,
           as_json: bool) -> None:
    """Check a running cluster: brokers registered, topics exist, replicas spread, leader stop moves
    leadership and a restarted broker rejoins every ISR. Exit code 0 only when no row fails."""
    topo = _topology(topology_path)
    try:
        checks = asyncio.run(
            verify_cluster(topo, org=org, create_topics=create_topics, disruptive=not no_disruptive,
                           timeout_s=timeout_s, progress=lambda m: click.echo(f"  {m}", err=True))
        )
    except (InfraError, ConfigError, KafkaTlsError) as exc:
        _fail(str(exc))
    click.echo(format_checks(checks))
    ok = all_passed(checks)
    if as_json:
        click.echo(json.dumps({"passed": ok, "checks": [c.__dict__ for c in checks]}))
    else:
        failed = [c.name for c in checks if c.status == "FAIL"]
        click.echo("Kafka HA verified" if ok else f"FAILED: {', '.join(failed)}")
    sys.exit(0 if ok else 1)


@kafka_group.command("sizing")
@click.option("--input", "input_path", type=click.Path(dir_okay=False), default=None,
              help="TOML or CSV of measured MB/hour per topic (default: the guide's sample run)")
@click.option("--example", is_flag=True, help="size the guide's sample run (the default without --input)")
@click.option("--retention-hours", type=float, default=None,
              help=f"hours events are kept (default {DEFAULT_RETENTION_HOURS:g}, or the file's value)")
@click.option("--replication-factor", type=int, default=None, help="override every topic's replication factor")
@click.option("--brokers", type=int, default=None, help="brokers sharing the replicas (default 3)")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object on the last line")
def sizing(input_path: str | None, example: bool, retention_hours: float | None,
           replication_factor: int | None, brokers: int | None, as_json: bool) -> None:
    """Disk needed: MB/hour per topic x replication factor x retention hours, plus fixed sizes."""
    if example and input_path:
        _fail("--example and --input exclude each other")
    try:
        if input_path:
            spec = load_input(Path(input_path), retention_hours, replication_factor, brokers)
        else:
            spec = guide_example(
                retention_hours if retention_hours is not None else DEFAULT_RETENTION_HOURS,
                brokers if brokers is not None else 3,
                replication_factor if replication_factor is not None else 3,
            )
        result = compute(spec)
    except SizingError as exc:
        _fail(str(exc))
    source = input_path or "the guide's sample run (67,000 attempts/hour)"
    click.echo(f"Kafka disk for {source}, retention {result.retention_hours:g} h, {result.brokers} brokers:")
    click.echo(format_table(result))
    if as_json:
        click.echo(json.dumps(result.as_dict()))
