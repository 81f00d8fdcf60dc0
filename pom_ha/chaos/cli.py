"""`pom-ha chaos ...`: chaos testing commands."""

from __future__ import annotations

import click

from pom_ha.chaos.simulate import simulate_command


@click.group("chaos")
def chaos_group() -> None:
    """Chaos testing: a deterministic simulation of the HA core (simulate)."""


chaos_group.add_command(simulate_command)
