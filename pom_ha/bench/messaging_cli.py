"""`pom-ha bench activemq-failover` and `pom-ha bench kafka-bytes` (registered on the bench group in
pom_ha/cli.py). `--json` prints one JSON object on the last line."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click

from pom_ha.config import ConfigError, load_topology
from pom_ha.infra.process import InfraError

_topology_option = click.option(
    "--topology", "topology_path", type=click.Path(dir_okay=False), default=None, envvar="POM_TOPOLOGY",
    help="topology file (default config/lab.toml); the bench runs on an isolated copy of it",
)


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except (ConfigError, InfraError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


def _load(path: str | None) -> Any:
    try:
        return load_topology(path)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


@click.command("activemq-failover")
@click.option("--trials", type=click.IntRange(1, 200), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@_topology_option
def bench_activemq_failover(trials: int, as_json: bool, topology_path: str | None) -> None:
    """SIGKILL of the ActiveMQ master -> the first receipted STOMP send on the new master (postgres +
    the two brokers on an isolated copy of the topology)."""
    from pom_ha.bench.activemq import run_bench

    r = _run(run_bench(_load(topology_path), trials, echo=click.echo))
    click.echo(json.dumps(r) if as_json else (
        f"ActiveMQ master SIGKILL -> first confirmed send, {r['trials']} trials: p50 {r['p50_ms']} ms, "
        f"p95 {r['p95_ms']} ms, p99 {r['p99_ms']} ms, max {r['max_ms']} ms (lease {r['lease_ms']} ms); "
        f"vs POM's {r['pom_s']:.0f} s: {r['pom_ratio_p99']}x faster (p99)"))


@click.command("kafka-bytes")
@click.option("--attempts", type=click.IntRange(100, 10_000_000), default=2_000, show_default=True,
              help="attempts replayed at the guide's 67,000/hour (2,000: about 2 min of dialing)")
@click.option("--attempts-per-hour", type=click.FloatRange(1000, 10_000_000), default=67_000, show_default=True,
              help="replay rate; records per batch follow it, so keep the guide's rate to measure its case")
@click.option("--json", "as_json", is_flag=True)
@_topology_option
def bench_kafka_bytes(attempts: int, attempts_per_hour: float, as_json: bool, topology_path: str | None) -> None:
    """Bytes on the brokers' disks per dialing attempt over the six Event SDK topics, for the guide's event
    mix, produced with the real producer settings to a 3-broker Kafka (isolated copy of the topology)."""
    from pom_ha.bench.kafka import run_bench

    r = _run(run_bench(_load(topology_path), attempts, echo=click.echo, attempts_per_hour=attempts_per_hour))
    click.echo(json.dumps(r) if as_json else (
        f"{r['bytes_per_attempt']:.0f} bytes/attempt over the six topics ({r['attempts']} attempts, "
        f"{r['events']} events, {r['log_bytes']:,} bytes in the leaders' log segments, compression "
        f"{r['compression']}, linger {r['linger_ms']} ms); the guide's settings taken literally: "
        f"{r['baseline_bytes_per_attempt']:.0f} bytes/attempt; the guide's sample {r['guide_bytes_per_attempt']:,}"))
