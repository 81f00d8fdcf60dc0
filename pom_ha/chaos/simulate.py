"""`pom-ha chaos simulate`: many deterministic simulation schedules of the HA core (:mod:`pom_ha.chaos.sim`).

Schedule ``i`` of a run with seed ``S`` has its own seed ``schedule_seed(S, i)``; it depends on nothing
else (not on the number of workers, not on the other schedules), so a run's result is the same on any
machine and a failing schedule replays alone: ``pom-ha chaos simulate --replay <schedule seed>``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import click
import structlog

from pom_ha.chaos.sim import KNOWN_BUGS, SimConfig, check_bugs, run_schedule
from pom_ha.chaos.sim.world import drift_bound, recovery_bound_s

_MASK64 = (1 << 64) - 1
#: schedules per unit of work handed to a worker process
CHUNK = 2_000
#: failing schedules kept (lowest indexes) for the report
KEEP_FAILURES = 20


def schedule_seed(seed: int, index: int) -> int:
    """SplitMix64 of (seed, index): schedule ``index``'s own seed."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """The electors log every decision through structlog: silence them (but errors) while simulating."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
                        cache_logger_on_first_use=True)
    try:
        yield
    finally:
        structlog.configure(**saved)


def _run_chunk(seed: int, start: int, count: int, bugs: frozenset[str]) -> dict[str, Any]:
    config = SimConfig()
    faults = 0
    simulated = 0.0
    recoveries: list[float] = []
    failures: list[dict[str, Any]] = []
    failing = 0
    kinds: Counter[str] = Counter()
    for index in range(start, start + count):
        s = schedule_seed(seed, index)
        result = run_schedule(s, config=config, bugs=bugs)
        faults += result.faults
        simulated += result.simulated_s
        recoveries.extend(result.recoveries_s[1:])  # the first is the initial election, not a recovery
        if result.violations:
            failing += 1
            kinds.update(v.kind for v in result.violations)
            if len(failures) < KEEP_FAILURES:
                failures.append({"schedule": index, "schedule_seed": s,
                                 "violations": [v.to_json() for v in result.violations[:3]]})
    return {"count": count, "faults": faults, "simulated_s": simulated, "recoveries": recoveries,
            "failures": failures, "failing": failing, "kinds": dict(kinds)}


def _chunk_in_worker(args: tuple[int, int, int, frozenset[str]]) -> dict[str, Any]:
    return _run_chunk(*args)


def _init_worker() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
                        cache_logger_on_first_use=True)


