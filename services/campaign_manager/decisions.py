"""Pure decisions of the Campaign Manager: what a Rule Engine verdict, a call outcome, a refused dial or a
takeover means for one contact of a job. No I/O here; the job runner reads rows, asks these functions,
and writes what they answer (fenced).

A contact of a job is in one of the ``job_contacts`` states ``pending`` (due at ``next_attempt_at``),
``dialing`` (exactly one attempt in flight), ``done`` (with ``final_code``) or ``filtered_out``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from pom_ha.domain.attempts import SYSTEM_CODES, Attempt, AttemptState, CompletionCode, code_by_name
from pom_ha.domain.instants import as_utc
from pom_ha.domain.strategy import Dial, Done, RetryStrategy, Wait

# Codes whose attempts never reached the network: they do not count against max attempts or the gap.
NOT_DIALED_CODES: tuple[str, ...] = tuple(sorted(n for n, c in SYSTEM_CODES.items() if not c.dialed))


@dataclass(frozen=True, slots=True)
class ContactUpdate:
    """What to write into the contact's ``job_contacts`` row."""

    contact_id: str
    state: Literal["pending", "done", "filtered_out"]
    next_attempt_at: datetime | None = None  # set when pending
    final_code: str | None = None  # set when done
    reason: str = ""


# ---- ids ---------------------------------------------------------------------------------------------------
def job_item(job_id: int) -> str:
    """The ``ha_assignment`` item of a job."""
    return f"job:{job_id}"


def job_of_item(item: str) -> int | None:
    """The job id of an ``ha_assignment`` item, or None if the item is not a job."""
    prefix, _, rest = item.partition(":")
    if prefix != "job" or not rest.isdigit():
        return None
    return int(rest)


def media_scope(job_id: int) -> str:
    return f"job/{job_id}"


def attempt_id(job_id: int, contact_id: str, attempt_no: int) -> str:
    """The call id sent with DIAL (unique per job, contact and attempt number, so a re-sent DIAL is a
    duplicate on the platform, never a second call)."""
    return f"{job_id}:{attempt_no}:{contact_id}"


# ---- Rule Engine verdicts ------------------------------------------------------------------------------------
def verdict_update(
    contact_id: str, allowed: bool, code_name: str | None, retry_at: datetime | None, reason: str,
    custom: Iterable[CompletionCode] = (),
) -> ContactUpdate | None:
    """None when the contact may be dialed now; else how the contact waits or ends.

    A final code (do-not-call, max attempts, invalid number) ends the contact with that code; a refusal
    with ``retry_at`` (calling window, minimum gap) keeps it pending until then; a refusal with neither
    (the contact itself is unusable, e.g. an unknown time zone) filters it out with the reason.
    """
    if allowed:
        return None
    code: CompletionCode | None = None
    if code_name is not None:
        try:
            code = code_by_name(code_name, custom)
        except KeyError:
            code = None
    if code is not None and (code.is_final or not code.retryable) and retry_at is None:
        return ContactUpdate(contact_id, "done", final_code=code.name, reason=reason)
    if retry_at is not None:
        return ContactUpdate(contact_id, "pending", next_attempt_at=as_utc(retry_at, "retry_at"), reason=reason)
    return ContactUpdate(contact_id, "filtered_out", reason=reason or "refused by the Rule Engine")


# ---- outcomes ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AttemptRow:
    """An ``attempts`` row as the runner reads it."""

    contact_id: str
    attempt_no: int
    state: str  # 'dialing' | 'completed'
    code: str | None
    created_at: datetime
    completed_at: datetime | None


def to_domain(job_id: int, epoch: int, row: AttemptRow, custom: Iterable[CompletionCode] = ()) -> Attempt:
    if row.state == "completed" and row.code is not None:
        try:
            code = code_by_name(row.code, custom)
        except KeyError:  # a code this CM does not know (a newer version wrote it): count it as dialed
            code = CompletionCode.custom("UNKNOWN_CODE", is_final=False, retryable=True)
        return Attempt(str(job_id), row.contact_id, row.attempt_no, epoch, AttemptState.COMPLETED, code,
                       row.created_at, row.completed_at or row.created_at)
    return Attempt(str(job_id), row.contact_id, row.attempt_no, epoch, AttemptState.DIALING, None, row.created_at)


