"""Zone configuration: validation and the CLI's refusals (no database needed), and the AM's claim gate."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from pom_ha.config import load_topology
from pom_ha.zones.cli import ZoneConfigError, validate, zone_group
from services.agent_manager.zone_config import RESERVED_LOAD, AllocationSpread, Reservation


def test_validate_names_the_unknown_zone_or_server() -> None:
    topo = load_topology()
    validate(topo, "Zone1", "pom2")
    with pytest.raises(ZoneConfigError, match="unknown zone 'Nope'"):
        validate(topo, "Nope", "pom2")
    with pytest.raises(ZoneConfigError, match="unknown server 'pom9'"):
        validate(topo, "Zone1", "pom9")


def test_cli_refuses_before_writing() -> None:
    runner = CliRunner()
    res = runner.invoke(zone_group, ["allocate", "Nope", "--server", "pom2"])
    assert res.exit_code != 0 and "unknown zone 'Nope'" in res.output
    res = runner.invoke(zone_group, ["allocate", "Zone1", "--server", "pom2", "--apply"])
    assert res.exit_code == 1
    assert "logs out EVERY agent of zone Zone1" in res.output and "Nothing was written" in res.output


def _elector(scope: str, master: bool = False) -> Any:
    return SimpleNamespace(scope=scope, is_master=master)


def test_allocation_spread_keeps_a_handed_zone_for_the_allocated_server() -> None:
    reservations: dict[str, Reservation] = {}
    mine = AllocationSpread(3.0, "pom1", lambda: reservations)
    held, free = _elector("Default", master=True), _elector("Zone1")
    mine.join(held)
    mine.join(free)
    assert mine.load(free) == 1  # the ordinary ClaimSpread: one lease held
    reservations["Zone1"] = Reservation("pom2", time.monotonic() + 10, alive=True)
    assert mine.load(free) == RESERVED_LOAD  # handed to pom2: pom1 leaves it
    reservations["Zone1"] = Reservation("pom1", time.monotonic() + 10, alive=True)
    assert mine.load(free) == 0  # handed to pom1: claim at once, no spread wait
    reservations["Zone1"] = Reservation("pom2", time.monotonic() + 10, alive=False)
    assert mine.load(free) == 1  # the allocated AM is not alive: nobody skips the zone
    reservations["Zone1"] = Reservation("pom2", time.monotonic() - 1, alive=True)
    assert mine.load(free) == 1  # grace over
