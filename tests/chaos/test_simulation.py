"""CI's run of the deterministic HA-core simulation: 100,000 random fault schedules, none may violate an
invariant (no overlapping epochs' side effects on any sink, a master within the bound after every heal).

No servers: the real electors run against the fake store on a virtual clock (pom_ha.chaos.sim). The
seed is fixed, so a failure here replays with the command it prints.
"""

from __future__ import annotations

import time

import pytest

from pom_ha.chaos.simulate import simulate

SCHEDULES = 100_000
SEED = 20261207


# about 70 s on two idle cores; the generous timeout is for a machine shared with other test sessions
@pytest.mark.timeout(1800)
def test_100k_schedules_without_a_violation() -> None:
    started = time.monotonic()
    summary = simulate(SCHEDULES, SEED, workers=2)
    elapsed = time.monotonic() - started
    print(f"simulate: {summary['schedules']} schedules, {summary['faults']} faults, "
          f"{summary['simulated_s'] / 3600:.1f} h simulated in {elapsed:.1f} s ({summary['schedules_per_s']}/s)")
    assert summary["schedules"] == SCHEDULES
    replays = [f"pom-ha chaos simulate --replay {f['schedule_seed']}: {f['violations'][0]}"
               for f in summary["failures"]]
    assert summary["violations"] == 0, "\n".join(replays)
    assert summary["faults"] >= SCHEDULES
    assert summary["recovery_s"]["max"] <= summary["recovery_bound_s"]
