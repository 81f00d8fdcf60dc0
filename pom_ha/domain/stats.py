"""A job's counters as the Campaign Director's finish check and the pacers read them.

Counts only, keyed by completion-code name; whoever keeps them (the Campaign Manager's cache, the
Director's query) builds a ``JobStats`` snapshot and hands it to the pure rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pom_ha.domain.attempts import Attempt, CompletionCode


@dataclass(frozen=True, slots=True)
class JobStats:
    contacts_total: int = 0
    contacts_done: int = 0
    code_counts: Mapping[str, int] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not 0 <= self.contacts_done <= self.contacts_total:
            raise ValueError(f"contacts_done {self.contacts_done} outside 0..contacts_total {self.contacts_total}")
        if any(n < 0 for n in self.code_counts.values()):
            raise ValueError("completion-code counts must not be negative")

    def count(self, code: CompletionCode | str) -> int:
        return self.code_counts.get(code if isinstance(code, str) else code.name, 0)

    @classmethod
    def from_attempts(cls, attempts: Iterable[Attempt], *, contacts_total: int, contacts_done: int) -> JobStats:
        counts: dict[str, int] = {}
        for attempt in attempts:
            if attempt.code is not None:
                counts[attempt.code.name] = counts.get(attempt.code.name, 0) + 1
        return cls(contacts_total, contacts_done, counts)
