"""Completion codes and attempts: how one try at a contact ended, and the record of that try.

A ``CompletionCode`` carries the flags the rest of the domain decides on:
- ``is_final``: the contact is done for this job (no retry whatever the strategy says);
- ``is_live_answer``: a person answered, the denominator of the nuisance rate;
- ``retryable``: the retry strategy may schedule another attempt;
- ``dialed``: the call left for the network, so it counts against max attempts and the minimum gap.

System codes are class attributes (``CompletionCode.BUSY``); campaigns add custom ones with
``CompletionCode.custom``. An ``Attempt`` row is written PLANNED before its dial command leaves (fenced by
the job-assignment ``epoch``), moves to DIALING, and ends COMPLETED with a code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum
from typing import ClassVar

from pom_ha.domain.instants import as_utc

_CODE_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,39}")


@dataclass(frozen=True, slots=True)
class CompletionCode:
    name: str
    is_final: bool
    is_live_answer: bool
    retryable: bool
    dialed: bool = True
    system: bool = False

    ANSWER_HUMAN: ClassVar[CompletionCode]
    ANSWER_MACHINE: ClassVar[CompletionCode]
    BUSY: ClassVar[CompletionCode]
    NO_ANSWER: ClassVar[CompletionCode]
    NETWORK_FAILURE: ClassVar[CompletionCode]
    NUISANCE: ClassVar[CompletionCode]
    DESKTOP_ERROR: ClassVar[CompletionCode]
    CALL_FAILOVER: ClassVar[CompletionCode]
    DNC_BLOCKED: ClassVar[CompletionCode]
    OUTSIDE_CALLING_WINDOW: ClassVar[CompletionCode]
    MAX_ATTEMPTS_REACHED: ClassVar[CompletionCode]
    INVALID_NUMBER: ClassVar[CompletionCode]
    FAX_DETECTED: ClassVar[CompletionCode]
    CANCELLED: ClassVar[CompletionCode]

    def __post_init__(self) -> None:
        if self.is_final and self.retryable:
            raise ValueError(f"completion code {self.name}: a final code cannot be retryable")

    @classmethod
    def custom(
        cls, name: str, *, is_final: bool = True, is_live_answer: bool = True, retryable: bool = False
    ) -> CompletionCode:
        """A campaign's own code (typically an agent's disposition); the name is upper-case A-Z0-9_."""
        if not _CODE_NAME.fullmatch(name):
            raise ValueError(f"completion code name {name!r}: use A-Z, 0-9 and _, starting with a letter, at most 40")
        if name in SYSTEM_CODES:
            raise ValueError(f"completion code name {name!r} is a system code")
        return cls(name, is_final=is_final, is_live_answer=is_live_answer, retryable=retryable)

    @property
    def display_name(self) -> str:
        return self.name.replace("_", " ").title()

    def __str__(self) -> str:
        return self.name


def _system(name: str, *, final: bool, live: bool, retry: bool, dialed: bool = True) -> CompletionCode:
    return CompletionCode(name, final, live, retry, dialed=dialed, system=True)


CompletionCode.ANSWER_HUMAN = _system("ANSWER_HUMAN", final=True, live=True, retry=False)
CompletionCode.ANSWER_MACHINE = _system("ANSWER_MACHINE", final=False, live=False, retry=True)
CompletionCode.BUSY = _system("BUSY", final=False, live=False, retry=True)
CompletionCode.NO_ANSWER = _system("NO_ANSWER", final=False, live=False, retry=True)
CompletionCode.NETWORK_FAILURE = _system("NETWORK_FAILURE", final=False, live=False, retry=True)
# Abandoned: a person answered and no agent took the call. Counted as a live answer (nuisance rate).
CompletionCode.NUISANCE = _system("NUISANCE", final=False, live=True, retry=True)
CompletionCode.DESKTOP_ERROR = _system("DESKTOP_ERROR", final=False, live=True, retry=True)
# The Campaign Manager holding the attempt died; whether it rang is unknown, so it counts as dialed.
CompletionCode.CALL_FAILOVER = _system("CALL_FAILOVER", final=False, live=False, retry=True)
CompletionCode.DNC_BLOCKED = _system("DNC_BLOCKED", final=True, live=False, retry=False, dialed=False)
CompletionCode.OUTSIDE_CALLING_WINDOW = _system(
    "OUTSIDE_CALLING_WINDOW", final=False, live=False, retry=True, dialed=False
)
CompletionCode.MAX_ATTEMPTS_REACHED = _system("MAX_ATTEMPTS_REACHED", final=True, live=False, retry=False, dialed=False)
CompletionCode.INVALID_NUMBER = _system("INVALID_NUMBER", final=True, live=False, retry=False)
CompletionCode.FAX_DETECTED = _system("FAX_DETECTED", final=True, live=False, retry=False)
# A planned attempt dropped before its dial command left (job stopped); the contact may be tried again.
CompletionCode.CANCELLED = _system("CANCELLED", final=False, live=False, retry=True, dialed=False)

SYSTEM_CODES: Mapping[str, CompletionCode] = {
    code.name: code for code in vars(CompletionCode).values() if isinstance(code, CompletionCode)
}


def code_by_name(name: str, custom: Iterable[CompletionCode] = ()) -> CompletionCode:
    """Look a code up among the system codes and ``custom``; raise ``KeyError`` naming it if unknown."""
    if name in SYSTEM_CODES:
        return SYSTEM_CODES[name]
    for code in custom:
        if code.name == name:
            return code
    raise KeyError(f"unknown completion code {name!r}")


class AttemptState(Enum):
    PLANNED = "planned"
    DIALING = "dialing"
    COMPLETED = "completed"


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try at one contact in one job; ``(job_id, contact_id, attempt_no)`` is unique."""

    job_id: str
    contact_id: str
    attempt_no: int
    epoch: int
    state: AttemptState = AttemptState.PLANNED
    code: CompletionCode | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.attempt_no < 1:
            raise ValueError(f"attempt_no must be at least 1, got {self.attempt_no}")
        if self.epoch < 0:
            raise ValueError(f"epoch must not be negative, got {self.epoch}")
        if (self.code is not None) != (self.state is AttemptState.COMPLETED):
            raise ValueError("an attempt has a completion code exactly when it is completed")
        if self.state is AttemptState.DIALING and self.started_at is None:
            raise ValueError("a dialing attempt needs started_at")
        if self.state is AttemptState.COMPLETED and self.ended_at is None:
            raise ValueError("a completed attempt needs ended_at")
        for name in ("started_at", "ended_at"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, as_utc(value, name))

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.job_id, self.contact_id, self.attempt_no)

    @property
    def in_flight(self) -> bool:
        return self.state is not AttemptState.COMPLETED

    @property
    def dialed(self) -> bool:
        """Whether this attempt went (or may have gone) to the network."""
        if self.code is None:
            return self.state is AttemptState.DIALING
        return self.code.dialed

    def dialing(self, at: datetime) -> Attempt:
        if self.state is not AttemptState.PLANNED:
            raise ValueError(f"attempt {self.key} is {self.state.value}, only a planned attempt can dial")
        return replace(self, state=AttemptState.DIALING, started_at=at)

    def completed(self, code: CompletionCode, at: datetime) -> Attempt:
        if self.state is AttemptState.COMPLETED:
            raise ValueError(f"attempt {self.key} is already completed with {self.code}")
        return replace(self, state=AttemptState.COMPLETED, code=code, ended_at=at)


@dataclass(frozen=True, slots=True)
class ContactHistory:
    """What the Rule Engine needs to know about a contact's past: dialed attempts and the latest one."""

    dialed_attempts: int = 0
    last_dialed_at: datetime | None = None
    # dialed attempts on this contact's phone number in the job (any contact), when the caller knows it
    number_attempts: int | None = None

    @classmethod
    def from_attempts(cls, attempts: Sequence[Attempt]) -> ContactHistory:
        dialed = [a for a in attempts if a.dialed]
        # The gap runs from the end of the last call, or from its start while it is still ringing.
        times = [a.ended_at or a.started_at for a in dialed]
        return cls(len(dialed), max((t for t in times if t is not None), default=None))
