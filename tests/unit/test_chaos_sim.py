"""The deterministic simulation of the HA core: replays exactly, finds each re-introduced bug within a
bounded number of schedules (and the seed it reports replays to the same violation), finds nothing on the
shipped code, and its judges fail on the histories they exist to reject."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pom_ha.chaos.sim import KNOWN_BUGS, SimConfig, run_schedule
from pom_ha.chaos.sim.world import World, drift_bound, recovery_bound_s
from pom_ha.chaos.simulate import quiet_logs, replay, schedule_seed, simulate
from pom_ha.cli import main
from pom_ha.ha.settings import HATimings

SEED = 20261207
#: each bug is found by this seed within this many schedules (measured: first at schedule 4 for safe_until,
#: 17 for the two fencing bugs; about 9 % and 0.5 % of schedules find them)
FIND_WITHIN = {"safe_until_debug_return": 200, "no_epoch_gate": 3000, "fence_ignores_epoch": 3000}
EXPECTED_KIND = {"safe_until_debug_return": "overlap:dial", "no_epoch_gate": "overlap:event",
                 "fence_ignores_epoch": "overlap:db"}


def test_clean_run_finds_no_violation() -> None:
    summary = simulate(400, SEED, workers=1)
    assert summary["schedules"] == 400
    assert summary["violations"] == 0, summary["failures"]
    assert summary["faults"] >= 400
    assert summary["recovery_s"]["n"] > 0
    assert summary["recovery_s"]["max"] <= summary["recovery_bound_s"]


def test_schedule_replays_exactly() -> None:
    with quiet_logs():
        a = run_schedule(schedule_seed(SEED, 3), trace=True).to_json()
        b = run_schedule(schedule_seed(SEED, 3), trace=True).to_json()
        c = run_schedule(schedule_seed(SEED, 4), trace=True).to_json()
    assert a == b
    assert a["trace"] and any(" inject " in line for line in a["trace"])
    assert a["trace"] != c["trace"]


def test_result_does_not_depend_on_worker_count() -> None:
    one = simulate(240, 99, workers=1, chunk=40)
    two = simulate(240, 99, workers=2, chunk=40)
    for key in ("schedules", "violations", "faults", "simulated_s", "recovery_s"):
        assert one[key] == two[key], key


@pytest.mark.parametrize("bug", sorted(KNOWN_BUGS))
def test_each_reintroduced_bug_is_found_and_its_seed_replays(bug: str) -> None:
    found = None
    with quiet_logs():
        for index in range(FIND_WITHIN[bug]):
            seed = schedule_seed(SEED, index)
            result = run_schedule(seed, bugs=frozenset({bug}))
            if result.violations:
                found = (index, seed, result)
                break
        assert found is not None, f"{bug} not found within {FIND_WITHIN[bug]} schedules"
        index, seed, result = found
        assert result.violations[0].kind == EXPECTED_KIND[bug]
        # the reported seed replays to the same violation, with a trace ending at it
        again = replay(seed, [bug])
        assert again["violations"][0] == result.violations[0].to_json()
        assert again["trace"][-1].split(" VIOLATION ", 1)[1].startswith(EXPECTED_KIND[bug])
        assert any(" inject " in line for line in again["trace"])
        # and the same schedule on the shipped code is clean: the bug, not the schedule, is at fault
        assert run_schedule(seed).violations == []


def test_unknown_bug_switch_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown bug switch"):
        simulate(1, 1, workers=1, bugs=["no_such_bug"])


def _world() -> World:
    return World(1, SimConfig(), frozenset(), tracing=True)


def test_overlap_judge_fails_on_an_older_epoch_after_a_newer_one() -> None:
    world = _world()
    sink = world.sinks["dial"]
    a, b = world.nodes[0], world.nodes[1]
    sink.accept(1, a)
    sink.accept(2, b)
    sink.accept(2, b)
    assert world.violations == []
    world.clock.advance(0.1)
    sink.accept(1, a)
    assert [v.kind for v in world.violations] == ["overlap:dial"]
    assert "epoch 1 (node 1)" in world.violations[0].detail and "epoch 2 (node 2)" in world.violations[0].detail


def test_liveness_judge_fails_when_no_master_comes_back() -> None:
    world = _world()
    with quiet_logs():
        for node in world.nodes:
            node.crash()  # and never restarted
        world.heal_at = world.clock.now_s
        world.run_until_master()
    assert [v.kind for v in world.violations] == ["no_master"]
    assert world.clock.now_s - world.heal_at >= world.bound


def test_bounds_follow_the_timings() -> None:
    t = HATimings()
    # the tightest margin is the heartbeat one: (1.0 - 0.75) / (1.0 + 0.75) = 1/7, halved
    assert drift_bound(t) == pytest.approx(1 / 14)
    assert recovery_bound_s(t, 0.0) == pytest.approx(5.0 + 0.4 + 2.0 + 0.1)
    # one interval of margin out of ten misses is tighter: (1.0 - 0.9) / (1.0 + 0.9), halved
    assert drift_bound(HATimings(heartbeat_interval_ms=100, heartbeat_miss_limit=10)) == pytest.approx(0.1 / 1.9 / 2)


def test_cli_json_last_line_and_failure_report() -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["chaos", "simulate", "--schedules", "30", "--seed", "5", "--workers", "1", "--json"])
    assert ok.exit_code == 0, ok.output
    last = json.loads(ok.output.strip().splitlines()[-1])
    assert last["schedules"] == 30 and last["violations"] == 0 and last["seconds"] >= 0

    bad = runner.invoke(main, ["chaos", "simulate", "--schedules", "60", "--seed", str(SEED), "--workers", "1",
                               "--bug", "safe_until_debug_return", "--json"])
    assert bad.exit_code == 1
    assert "replay: pom-ha chaos simulate --replay" in bad.output
    assert "VIOLATION overlap:dial" in bad.output
    assert "error: " in bad.stderr
    summary = json.loads(bad.stdout.strip().splitlines()[-1])
    assert summary["violations"] > 0
    first = summary["failures"][0]
    again = runner.invoke(main, ["chaos", "simulate", "--replay", str(first["schedule_seed"]),
                                 "--bug", "safe_until_debug_return", "--json"])
    assert again.exit_code == 1
    assert json.loads(again.stdout.strip().splitlines()[-1])["violation_list"][0] == first["violations"][0]

    usage = runner.invoke(main, ["chaos", "simulate", "--schedules", "0"])
    assert usage.exit_code == 2