def _percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted ``values``."""
    if not values:
        return None
    rank = max(1, math.ceil(q / 100 * len(values)))
    return values[min(len(values), rank) - 1]


def simulate(schedules: int, seed: int, *, workers: int | None = None, bugs: Sequence[str] = (),
             stop_on_failure: bool = False, chunk: int = CHUNK) -> dict[str, Any]:
    """Run ``schedules`` schedules; returns the summary (``violations`` counts every violation found).

    ``stop_on_failure`` stops after the first chunk that holds a failing schedule (chunks are judged in
    index order, so the failures reported are still the lowest-indexed ones).
    """
    if schedules < 1:
        raise ValueError("schedules must be at least 1")
    bug_set = check_bugs(tuple(bugs))
    workers = max(1, min(workers or min(2, os.cpu_count() or 1), (schedules + chunk - 1) // chunk))
    chunks = [(seed, start, min(chunk, schedules - start), bug_set) for start in range(0, schedules, chunk)]
    started = time.perf_counter()
    parts: list[dict[str, Any]] = []
    if workers == 1:
        with quiet_logs():
            for args in chunks:
                parts.append(_run_chunk(*args))
                if stop_on_failure and parts[-1]["failing"]:
                    break
    else:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as pool:
            for part in pool.map(_chunk_in_worker, chunks):
                parts.append(part)
                if stop_on_failure and part["failing"]:
                    pool.shutdown(wait=True, cancel_futures=True)
                    break
    seconds = time.perf_counter() - started
    done = sum(p["count"] for p in parts)
    kinds: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    recoveries: list[float] = []
    for p in parts:
        kinds.update(p["kinds"])
        failures.extend(p["failures"])
        recoveries.extend(p["recoveries"])
    recoveries.sort()
    timings = SimConfig().timings
    drift = drift_bound(timings)
    return {
        "schedules": done, "seed": seed, "violations": sum(kinds.values()),
        "failing_schedules": sum(p["failing"] for p in parts), "violations_by_kind": dict(sorted(kinds.items())),
        "failures": failures[:KEEP_FAILURES], "faults": sum(p["faults"] for p in parts),
        "simulated_s": round(sum(p["simulated_s"] for p in parts), 1), "seconds": round(seconds, 2),
        "schedules_per_s": round(done / seconds, 1) if seconds > 0 else None, "workers": workers,
        "bugs": sorted(bug_set), "drift_bound": round(drift, 5),
        "recovery_bound_s": round(recovery_bound_s(timings, drift), 3),
        "recovery_s": {
            "n": len(recoveries),
            "p50": _round(_percentile(recoveries, 50)), "p99": _round(_percentile(recoveries, 99)),
            "max": _round(recoveries[-1] if recoveries else None),
        },
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def replay(schedule_seed_: int, bugs: Sequence[str] = ()) -> dict[str, Any]:
    """Run one schedule again with its trace (up to its first violation)."""
    started = time.perf_counter()
    with quiet_logs():
        result = run_schedule(schedule_seed_, bugs=check_bugs(tuple(bugs)), trace=True)
    out = result.to_json()
    trace: list[str] = out["trace"]
    cut = next((i for i, line in enumerate(trace) if " VIOLATION " in line), None)
    out["trace"] = trace if cut is None else trace[: cut + 1]
    out["seconds"] = round(time.perf_counter() - started, 4)
    return out


def _replay_command(seed: int, bugs: Sequence[str]) -> str:
    return "pom-ha chaos simulate --replay " + str(seed) + "".join(f" --bug {b}" for b in bugs)


@click.command("simulate")
@click.option("--schedules", type=click.IntRange(1, 100_000_000), default=100_000, show_default=True,
              help="number of random fault schedules")
@click.option("--seed", type=click.IntRange(0, _MASK64), default=None,
              help="run seed (default: a random one, printed); the same seed gives the same result")
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="worker processes (default 2)")
@click.option("--replay", "replay_seed", type=click.IntRange(0, _MASK64), default=None, metavar="SCHEDULE_SEED",
              help="run one schedule (a failing one's seed) with its trace, instead of a run")
@click.option("--bug", "bugs", multiple=True, type=click.Choice(sorted(KNOWN_BUGS)), hidden=True,
              help="test only: re-introduce a known bug to see the simulation find it")
@click.option("--stop-on-failure", is_flag=True, help="stop at the first chunk of schedules holding a failure")
@click.option("--json", "as_json", is_flag=True, help="last line: one JSON object")
def simulate_command(schedules: int, seed: int | None, workers: int | None, replay_seed: int | None,
                     bugs: tuple[str, ...], stop_on_failure: bool, as_json: bool) -> None:
    """Deterministic simulation of the HA core: real electors, the fake store, a virtual clock and a seeded
    scheduler through random crash / pause / partition / delay / loss schedules with clock drift.
    Exit 1 when a schedule violates an invariant (overlapping epochs' side effects, no master in time)."""
    if replay_seed is not None:
        _replay(replay_seed, bugs, as_json)
        return
    if seed is None:
        seed = random.SystemRandom().getrandbits(32)
    click.echo(f"seed {seed}: {schedules} schedules" + (f", bugs {', '.join(bugs)}" if bugs else ""))
    summary = simulate(schedules, seed, workers=workers, bugs=bugs, stop_on_failure=stop_on_failure)
    rec = summary["recovery_s"]
    click.echo(
        f"schedules {summary['schedules']}, faults {summary['faults']}, "
        f"simulated {summary['simulated_s'] / 3600:.1f} h, "
        f"violations {summary['violations']} in {summary['failing_schedules']} schedules, "
        f"{summary['seconds']} s ({summary['schedules_per_s']} schedules/s, {summary['workers']} workers)"
    )
    click.echo(f"master again after a heal: p50 {rec['p50']} s, p99 {rec['p99']} s, max {rec['max']} s "
               f"(bound {summary['recovery_bound_s']} s, clock drift bound ±{summary['drift_bound']:.2%})")
    for failure in summary["failures"]:
        first = failure["violations"][0]
        click.echo(f"FAIL schedule {failure['schedule']} (schedule seed {failure['schedule_seed']}): "
                   f"{first['kind']} at {first['at_s']:.3f} s: {first['detail']}")
        click.echo(f"  replay: {_replay_command(failure['schedule_seed'], bugs)}")
    if summary["failures"]:
        first_seed = summary["failures"][0]["schedule_seed"]
        click.echo(f"trace of schedule seed {first_seed} (up to its first violation):")
        for line in replay(first_seed, bugs)["trace"]:
            click.echo("  " + line)
    if as_json:
        click.echo(json.dumps(summary))
    if summary["violations"]:
        click.echo(f"error: {summary['violations']} invariant violations", err=True)
        sys.exit(1)


def _replay(seed: int, bugs: Sequence[str], as_json: bool) -> None:
    result = replay(seed, bugs)
    for line in result["trace"]:
        click.echo(line)
    for v in result["violations"]:
        click.echo(f"VIOLATION {v['kind']} at {v['at_s']:.3f} s: {v['detail']}")
    click.echo(f"schedule seed {seed}: {len(result['violations'])} violations, {result['faults']} faults, "
               f"{result['simulated_s']} s simulated")
    if as_json:
        result = {k: v for k, v in result.items() if k != "trace"}
        click.echo(json.dumps({**result, "schedules": 1, "violations": len(result["violations"]),
                               "violation_list": result["violations"]}))
    if result["violations"]:
        click.echo(f"error: {len(result['violations'])} invariant violations", err=True)
        sys.exit(1)
