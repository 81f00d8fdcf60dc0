"""The chaos history checker fails on every kind of violation it claims to find, passes a clean history, and
refuses truncated or foreign history files; the survivability plan never allows an unsurvivable combination."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pom_ha.chaos.checker import Evidence, Write, by_kind, judge, read_call_logs
from pom_ha.chaos.faults import (
    DaemonKill,
    Fault,
    InfraKill,
    LabControl,
    MasterPause,
    Partition,
    PartitionScope,
    PostgresRestart,
    ServerKill,
    fault_from_json,
)
from pom_ha.chaos.history import HistoryError, HistoryWriter, read_history, same_lab
from pom_ha.chaos.plan import draw, fits, refuse_impossible
from pom_ha.config import ServerSection, Topology

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def clean() -> Evidence:
    """A run where job 1 moved from epoch 1 to epoch 2 cleanly and everything ended."""
    ev = Evidence()
    ev.writes = [Write("attempts", "job:1", 1, at(0), {}), Write("attempts", "job:1", 1, at(5), {}),
                 Write("attempts", "job:1", 2, at(6), {}), Write("media-call-log", "job:1", 2, at(7), {}),
                 Write("agent_failover_log", "agent_manager/Default", 4, at(3), {})]
    ev.calls = [{"job": "1", "contact": "c1", "attempt_no": 1, "epoch": 1, "log": "pom1.jsonl:1"},
                {"job": "1", "contact": "c1", "attempt_no": 2, "epoch": 2, "log": "pom2.jsonl:1"}]
    ev.jobs = [{"id": 1, "name": "chaos", "state": "Completed"}]
    ev.completed = [{"job_id": 1, "contact_id": "c1", "attempt_no": 1},
                    {"job_id": 1, "contact_id": "c1", "attempt_no": 2}]
    ev.events = [
        {"event_type": "ATTEMPT", "phase": "RESULT", "job_id": 1, "contact_id": "c1", "attempt_no": 1, "event_id": "a"},
        {"event_type": "ATTEMPT", "phase": "RESULT", "job_id": 1, "contact_id": "c1", "attempt_no": 2, "event_id": "b"},
        {"event_type": "ATTEMPT", "phase": "RESULT", "job_id": 1, "contact_id": "c1", "attempt_no": 2, "event_id": "b"},
        {"event_type": "JOB", "job_id": 1, "state": "Completed", "event_id": "j"},
    ]
    ev.failover_rows = [{"zone": "Default", "agent_id": "a1", "epoch": 4, "before_state": "Talking",
                         "after_state": "Wrapup", "table_column": "KEPT_UNNAILED"}]
    ev.agents = [{"zone": "Default", "agent_id": "a1", "call_state": "Idle"}]
    return ev


def kinds(ev: Evidence) -> dict[str, int]:
    return {k: n for k, n in by_kind(judge(ev)).items() if n}


def test_a_clean_history_passes() -> None:
    assert judge(clean()) == []  # a redelivered record (same event id) is one event, not a duplicate


def test_split_brain_overlapping_epochs_is_found_with_the_rows_that_prove_it() -> None:
    ev = clean()
    ev.writes.append(Write("media-call-log", "job:1", 1, at(6.5), {"log": "pom1.jsonl:9"}))  # old epoch after new
    found = judge(ev)
    assert [v.kind for v in found] == ["split_brain"]
    assert "epoch 1" in found[0].message and "epoch 2" in found[0].message
    assert {r["source"] for r in found[0].rows} == {"attempts", "media-call-log"}


def test_split_brain_is_per_role() -> None:
    ev = clean()
    ev.writes.append(Write("attempts", "job:2", 1, at(6.5), {}))  # another job's epoch 1: no overlap
    assert judge(ev) == []
    ev.writes += [Write("cd_job_trends", "campaign_director/", 3, at(10), {}),
                  Write("cd_job_trends", "campaign_director/", 2, at(11), {})]
    assert kinds(ev) == {"split_brain": 1}


def test_a_dial_placed_twice_is_found() -> None:
    ev = clean()
    ev.calls.append({"job": "1", "contact": "c1", "attempt_no": 1, "epoch": 2, "log": "pom3.jsonl:4"})
    found = judge(ev)
    assert kinds(ev) == {"duplicate_dial": 1}
    assert [r["log"] for r in found[0].rows] == ["pom1.jsonl:1", "pom3.jsonl:4"]


def test_stuck_contacts_and_attempts_are_found() -> None:
    ev = clean()
    ev.open_contacts = [{"job_id": 1, "contact_id": "c9", "state": "dialing"}]
    ev.open_attempts = [{"job_id": 1, "contact_id": "c9", "attempt_no": 1}]
    assert kinds(ev) == {"stuck_contact": 2}


def test_a_missing_result_event_and_a_missing_job_end_event_are_found() -> None:
    ev = clean()
    ev.events = [e for e in ev.events if not (e.get("attempt_no") == 1 or e["event_type"] == "JOB")]
    found = judge(ev)
    assert kinds(ev) == {"missing_event": 2}
    assert any("1:c1:1" in v.message for v in found) and any("JOB event" in v.message for v in found)


def test_two_result_events_of_one_attempt_are_found() -> None:
    ev = clean()
    ev.events.append({"event_type": "ATTEMPT", "phase": "RESULT", "job_id": 1, "contact_id": "c1", "attempt_no": 1,
                      "event_id": "a2"})
    assert kinds(ev) == {"duplicate_event": 1}


def test_a_campaign_that_did_not_end_is_found() -> None:
    ev = clean()
    ev.jobs.append({"id": 2, "name": "other", "state": "Running"})
    assert kinds(ev) == {"campaign_not_ended": 1}


def test_an_agent_state_table_9_does_not_allow_is_found() -> None:
    ev = clean()
    ev.failover_rows.append({"zone": "Default", "agent_id": "a2", "epoch": 4, "before_state": "Idle",
                             "after_state": "Talking", "table_column": "KEPT_NAILED"})
    ev.agents.append({"zone": "Default", "agent_id": "a3", "call_state": "Dancing"})
    found = judge(ev)
    assert kinds(ev) == {"agent_state": 2}
    assert "Table 9 allows ['Idle']" in found[0].message
    # the desktop check logged an agent out (DESKTOP_ERROR): Idle is where a logged-out agent ends
    forced = {"zone": "Default", "agent_id": "a4", "epoch": 4, "before_state": "Wrapup", "after_state": "Idle",
              "table_column": "KEPT_NAILED", "force_logout": True}
    assert judge(Evidence(failover_rows=[forced])) == []
    assert kinds(Evidence(failover_rows=[{**forced, "force_logout": False}])) == {"agent_state": 1}


def test_every_violation_kind_is_tested_above() -> None:
    assert set(by_kind([])) == {"split_brain", "duplicate_dial", "stuck_contact", "missing_event", "duplicate_event",
                                "campaign_not_ended", "agent_state"}


def test_call_logs_skip_a_last_line_cut_by_a_kill_but_refuse_garbage_inside(tmp_path: Path) -> None:
    (tmp_path / "pom1.jsonl").write_text('{"job": "1", "contact": "c", "attempt_no": 1}\n{"job": "1", "con')
    assert [c["log"] for c in read_call_logs(tmp_path)] == ["pom1.jsonl:1"]
    (tmp_path / "pom2.jsonl").write_text('garbage\n{"job": "1", "contact": "c", "attempt_no": 1}\n')
    with pytest.raises(ValueError, match=r"pom2\.jsonl:1"):
        read_call_logs(tmp_path)


# ---- history files --------------------------------------------------------------------------------------------
LAB = {"postgres": "127.0.24.1:5432/pomha", "servers": ["pom1", "pom2"], "first_ha_event": "1@x"}


def write_history(path: Path, faults: int = 2) -> Path:
    w = HistoryWriter(path)
    w.open({"lab": LAB, "seed": 3, "started_at": T0.isoformat(), "jobs": [1]})
    for _ in range(faults):
        w.fault({"kind": "daemon-kill", "target": "campaign-manager@pom1"})
    w.close({"ended_at": at(60).isoformat(), "interrupted": False, "leftovers": []})
    return path


def test_a_complete_history_reads_back(tmp_path: Path) -> None:
    h = read_history(write_history(tmp_path / "h.jsonl"))
    assert (len(h.faults), h.jobs, h.started_at, h.ended_at) == (2, [1], T0, at(60))


@pytest.mark.parametrize("cut", ["no_end", "half_line", "lost_fault", "empty", "not_history"])
def test_truncated_or_foreign_files_are_clear_errors(tmp_path: Path, cut: str) -> None:
    path = write_history(tmp_path / "h.jsonl")
    lines = path.read_text().splitlines()
    text = {"no_end": "\n".join(lines[:-1]), "half_line": "\n".join(lines[:-1]) + "\n" + lines[-1][:20],
            "lost_fault": "\n".join([lines[0], lines[2], lines[3]]), "empty": "",
            "not_history": json.dumps({"type": "something", "x": 1})}[cut]
    path.write_text(text)
    with pytest.raises(HistoryError, match=r"truncated|not a chaos history|empty|header|numbered|counts"):
        read_history(path)


def test_a_history_of_another_lab_is_told_apart() -> None:
    assert same_lab(LAB, dict(LAB)) == []
    diff = same_lab(LAB, {**LAB, "first_ha_event": "7@y"})
    assert diff and "first_ha_event" in diff[0]


def test_a_missing_history_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(HistoryError, match="no such history file"):
        read_history(tmp_path / "nope.jsonl")


# ---- the survivability plan on a fake lab (pure logic) -----------------------------------------------------------
class FakeLab(LabControl):
    backend = "fake"

    def __init__(self, n: int = 3, activemq: int = 2, runs: list[list[str]] | None = None) -> None:
        runs = runs or [["zookeeper", "kafka", "ignite", *(["activemq"] if i < activemq else [])] for i in range(n)]
        super().__init__(Topology(servers=[ServerSection(name=f"pom{i + 1}", address=f"127.0.9.{i + 1}",
                                                         runs=r) for i, r in enumerate(runs)]))

    def daemons_on(self, server: str) -> list[str]:
        return ["campaign-director", "agent-manager", "campaign-manager", "rule-engine"]

    def daemon_alive(self, daemon: str, server: str) -> bool:
        return True

    def infra_on(self, kind: str) -> list[str]:
        return [s.name for s in self.topo.servers_running(kind)]  # type: ignore[arg-type]

    def kill_daemon(self, daemon: str, server: str) -> None: ...
    async def start_daemon(self, daemon: str, server: str) -> None: ...
    def pause_daemon(self, daemon: str, server: str) -> None: ...
    def resume_daemon(self, daemon: str, server: str) -> None: ...
    def kill_infra(self, kind: str, server: str) -> None: ...
    async def start_infra(self, kind: str, server: str) -> None: ...
    def cut(self, server: str, scope: PartitionScope) -> None: ...
    def uncut(self, server: str, scope: PartitionScope) -> None: ...
    def stop_postgres(self) -> None: ...
    async def start_postgres(self) -> None: ...

    def leftovers(self) -> list[str]:
        return []


def test_the_plan_never_takes_a_zookeeper_majority_or_both_agent_managers() -> None:
    lab = FakeLab(3)
    assert fits(lab, [], ServerKill(server="pom1"))
    assert not fits(lab, [ServerKill(server="pom1")], InfraKill(infra="zookeeper", server="pom2"))
    assert not fits(lab, [InfraKill(infra="kafka", server="pom1")], Partition(server="pom2", scope="peers"))
    assert fits(lab, [DaemonKill(daemon="agent-manager", server="pom1")],
                MasterPause(daemon="agent-manager", server="pom2"))
    assert not fits(lab, [DaemonKill(daemon="agent-manager", server="pom1"),
                          MasterPause(daemon="agent-manager", server="pom2")],
                    DaemonKill(daemon="agent-manager", server="pom3"))
    assert not fits(lab, [DaemonKill(daemon="rule-engine", server="pom1")], PostgresRestart())
    assert not fits(lab, [PostgresRestart()], DaemonKill(daemon="rule-engine", server="pom1"))
    # one fault per server: heals never interleave
    assert not fits(lab, [DaemonKill(daemon="rule-engine", server="pom1")], MasterPause(daemon="agent-manager",
                                                                                          server="pom1"))


def test_random_draws_with_a_seed_repeat_and_always_fit() -> None:
    lab = FakeLab(3)
    kinds_ = ("daemon-kill", "master-pause", "partition", "infra-kill", "server-kill", "postgres-restart")
    masters = [("campaign_director", "pom1"), ("agent_manager", "pom2")]

    def run(seed: int) -> list[str]:
        rng, out = random.Random(seed), []
        active: list[Fault] = []
        for _ in range(200):
            f = draw(rng, lab, kinds_, active, masters)
            if f is None or len(active) == 2:
                active.pop(0)
                continue
            assert fits(lab, active, f)
            active.append(f)
            out.append(f.describe())
        return out

    assert run(5) == run(5) and run(5) != run(6)


def test_impossible_topologies_are_refused_before_anything() -> None:
    assert "one POM server" in refuse_impossible(FakeLab(1), ["daemon-kill"])[0]
    # one ZooKeeper node on pom1, the only ActiveMQ broker on pom2: losing either server loses one of them
    lab = FakeLab(runs=[["zookeeper"], ["activemq"]])
    reasons = refuse_impossible(lab, ["server-kill", "daemon-kill", "partition"])
    assert [r.split(":")[0] for r in reasons] == ["server-kill"]


def test_faults_round_trip_through_history_lines() -> None:
    for f in (DaemonKill(daemon="rule-engine", server="pom2"), MasterPause(daemon="agent-manager", server="pom1"),
              ServerKill(server="pom3"), Partition(server="pom1", scope="peers"),
              InfraKill(infra="kafka", server="pom2"), PostgresRestart()):
        assert fault_from_json(f.as_json()) == f
    with pytest.raises(ValueError, match="unknown fault kind"):
        fault_from_json({"kind": "meteor"})


def test_the_media_platform_logs_every_call_it_places_and_no_rejected_one() -> None:
    from pom_ha.media.protocol import Dial
    from pom_ha.media.simulator import MediaPlatform

    class NoTimer:
        def cancel(self) -> None: ...

    logged: list[dict[str, object]] = []
    platform = MediaPlatform(lambda _o, _out: True, capacity=1, schedule=lambda _d, _cb: NoTimer(),
                             call_log=logged.append)

    def dial(aid: str, epoch: int = 1) -> object:
        return platform.dial(Dial(attempt_id=aid, job="7", contact="c1", attempt_no=1, phone="+15550000001",
                                  epoch=epoch, scope="job/7"), owner="cm")

    dial("a1")
    dial("a1")  # duplicate: refused, not logged
    dial("a2")  # capacity: refused, not logged
    assert [(e["attempt_id"], e["job"], e["contact"], e["attempt_no"], e["epoch"]) for e in logged] == [
        ("a1", "7", "c1", 1, 1)]
    assert "phone" not in logged[0] and "+1555" not in json.dumps(logged)


def test_docker_backend_drives_the_docker_cli(tmp_path: Path) -> None:
    """The container backend's commands, through a stand-in ``docker`` that records its arguments."""
    import asyncio
    import stat

    from pom_ha.chaos.faults import DockerLab, FaultImpossible

    log = tmp_path / "calls"
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\n"
                    f'echo "$@" >> {log}\n'
                    'case "$1" in ps) case "$*" in *service=pom1-infra*|*service=pom1-rule-engine*) echo c-"$$";;'
                    " *service=postgres*) echo c-pg;; *status=paused*) ;; esac;;"
                    " inspect) echo running;; esac\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    lab = DockerLab(FakeLab(3).topo, "pomha", "pomha_lab", docker=str(fake))
    assert lab.daemons_on("pom1") == ["rule-engine"]

    async def go() -> None:
        f = DaemonKill(daemon="rule-engine", server="pom1")
        await f.inject(lab)
        await f.heal(lab)
        p = Partition(server="pom1", scope="both")
        await p.inject(lab)
        assert lab.leftovers() == ["network cut of pom1 (containers disconnected)"]
        await p.heal(lab)
        assert lab.leftovers() == []
        with pytest.raises(FaultImpossible):
            await InfraKill(infra="kafka", server="pom1").inject(lab)
        with pytest.raises(FaultImpossible):
            await Partition(server="pom1", scope="peers").inject(lab)

    asyncio.run(go())
    verbs = [line.split()[0] + (" " + line.split()[1] if line.startswith("network") else "")
             for line in log.read_text().splitlines() if not line.startswith(("ps", "inspect"))]
    assert verbs == ["kill", "start", "network disconnect", "network disconnect", "network connect",
                     "network connect"]