def completion_update(
    strategy: RetryStrategy, history: Sequence[Attempt], completed: Attempt, now: datetime,
    *, retry_at: datetime | None = None,
) -> ContactUpdate:
    """The contact's next step once ``completed`` (one of its attempts, now with its code) has ended.

    ``history`` holds the contact's other attempts. ``retry_at`` overrides the strategy's interval when the
    attempt never left (the platform refused the dial for capacity or down mode): the contact is due again
    then, whatever the code's interval says.
    """
    assert completed.code is not None
    attempts = [a for a in history if a.attempt_no != completed.attempt_no] + [completed]
    action = strategy.next_action(attempts, now)
    cid = completed.contact_id
    if isinstance(action, Done):
        return ContactUpdate(cid, "done", final_code=action.code.name, reason=f"done: {action.code.name}")
    if retry_at is not None and not completed.code.dialed:
        return ContactUpdate(cid, "pending", next_attempt_at=as_utc(retry_at, "retry_at"),
                             reason=f"{completed.code.name}: due again at {retry_at.isoformat()}")
    if isinstance(action, Dial):
        return ContactUpdate(cid, "pending", next_attempt_at=action.at, reason=f"retry now after {completed.code}")
    assert isinstance(action, Wait)
    # Wait(None) cannot happen once the only in-flight attempt is completed; be safe: due now
    return ContactUpdate(cid, "pending", next_attempt_at=action.until or as_utc(now), reason=action.reason)


def resolve_completions(
    job_id: int, epoch: int, strategy: RetryStrategy, rows: Sequence[AttemptRow],
    completions: Mapping[tuple[str, int], CompletionCode], now: datetime,
    custom: Iterable[CompletionCode] = (), retry_at: Mapping[tuple[str, int], datetime] | None = None,
) -> tuple[list[tuple[str, int, str]], list[ContactUpdate]]:
    """Apply ``completions`` ((contact, attempt_no) -> code) to attempts still ``dialing`` in ``rows`` (all
    attempts of the contacts concerned). Returns the attempts to complete (contact, attempt_no, code) and
    the contact updates; completions of attempts that are not dialing (already resolved) are left out."""
    by_contact: dict[str, list[Attempt]] = {}
    dialing: set[tuple[str, int]] = set()
    for row in rows:
        by_contact.setdefault(row.contact_id, []).append(to_domain(job_id, epoch, row, custom))
        if row.state == "dialing":
            dialing.add((row.contact_id, row.attempt_no))
    done: list[tuple[str, int, str]] = []
    updates: list[ContactUpdate] = []
    for key, code in completions.items():
        if key not in dialing:
            continue
        contact, no = key
        history = by_contact[contact]
        current = next(a for a in history if a.attempt_no == no)
        completed = current.completed(code, as_utc(now))
        history[:] = [completed if a.attempt_no == no else a for a in history]
        if any(a.in_flight for a in history):
            # another attempt of the contact is still dialing (cannot happen with one in flight per contact;
            # keep the contact dialing rather than guess)
            done.append((contact, no, code.name))
            continue
        at = (retry_at or {}).get(key)
        done.append((contact, no, code.name))
        updates.append(completion_update(strategy, history, completed, now, retry_at=at))
    return done, updates


# ---- outcomes arriving from the media platform -------------------------------------------------------------
OutcomeClass = Literal["deliver", "stale_epoch", "unknown_job", "bad_job"]


def classify_outcome(job: str, epoch: int, held: Mapping[int, int]) -> OutcomeClass:
    """Where an outcome of ``job`` sent under ``epoch`` goes, given the jobs this CM holds (job -> epoch).

    An epoch older than the one this CM holds the job under belongs to a previous owner (or a previous
    term of ours) whose attempts were resolved at takeover: it is dropped and counted, never applied.
    """
    if not job.isdigit():
        return "bad_job"
    current = held.get(int(job))
    if current is None:
        return "unknown_job"
    if epoch != current:
        return "stale_epoch"
    return "deliver"


def platform_code(name: str, custom: Iterable[CompletionCode] = ()) -> CompletionCode:
    """The completion code a platform reported; an unknown name is recorded as a network failure."""
    try:
        return code_by_name(name, custom)
    except KeyError:
        return CompletionCode.NETWORK_FAILURE


def refused_dial_retry(reason: str) -> timedelta | None:
    """After the platform refused a DIAL: how long until the contact is due again (the attempt is recorded
    CANCELLED, not dialed), or None when the contact cannot be dialed at all (bad request)."""
    if reason == "capacity":
        return timedelta(milliseconds=500)
    if reason in ("down", "stale_epoch"):
        return timedelta(seconds=2)
    return None
