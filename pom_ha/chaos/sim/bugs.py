"""Known bugs the simulation must find, re-introduced only here and only when a run asks for them.

Production code is never changed by a switch: each bug is a subclass or a replacement used by the
simulated world instead of the real piece, so a clean run drives exactly the shipped code.

* ``safe_until_debug_return`` — the debugging ``return lease.valid_until_mono`` that commit bde44f5
  removed from :meth:`Elector.safe_until`: a master paused past its exclusivity bound believes itself
  master until its TTL deadline, while a peer has already taken the lease over early.
* ``no_epoch_gate`` — the message receiver admits every message instead of asking its
  :class:`~pom_ha.ha.fencing.EpochGate` (a fencing check removed): a late message of a deposed master is
  accepted after the new master's.
* ``fence_ignores_epoch`` — the fenced database write checks only that the lease is unexpired, not that it
  is still at the writer's epoch (the ``epoch = $n`` of :class:`~pom_ha.ha.fencing.LeaseFence` removed).
"""

from __future__ import annotations

from pom_ha.ha.election import Elector
from pom_ha.ha.roles import RoleState

KNOWN_BUGS: dict[str, str] = {
    "safe_until_debug_return": "Elector.safe_until returns the TTL deadline (the debugging return fixed in bde44f5)",
    "no_epoch_gate": "the message receiver skips its EpochGate",
    "fence_ignores_epoch": "the fenced write checks only that the lease is unexpired, not its epoch",
}


def check_bugs(bugs: frozenset[str] | set[str] | tuple[str, ...]) -> frozenset[str]:
    unknown = sorted(set(bugs) - set(KNOWN_BUGS))
    if unknown:
        raise ValueError(f"unknown bug switch {', '.join(unknown)} (known: {', '.join(sorted(KNOWN_BUGS))})")
    return frozenset(bugs)


class SafeUntilDebugReturn(Elector):
    """:class:`Elector` with the buggy ``safe_until`` of commit bde44f5^ (mixed into the simulated elector)."""

    def safe_until(self) -> float:
        lease = self.lease
        if self.state is not RoleState.MASTER or lease is None or lease.valid_until_mono is None:
            return float("-inf")
        return lease.valid_until_mono
