"""A seeded chaos campaign on the test stack with every pom-ha daemon: 25 random faults of every kind (kills,
pauses, partitions, broker/node kills, a whole server, PostgreSQL) while the run's campaigns dial, then the
independent checker. Also: the runner refuses a lab that is not running, and SIGTERM heals what was injected."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pom_ha.chaos.faults import ProcessLab, proc_state
from pom_ha.chaos.runner import Runner, RunOptions, RunRefused, render_summary
from pom_ha.infra.process import ProcessRecord, records, stop_process
from pom_ha.infra.stack import Stack
from pom_ha.lab.faults import CHAIN, Firewall
from pom_ha.lab.platform import start_platform, wait_platform

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("POM_CHAOS_SEED", "12"))


@pytest.fixture(scope="module")
async def platform(stack: Stack, topology_file: Path) -> AsyncIterator[list[ProcessRecord]]:
    recs = start_platform(stack.topo, topology_file, echo=lambda _m: None)
    try:
        await wait_platform(stack.topo, timeout_s=180)
        yield recs
    finally:
        run_dir = stack.topo.lab_dir() / "run"
        live = [r for r in records(run_dir) if r.name.split("-pom")[0] in {
            "cache-service", "media-simulator", "rule-engine", "campaign-director", "campaign-manager",
            "agent-manager", "event-aggregator", "rest-api"} or r.name.startswith("desktop-simulator")]
        await asyncio.gather(*(asyncio.to_thread(stop_process, r, run_dir) for r in live if r.alive()))


async def test_runner_refuses_a_lab_whose_daemons_are_not_running(stack: Stack, topology_file: Path) -> None:
    # before the platform fixture started anything: servers are up, no pom-ha daemon runs
    if any(r.name.startswith("rule-engine") and r.alive() for r in records(stack.topo.lab_dir() / "run")):
        pytest.skip("the platform already runs in this session")
    runner = Runner(ProcessLab(stack.topo, topology_file), RunOptions(faults=1, history=Path("/nonexistent/h")))
    with pytest.raises(RunRefused, match="lab is not running"):
        await runner.run()
    assert not await asyncio.to_thread(os.path.exists, "/nonexistent/h")


@pytest.mark.timeout(1200)
async def test_seeded_campaign_of_25_faults_has_no_violation(
    stack: Stack, topology_file: Path, platform: list[ProcessRecord], tmp_path: Path
) -> None:
    history = tmp_path / "history.jsonl"
    lines: list[str] = []
    # a whole-server kill restarts four JVMs: minutes on a loaded machine; the scenarios kill whole servers'
    # daemons and `pom-ha chaos run` draws it (docs/benchmarks.md)
    kinds = ("daemon-kill", "master-pause", "partition", "infra-kill", "postgres-restart")
    opts = RunOptions(faults=25, seed=SEED, concurrency=2, history=history, contacts=120, calls_per_second=2.0,
                      agents=5, recovery_timeout_s=90, settle_timeout_s=240, kinds=kinds)
    t0 = time.monotonic()

    def echo(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    result = await Runner(ProcessLab(stack.topo, topology_file), opts, echo=echo).run()
    print(render_summary(result))
    for v in result.violations:
        print(v.render())
    summary = result.summary()
    print(json.dumps(summary), f"({time.monotonic() - t0:.0f} s)")
    assert summary["faults"] == 25
    assert result.leftovers == [], result.leftovers
    assert result.checked and result.campaigns_ended, result.check_error
    assert result.unrecovered == 0, [ln for ln in lines if "NOT recovered" in ln]
    assert summary["violations"] == 0, summary["violations_by_kind"]
    drawn = {r.fault.kind for r in result.records}
    assert len(drawn) >= 4, drawn
    # the history is complete, judged again by the CLI checker (its own Kafka consumer) with the same verdict
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "pom_ha.cli", "chaos", "check", str(history), "--topology",
                         str(topology_file), "--json"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    verdict = json.loads(out.stdout.strip().splitlines()[-1])
    assert verdict["faults"] == 25 and verdict["violations"] == 0 and verdict["seed"] == SEED


async def test_postgres_restarts_are_survived(stack: Stack, topology_file: Path, platform: list[ProcessRecord],
                                             tmp_path: Path) -> None:
    """PostgreSQL killed and started twice (each alone: the runner drains other faults first); every role
    has a master again and nothing is left behind. Crashed daemons are restarted and reported, not failed."""
    lines: list[str] = []
    opts = RunOptions(faults=2, seed=SEED, kinds=("postgres-restart",), history=tmp_path / "pg.jsonl", contacts=0,
                      recovery_timeout_s=120, check=False)
    result = await Runner(ProcessLab(stack.topo, topology_file), opts, echo=lines.append).run()
    print("\n".join(lines))
    assert [r.fault.kind for r in result.records] == ["postgres-restart"] * 2
    assert result.unrecovered == 0 and result.leftovers == [], lines
    assert all(r.error is None or "whole" in r.error for r in result.records), [r.error for r in result.records]


async def test_sigterm_heals_every_injected_fault(stack: Stack, topology_file: Path,
                                                  platform: list[ProcessRecord], tmp_path: Path) -> None:
    history = tmp_path / "interrupted.jsonl"
    proc = await asyncio.to_thread(
        subprocess.Popen, [sys.executable, "-m", "pom_ha.cli", "chaos", "run", "--faults", "50", "--seed", "3",
                           "--concurrency", "2", "--kinds", "partition,master-pause", "--contacts", "0",
                           "--history", str(history), "--recovery-timeout", "60", "--topology", str(topology_file),
                           "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "POM_FIREWALL_CHAIN": CHAIN})
    try:
        deadline = time.monotonic() + 90
        firewall = Firewall(CHAIN)
        run_dir = stack.topo.lab_dir() / "run"
        while time.monotonic() < deadline:  # wait until something is injected right now
            paused = [r for r in records(run_dir) if r.alive() and proc_state(r.pid) == "T"]
            if firewall.rules() or paused:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no fault injected within 90 s")
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(proc.communicate, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["interrupted"] and summary["leftovers"] == []
    assert Firewall(CHAIN).rules() == []
    assert [r.name for r in records(stack.topo.lab_dir() / "run") if r.alive() and proc_state(r.pid) == "T"] == []
    text = history.read_text().splitlines()
    assert json.loads(text[-1])["type"] == "end" and json.loads(text[-1])["interrupted"] is True
