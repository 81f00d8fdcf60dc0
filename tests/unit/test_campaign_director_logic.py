"""Pure logic of the Campaign Director: schedule firing, least-busy allocation, finish verdicts, settings,
and the export file's resume point."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pom_ha.campaign.allocation import CMCandidate, allocate
from pom_ha.campaign.schedule import plan_firing
from pom_ha.config import ConfigError
from pom_ha.domain.strategy import FinishCriteria
from services.campaign_director.exporter import HEADER, _csv_bytes, _open_for_export
from services.campaign_director.jobs import finish_verdict
from services.campaign_director.settings import CDSettings, load_settings

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


# ---- schedules --------------------------------------------------------------------------------------------
def test_a_schedule_not_yet_due_does_not_fire() -> None:
    assert plan_firing(T0 + timedelta(seconds=1), T0) is None


def test_on_time_within_the_tolerance() -> None:
    firing = plan_firing(T0, T0 + timedelta(milliseconds=300))
    assert firing is not None and not firing.late and firing.next_due is None
    assert firing.describe("start") == "start fired on time"


def test_a_missed_one_shot_fires_once_late_and_says_so() -> None:
    firing = plan_firing(T0, T0 + timedelta(seconds=95))
    assert firing is not None and firing.late and firing.late_ms == 95_000 and firing.next_due is None
    text = firing.describe("start of campaign 'x'")
    assert "fired late by 95.0 s" in text and "no Common CD master was up" in text and "firing once now" in text


def test_a_recurring_schedule_collapses_missed_occurrences_into_one_firing() -> None:
    firing = plan_firing(T0, T0 + timedelta(minutes=35), interval=timedelta(minutes=10))
    assert firing is not None and firing.late
    assert firing.next_due == T0 + timedelta(minutes=40)  # the first occurrence after now
    assert firing.missed_occurrences == 3
    assert "3 later occurrence(s) also missed, not replayed" in firing.describe("purge")


def test_a_recurring_schedule_exactly_on_its_time_moves_one_interval() -> None:
    firing = plan_firing(T0, T0, interval=timedelta(hours=1))
    assert firing is not None and firing.next_due == T0 + timedelta(hours=1) and firing.missed_occurrences == 0


def test_schedule_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="positive interval"):
        plan_firing(T0, T0, interval=timedelta(0))
    with pytest.raises(ValueError, match="timezone-aware"):
        plan_firing(datetime(2026, 1, 1), T0)


# ---- allocation -------------------------------------------------------------------------------------------
def test_jobs_go_to_the_least_busy_cm_counting_this_round() -> None:
    a = CMCandidate("pom1", "i1", load=2, assigned=2)
    b = CMCandidate("pom2", "i2", load=0, assigned=0)
    c = CMCandidate("pom3", "i3", load=1, assigned=3)  # published load lags: its assignments count
    plan = allocate([10, 11, 12, 13], [a, b, c])
    assert [(job, cm.server) for job, cm in plan] == [(10, "pom2"), (11, "pom2"), (12, "pom1"), (13, "pom2")]


def test_allocation_ties_go_to_the_server_name_and_no_cm_means_no_plan() -> None:
    plan = allocate([1], [CMCandidate("pom3", "x", 0, 0), CMCandidate("pom1", "y", 0, 0)])
    assert plan[0][1].server == "pom1"
    assert allocate([1, 2], []) == []


# ---- finish criteria ----------------------------------------------------------------------------------------
def test_all_contacts_done_is_judged_only_once_the_job_was_filtered() -> None:
    criteria = FinishCriteria(all_contacts_done=True)
    assert finish_verdict(criteria, "Queued", 0, 0, {}, T0) is None
    assert finish_verdict(criteria, "Filter in Progress", 0, 0, {}, T0) is None
    assert finish_verdict(criteria, "Running", 5, 4, {}, T0) is None
    assert "all contacts done" in (finish_verdict(criteria, "Running", 5, 5, {}, T0) or "")
    assert finish_verdict(criteria, "Paused", 5, 5, {}, T0) is not None


def test_end_time_and_goals_apply_in_any_active_state() -> None:
    ended = FinishCriteria(all_contacts_done=True, end_time=T0)
    assert "end time" in (finish_verdict(ended, "Queued", 0, 0, {}, T0) or "")
    assert finish_verdict(ended, "Queued", 0, 0, {}, T0 - timedelta(seconds=1)) is None
    goals = FinishCriteria(all_contacts_done=False, code_goals={"ANSWER_HUMAN": 3})
    assert finish_verdict(goals, "Running", 10, 1, {"ANSWER_HUMAN": 2}, T0) is None
    assert "goal reached" in (finish_verdict(goals, "Filter in Progress", 10, 1, {"ANSWER_HUMAN": 3}, T0) or "")


# ---- settings -----------------------------------------------------------------------------------------------
def test_settings_defaults_env_and_rules() -> None:
    assert CDSettings().cm_dead_after_ms == 1500
    assert load_settings({"POM_CD_CM_DEAD_AFTER_MS": "3000"}).cm_dead_after_ms == 3000
    with pytest.raises(ConfigError, match="cm_dead_after_ms >= 2 \\* allocation_interval_ms"):
        load_settings({"POM_CD_CM_DEAD_AFTER_MS": "300", "POM_CD_ALLOCATION_INTERVAL_MS": "200"})
    with pytest.raises(ConfigError, match="late_tolerance_ms"):
        load_settings({"POM_CD_LATE_TOLERANCE_MS": "100"})
    with pytest.raises(ConfigError, match="POM_CD_NUISANCE_CAP"):
        load_settings({"POM_CD_NUISANCE_CAP": "2"})


# ---- export resume point --------------------------------------------------------------------------------------
def test_a_resumed_export_drops_what_was_written_after_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    kept = _csv_bytes([HEADER, [1, "c1", 1, "completed", "BUSY", "pom1", "t", "t", 5]])
    path.write_bytes(kept + b"1,c2,1,compl")  # half a row from the master that died
    with _open_for_export(str(path), len(kept)) as handle:
        handle.write(_csv_bytes([[1, "c2", 1, "completed", "BUSY", "pom1", "t", "t", 6]]))
    lines = path.read_text().splitlines()
    assert lines[0].startswith("job_id,") and [line.split(",")[1] for line in lines[1:]] == ["c1", "c2"]
    with _open_for_export(str(tmp_path / "new.csv"), 0) as handle:
        assert handle.tell() == 0
    assert (tmp_path / "new.csv").stat().st_mode & 0o777 == 0o666


def test_a_schedule_due_while_a_master_was_up_is_never_reported_missed() -> None:
    """Due after the master's term began: it only waited behind other work (e.g. a long import)."""
    master_since = T0 - timedelta(minutes=5)
    waited = plan_firing(T0, T0 + timedelta(seconds=30), master_since=master_since)
    assert waited is not None and waited.late_ms == 30_000 and not waited.late
    missed = plan_firing(master_since - timedelta(seconds=10), T0, master_since=master_since)
    assert missed is not None and missed.late
