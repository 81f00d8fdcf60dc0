"""The Campaign Manager's pure decisions: Rule Engine verdicts, outcomes, takeover resolution, outcome
routing by epoch, refused dials, and the overdue-attempt watch."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from pom_ha.config import load_topology
from pom_ha.domain.attempts import CompletionCode
from pom_ha.domain.strategy import RetryStrategy
from services.campaign_manager.__main__ import media_addresses
from services.campaign_manager.completions import InFlight
from services.campaign_manager.decisions import (
    NOT_DIALED_CODES,
    AttemptRow,
    ContactUpdate,
    attempt_id,
    classify_outcome,
    job_item,
    job_of_item,
    platform_code,
    refused_dial_retry,
    resolve_completions,
    verdict_update,
)

T0 = datetime(2026, 3, 8, 15, 0, tzinfo=UTC)
CC = CompletionCode
STRATEGY = RetryStrategy(max_attempts=3, default_retry_interval=timedelta(hours=1),
                         retry_intervals={"BUSY": timedelta(minutes=5), "CALL_FAILOVER": timedelta(0)})


def _row(contact: str, no: int, code: str | None = None, *, at: datetime = T0) -> AttemptRow:
    state = "dialing" if code is None else "completed"
    return AttemptRow(contact, no, state, code, at - timedelta(minutes=1), None if code is None else at)


# ---- ids ---------------------------------------------------------------------------------------------------
def test_job_items_round_trip_and_others_are_not_jobs() -> None:
    assert job_of_item(job_item(42)) == 42
    assert [job_of_item(i) for i in ("zone:Default", "job:", "job:x1", "job:-3", "42")] == [None] * 5


def test_attempt_ids_are_unique_per_job_contact_and_number() -> None:
    ids = {attempt_id(j, c, n) for j in (1, 12) for c in ("2:1", "1", "a:b") for n in (1, 2, 12)}
    assert len(ids) == 18


# ---- Rule Engine verdicts ------------------------------------------------------------------------------------
def test_an_allowed_contact_is_dialed() -> None:
    assert verdict_update("c1", True, None, None, "allowed") is None


@pytest.mark.parametrize("code", ["DNC_BLOCKED", "MAX_ATTEMPTS_REACHED", "INVALID_NUMBER"])
def test_a_final_refusal_ends_the_contact_with_its_code(code: str) -> None:
    assert verdict_update("c1", False, code, None, "why") == ContactUpdate("c1", "done", final_code=code, reason="why")


def test_a_refusal_with_retry_at_keeps_the_contact_pending_until_then() -> None:
    later = T0 + timedelta(hours=3)
    window = verdict_update("c1", False, "OUTSIDE_CALLING_WINDOW", later, "night")
    gap = verdict_update("c1", False, None, later, "minimum gap")
    assert window == ContactUpdate("c1", "pending", next_attempt_at=later, reason="night")
    assert gap == ContactUpdate("c1", "pending", next_attempt_at=later, reason="minimum gap")


def test_an_unusable_contact_is_filtered_out_with_the_reason() -> None:
    update = verdict_update("c1", False, None, None, "contact rejected: unknown time zone 'Atlantis/Capital'")
    assert update is not None and update.state == "filtered_out" and "Atlantis" in update.reason
    unknown = verdict_update("c1", False, "SOMETHING_NEW", None, "")
    assert unknown is not None and unknown.state == "filtered_out"


def test_a_naive_retry_at_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verdict_update("c1", False, None, datetime(2026, 1, 1, 12, 0), "gap")


# ---- outcomes ----------------------------------------------------------------------------------------------
def test_a_final_outcome_ends_the_contact() -> None:
    done, updates = resolve_completions(7, 1, STRATEGY, [_row("c1", 1)], {("c1", 1): CC.ANSWER_HUMAN}, T0)
    assert done == [("c1", 1, "ANSWER_HUMAN")]
    assert [(u.contact_id, u.state, u.final_code) for u in updates] == [("c1", "done", "ANSWER_HUMAN")]


def test_a_retryable_outcome_waits_its_interval() -> None:
    _done, updates = resolve_completions(7, 1, STRATEGY, [_row("c1", 1)], {("c1", 1): CC.BUSY}, T0)
    assert updates == [ContactUpdate("c1", "pending", next_attempt_at=T0 + timedelta(minutes=5),
                                     reason=updates[0].reason)]


def test_the_last_allowed_attempt_ends_with_max_attempts_reached() -> None:
    rows = [_row("c1", 1, "BUSY"), _row("c1", 2, "NO_ANSWER"), _row("c1", 3)]
    _done, updates = resolve_completions(7, 1, STRATEGY, rows, {("c1", 3): CC.BUSY}, T0)
    assert [(u.state, u.final_code) for u in updates] == [("done", "MAX_ATTEMPTS_REACHED")]


def test_takeover_resolves_in_flight_attempts_as_call_failover_and_retries_at_once() -> None:
    rows = [_row("a", 1), _row("b", 1, "BUSY"), _row("b", 2), _row("c", 1, "NO_ANSWER"), _row("c", 2, "BUSY"),
            _row("c", 3)]
    failover = {(c, n): CC.CALL_FAILOVER for c, n in (("a", 1), ("b", 2), ("c", 3))}
    done, updates = resolve_completions(7, 2, STRATEGY, rows, failover, T0)
    assert sorted(done) == [("a", 1, "CALL_FAILOVER"), ("b", 2, "CALL_FAILOVER"), ("c", 3, "CALL_FAILOVER")]
    by_contact = {u.contact_id: u for u in updates}
    # CALL_FAILOVER counts as dialed (it may have rung): c has used its three attempts
    assert (by_contact["a"].state, by_contact["a"].next_attempt_at) == ("pending", T0)
    assert (by_contact["b"].state, by_contact["b"].next_attempt_at) == ("pending", T0)
    assert (by_contact["c"].state, by_contact["c"].final_code) == ("done", "MAX_ATTEMPTS_REACHED")


def test_an_outcome_of_an_attempt_no_longer_dialing_is_left_out() -> None:
    rows = [_row("c1", 1, "CALL_FAILOVER"), _row("c1", 2)]
    done, updates = resolve_completions(7, 2, STRATEGY, rows, {("c1", 1): CC.ANSWER_HUMAN, ("c9", 1): CC.BUSY}, T0)
    assert done == [] and updates == []


def test_a_refused_dial_is_due_again_after_its_pause_not_the_strategy_interval() -> None:
    retry = T0 + timedelta(milliseconds=500)
    _done, updates = resolve_completions(7, 1, STRATEGY, [_row("c1", 1)], {("c1", 1): CC.CANCELLED}, T0,
                                         retry_at={("c1", 1): retry})
    assert (updates[0].state, updates[0].next_attempt_at) == ("pending", retry)


def test_refused_attempts_do_not_use_up_max_attempts() -> None:
    rows = [_row("c1", n, "CANCELLED") for n in range(1, 6)] + [_row("c1", 6)]
    _done, updates = resolve_completions(7, 1, STRATEGY, rows, {("c1", 6): CC.CANCELLED}, T0,
                                         retry_at={("c1", 6): T0})
    assert updates[0].state == "pending"
    assert "CANCELLED" in NOT_DIALED_CODES and "CALL_FAILOVER" not in NOT_DIALED_CODES


def test_refused_dial_pauses() -> None:
    assert refused_dial_retry("capacity") == timedelta(milliseconds=500)
    assert refused_dial_retry("down") == timedelta(seconds=2)
    assert refused_dial_retry("bad_request") is None


def test_an_unknown_platform_code_is_a_network_failure() -> None:
    assert platform_code("BUSY") is CC.BUSY
    assert platform_code("SOMETHING_NEW") is CC.NETWORK_FAILURE
    custom = CompletionCode.custom("SALE")
    assert platform_code("SALE", [custom]) == custom


# ---- routing outcomes by epoch -----------------------------------------------------------------------------
def test_outcomes_are_routed_only_under_the_epoch_the_job_is_held_with() -> None:
    held = {7: 2, 8: 1}
    assert classify_outcome("7", 2, held) == "deliver"
    assert classify_outcome("7", 1, held) == "stale_epoch"  # the previous owner's call, resolved at takeover
    assert classify_outcome("8", 3, held) == "stale_epoch"  # a newer owner exists: ours is about to stop
    assert classify_outcome("9", 1, held) == "unknown_job"
    assert classify_outcome("x", 1, held) == "bad_job"


# ---- overdue attempts ----------------------------------------------------------------------------------------
def test_overdue_attempts_are_reported_once_and_forgotten_when_done() -> None:
    flight = InFlight()
    flight.add("c1", 1)
    flight.started[("c1", 1)] = time.monotonic() - 10
    flight.add("c2", 1)
    assert flight.overdue(5.0) == [("c1", 1)]
    assert flight.overdue(5.0) == []
    flight.done("c1", 1)
    assert len(flight) == 1


def test_attempts_written_but_unknown_to_the_runner_are_found_once_sweep_ran() -> None:
    flight = InFlight()
    flight.add("sent", 1)
    flight.add("ending", 1)
    flight.ended_since_sweep.clear()  # the sweep starts, then reads the database
    flight.done("ending", 1)  # its completion committed after the read: not an orphan
    assert flight.unknown([("sent", 1), ("ending", 1), ("never-sent", 2)]) == [("never-sent", 2)]


def test_media_addresses_default_to_every_server_and_parse_host_port() -> None:
    topo = load_topology()
    assert media_addresses(topo, []) == [(s.address, topo.ports.media_simulator) for s in topo.servers]
    assert media_addresses(topo, ["127.0.1.3:7401"]) == [("127.0.1.3", 7401)]
    with pytest.raises(Exception, match="HOST:PORT"):
        media_addresses(topo, ["127.0.1.3"])
