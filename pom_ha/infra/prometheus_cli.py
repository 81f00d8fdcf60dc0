"""``pom-ha prometheus targets | config``: the scrape targets of a topology and a ready config folder."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pom_ha.cli_support import topology_option, topology_or_exit


@click.group("prometheus")
def prometheus_group() -> None:
    """Prometheus for the cluster: deploy/prometheus/ (scrape config, alerting rules) and the targets."""


@prometheus_group.command("targets")
@topology_option
def targets(topology_path: str | None) -> None:
    """Print the topology's scrape targets as Prometheus file_sd JSON (targets/pom-ha.json)."""
    from pom_ha.infra.prometheus import scrape_targets

    click.echo(json.dumps(scrape_targets(topology_or_exit(topology_path)), indent=1))


@prometheus_group.command("config")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@topology_option
def config(folder: Path, topology_path: str | None) -> None:
    """Write FOLDER/prometheus.yml, rules.yml and targets/pom-ha.json for the topology; then run
    `prometheus --config.file=FOLDER/prometheus.yml`."""
    from pom_ha.infra.prometheus import scrape_targets, write_config

    path = write_config(folder, scrape_targets(topology_or_exit(topology_path)))
    click.echo(f"wrote {path} (rules.yml, targets/pom-ha.json beside it)")
