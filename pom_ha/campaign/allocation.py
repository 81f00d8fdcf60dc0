"""Which Campaign Manager gets a job (pure): the least busy RUNNING one.

A CM publishes its ``load`` in ``ha_member`` every renew interval, so the figure lags the allocations of
the last moments; the allocator therefore counts a CM as busy as the larger of its published load and the
jobs assigned to it, plus the jobs it was given in the current round. Ties go to the server name, so the
choice is deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CMCandidate:
    server: str
    instance: str
    load: int  # as published in ha_member
    assigned: int  # jobs it holds in ha_assignment

    @property
    def busy(self) -> int:
        return max(self.load, self.assigned)


def allocate(jobs: Iterable[int], candidates: Sequence[CMCandidate]) -> list[tuple[int, CMCandidate]]:
    """Give each job (in order) to the least busy candidate, counting what this round already gave."""
    if not candidates:
        return []
    given: dict[str, int] = {}
    plan: list[tuple[int, CMCandidate]] = []
    for job in jobs:
        best = min(candidates, key=lambda c: (c.busy + given.get(c.instance, 0), c.server, c.instance))
        given[best.instance] = given.get(best.instance, 0) + 1
        plan.append((job, best))
    return plan
