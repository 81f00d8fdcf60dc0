"""Completion codes and attempts: flags that drive retries and the nuisance rate, and the attempt lifecycle."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pom_ha.domain.attempts import (
    SYSTEM_CODES,
    Attempt,
    AttemptState,
    CompletionCode,
    ContactHistory,
    code_by_name,
)

T0 = datetime(2026, 3, 8, 15, 0, tzinfo=UTC)
CC = CompletionCode


def test_system_codes_and_their_flags() -> None:
    for name in (
        "ANSWER_HUMAN",
        "ANSWER_MACHINE",
        "BUSY",
        "NO_ANSWER",
        "NETWORK_FAILURE",
        "NUISANCE",
        "DESKTOP_ERROR",
        "CALL_FAILOVER",
        "DNC_BLOCKED",
        "OUTSIDE_CALLING_WINDOW",
        "MAX_ATTEMPTS_REACHED",
        "INVALID_NUMBER",
    ):
        assert SYSTEM_CODES[name].system
    assert {c.name for c in SYSTEM_CODES.values() if c.is_final} == {
        "ANSWER_HUMAN",
        "DNC_BLOCKED",
        "MAX_ATTEMPTS_REACHED",
        "INVALID_NUMBER",
        "FAX_DETECTED",
    }
    assert {c.name for c in SYSTEM_CODES.values() if c.is_live_answer} == {"ANSWER_HUMAN", "NUISANCE", "DESKTOP_ERROR"}
    assert CC.CALL_FAILOVER.retryable and CC.CALL_FAILOVER.dialed
    assert not CC.DNC_BLOCKED.dialed and not CC.OUTSIDE_CALLING_WINDOW.dialed
    assert all(not (c.is_final and c.retryable) for c in SYSTEM_CODES.values())
    assert CC.ANSWER_MACHINE.display_name == "Answer Machine"


def test_custom_code_is_validated() -> None:
    sale = CC.custom("SALE_CLOSED")
    assert (sale.is_final, sale.is_live_answer, sale.retryable, sale.system) == (True, True, False, False)
    assert code_by_name("SALE_CLOSED", [sale]) is sale
    assert code_by_name("BUSY") is CC.BUSY
    with pytest.raises(ValueError, match="A-Z"):
        CC.custom("sale closed")
    with pytest.raises(ValueError, match="is a system code"):
        CC.custom("BUSY")
    with pytest.raises(ValueError, match="cannot be retryable"):
        CC.custom("CALL_BACK", is_final=True, retryable=True)
    with pytest.raises(KeyError, match="unknown completion code 'NOPE'"):
        code_by_name("NOPE", [sale])


def test_attempt_lifecycle_planned_dialing_completed() -> None:
    planned = Attempt("job1", "c1", 1, epoch=7)
    assert planned.in_flight and not planned.dialed
    dialing = planned.dialing(T0)
    assert dialing.state is AttemptState.DIALING and dialing.dialed
    done = dialing.completed(CC.BUSY, T0 + timedelta(seconds=20))
    assert (done.state, done.code, done.ended_at, done.key) == (
        AttemptState.COMPLETED,
        CC.BUSY,
        T0 + timedelta(seconds=20),
        ("job1", "c1", 1),
    )
    with pytest.raises(ValueError, match="already completed"):
        done.completed(CC.NO_ANSWER, T0)
    with pytest.raises(ValueError, match="only a planned attempt can dial"):
        dialing.dialing(T0)


def test_attempt_refuses_inconsistent_rows() -> None:
    with pytest.raises(ValueError, match="attempt_no"):
        Attempt("j", "c", 0, epoch=1)
    with pytest.raises(ValueError, match="code exactly when"):
        Attempt("j", "c", 1, epoch=1, code=CC.BUSY)
    with pytest.raises(ValueError, match="timezone-aware"):
        Attempt("j", "c", 1, epoch=1, state=AttemptState.DIALING, started_at=datetime(2026, 1, 1))


def test_contact_history_counts_only_dialed_attempts() -> None:
    attempts = [
        Attempt("j", "c", 1, 1).dialing(T0).completed(CC.BUSY, T0 + timedelta(minutes=1)),
        Attempt("j", "c", 2, 1).completed(CC.OUTSIDE_CALLING_WINDOW, T0 + timedelta(hours=5)),
        Attempt("j", "c", 3, 2).dialing(T0 + timedelta(hours=2)),
    ]
    history = ContactHistory.from_attempts(attempts)
    assert history == ContactHistory(2, T0 + timedelta(hours=2))
    assert ContactHistory.from_attempts([]) == ContactHistory(0, None)
