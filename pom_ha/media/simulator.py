"""The simulated media platform: ports, call outcomes and durations, fencing of dial commands — no sockets.

:class:`MediaPlatform` decides every DIAL at once (ACCEPTED or REJECTED, checked in this order: down
mode, stale epoch for the DIAL's scope, duplicate ``attempt_id``, port capacity), draws the call's
completion code from a weighted distribution and its duration from that code's range, and reports the
OUTCOME through ``deliver(owner, outcome)`` when the call ends, ``duration_ms * time_scale`` later.
Timers come from an injectable ``schedule`` (the running loop's ``call_later`` by default) so tests can
fire them by hand.

An outcome whose owner is gone (``deliver`` returns False, or :meth:`disconnect` ran) is held for
``orphan_hold_s`` per scope; the next DIAL or CLAIM for that scope takes the held outcomes and the
ownerless calls. Expired ones are dropped and counted.

``call_log`` (optional) is told of every call the platform accepted, at the moment it accepts it: the
platform's own record of what it placed (the chaos checker's only witness that a dial went out). Entries
name the attempt, never the phone number.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import random
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pom_ha.domain.attempts import CompletionCode
from pom_ha.ha.fencing import EpochEnvelope, EpochGate
from pom_ha.media.protocol import Accepted, Claimed, Dial, Mode, Outcome, Rejected, RejectReason, StatsReply

Owner = Hashable


class Timer(Protocol):
    def cancel(self) -> None: ...


Schedule = Callable[[float, Callable[[], None]], Timer]


@dataclass(frozen=True)
class OutcomeSpec:
    """One completion code the platform can produce: its relative weight and call duration range (ms)."""

    code: CompletionCode
    weight: float
    duration_ms: tuple[int, int]

    def __post_init__(self) -> None:
        lo, hi = self.duration_ms
        if self.weight < 0:
            raise ValueError(f"outcomes.{self.code.name}.weight must not be negative, got {self.weight}")
        if not 0 <= lo <= hi:
            raise ValueError(f"outcomes.{self.code.name}.duration_ms must be [min, max] with 0 <= min <= max")


C = CompletionCode
# The codes a network can report; NUISANCE, CALL_FAILOVER, DNC_BLOCKED ... are decided by the CM.
PLATFORM_CODES: Mapping[str, CompletionCode] = {
    c.name: c for c in (C.ANSWER_HUMAN, C.ANSWER_MACHINE, C.BUSY, C.NO_ANSWER, C.NETWORK_FAILURE,
                        C.INVALID_NUMBER, C.FAX_DETECTED)
}
ANSWERED = frozenset({"ANSWER_HUMAN", "ANSWER_MACHINE", "FAX_DETECTED"})
DEFAULT_OUTCOMES: tuple[OutcomeSpec, ...] = (
    OutcomeSpec(C.ANSWER_HUMAN, 0.35, (15_000, 90_000)),
    OutcomeSpec(C.ANSWER_MACHINE, 0.15, (8_000, 30_000)),
    OutcomeSpec(C.BUSY, 0.10, (1_000, 4_000)),
    OutcomeSpec(C.NO_ANSWER, 0.30, (20_000, 30_000)),
    OutcomeSpec(C.NETWORK_FAILURE, 0.05, (200, 3_000)),
    OutcomeSpec(C.INVALID_NUMBER, 0.05, (500, 2_000)),
)
_DEFAULT_RANGES = {s.code.name: s.duration_ms for s in DEFAULT_OUTCOMES} | {"FAX_DETECTED": (5_000, 15_000)}


def parse_outcomes(text: str) -> tuple[OutcomeSpec, ...]:
    """``{"ANSWER_HUMAN": 0.35, "BUSY": {"weight": 0.1, "duration_ms": [1000, 4000]}, ...}``: a weight, or a
    weight with a duration range. Codes left out are never produced; weights need not sum to 1."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"outcomes: not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError("outcomes: must be a non-empty JSON object of completion code -> weight")
    specs = []
    for name, value in raw.items():
        if name not in PLATFORM_CODES:
            raise ValueError(f"outcomes.{name}: not a code a media platform reports; use {sorted(PLATFORM_CODES)}")
        item: dict[str, Any] = value if isinstance(value, dict) else {"weight": value}
        weight, rng = item.get("weight"), item.get("duration_ms", _DEFAULT_RANGES[name])
        if not isinstance(weight, int | float) or isinstance(weight, bool):
            raise ValueError(f"outcomes.{name}.weight must be a number, got {weight!r}")
        if not (isinstance(rng, list | tuple) and len(rng) == 2 and all(isinstance(x, int) for x in rng)):
            raise ValueError(f"outcomes.{name}.duration_ms must be [min, max] in integer ms, got {rng!r}")
        specs.append(OutcomeSpec(PLATFORM_CODES[name], float(weight), (rng[0], rng[1])))
    if sum(s.weight for s in specs) <= 0:
        raise ValueError("outcomes: at least one weight must be positive")
    return tuple(specs)


@dataclass
class _Call:
    dial: Dial
    owner: Owner | None
    started: float
    code: CompletionCode
    duration_ms: int
    timer: Timer | None = None


@dataclass
class PlatformCounters:
    dialed: int = 0
    completed: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    cancel_unknown: int = 0
    peak_in_progress: int = 0
    orphans_delivered: int = 0
    orphans_expired: int = 0


def _loop_schedule(delay_s: float, callback: Callable[[], None]) -> Timer:
    return asyncio.get_running_loop().call_later(delay_s, callback)


class MediaPlatform:
    def __init__(
        self,
        deliver: Callable[[Owner, Outcome], bool],
        *,
        capacity: int = 500,
        outcomes: tuple[OutcomeSpec, ...] = DEFAULT_OUTCOMES,
        time_scale: float = 1.0,
        seed: int | None = None,
        schedule: Schedule = _loop_schedule,
        clock: Callable[[], float] = time.monotonic,
        orphan_hold_s: float = 120.0,
        dedup_window: int = 300_000,
        call_log: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if time_scale < 0:
            raise ValueError(f"time_scale must not be negative, got {time_scale}")
        specs = [s for s in outcomes if s.weight > 0]
        if not specs:
            raise ValueError("outcomes: at least one weight must be positive")
        self.deliver = deliver
        self.capacity = capacity
        self.time_scale = time_scale
        self.mode: Mode = "up"
        self.counters = PlatformCounters()
        self.gate = EpochGate()
        self._specs = specs
        self._cum = [sum(s.weight for s in specs[: i + 1]) for i in range(len(specs))]
        self._rng = random.Random(seed)
        self._schedule = schedule
        self._clock = clock
        self._orphan_hold_s = orphan_hold_s
        self._dedup_window = dedup_window
        self.call_log = call_log
        self._seen: OrderedDict[str, None] = OrderedDict()  # attempt ids ever accepted (bounded window)
        self._calls: dict[str, _Call] = {}
        self._held: dict[str, deque[tuple[float, Outcome]]] = {}
        self._ownerless: Counter[str] = Counter()  # scope -> calls in progress without a live owner

    # ---- commands ----------------------------------------------------------------------------------------
    def dial(self, cmd: Dial, owner: Owner) -> Accepted | Rejected:
        if self.mode == "down":
            return self._reject(cmd, "down", "the media platform is down")
        if not self.gate.admit(EpochEnvelope("dial", cmd.scope, cmd.epoch, cmd.attempt_id)):
            seen = self.gate.highest[("dial", cmd.scope)]
            return self._reject(cmd, "stale_epoch", f"epoch {cmd.epoch} < {seen} already seen for {cmd.scope}")
        if cmd.attempt_id in self._seen:
            return self._reject(cmd, "duplicate", f"attempt {cmd.attempt_id} was already dialed")
        if len(self._calls) >= self.capacity:
            return self._reject(cmd, "capacity", f"all {self.capacity} ports are busy")
        self._remember(cmd.attempt_id)
        if cmd.scope in self._ownerless or cmd.scope in self._held:
            self._adopt(cmd.scope, owner)
        spec = self._specs[bisect.bisect_right(self._cum, self._rng.random() * self._cum[-1])]
        call = _Call(cmd, owner, self._clock(), spec.code, self._rng.randint(*spec.duration_ms))
        self._calls[cmd.attempt_id] = call
        call.timer = self._schedule(call.duration_ms / 1000 * self.time_scale, lambda: self._finish(call))
        self.counters.dialed += 1
        if self.call_log is not None:
            self.call_log({"event": "placed", "at": time.time(), "attempt_id": cmd.attempt_id, "job": cmd.job,
                           "contact": cmd.contact, "attempt_no": cmd.attempt_no, "epoch": cmd.epoch,
                           "scope": cmd.scope})
        self.counters.peak_in_progress = max(self.counters.peak_in_progress, len(self._calls))
        return Accepted(cmd.attempt_id)

    def cancel(self, attempt_id: str) -> bool:
        """End a call in progress now with CANCELLED; False (and counted) if no such call is in progress."""
        call = self._calls.get(attempt_id)
        if call is None:
            self.counters.cancel_unknown += 1
            return False
        self._end_early(call, C.CANCELLED)
        return True

    def set_mode(self, mode: Mode, *, drop_calls: bool = False) -> None:
        self.mode = mode
        if mode == "down" and drop_calls:
            self.drop_all(C.NETWORK_FAILURE)

    def drop_all(self, code: CompletionCode) -> int:
        """End every call in progress now with ``code`` (down mode, or the daemon stopping)."""
        calls = list(self._calls.values())
        for call in calls:
            self._end_early(call, code)
        return len(calls)

    def claim(self, scope: str, epoch: int, owner: Owner) -> Claimed:
        if not self.gate.admit(EpochEnvelope("dial", scope, epoch, None)):
            self.counters.rejected["stale_claim"] += 1
            return Claimed(scope, False, 0, 0)
        delivered = self._adopt(scope, owner, steal=True)
        in_progress = sum(1 for c in self._calls.values() if c.dial.scope == scope)
        return Claimed(scope, True, delivered, in_progress)

    def disconnect(self, owner: Owner) -> None:
        """``owner``'s connection is gone: its calls' outcomes will be held for their scope."""
        for call in self._calls.values():
            if call.owner == owner:
                call.owner = None
                self._ownerless[call.dial.scope] += 1

    # ---- state -------------------------------------------------------------------------------------------
    @property
    def in_progress(self) -> int:
        return len(self._calls)

    def stats(self, connections: int = 0) -> StatsReply:
        self.expire_orphans()
        c = self.counters
        return StatsReply(
            mode=self.mode, capacity=self.capacity, in_progress=len(self._calls), peak_in_progress=c.peak_in_progress,
            dialed=c.dialed, completed=dict(c.completed), rejected=dict(c.rejected), cancel_unknown=c.cancel_unknown,
            orphans_held=sum(len(q) for q in self._held.values()), orphans_delivered=c.orphans_delivered,
            orphans_expired=c.orphans_expired, connections=connections,
        )

    def expire_orphans(self) -> int:
        cutoff = self._clock() - self._orphan_hold_s
        expired = 0
        for scope in list(self._held):
            queue = self._held[scope]
            while queue and queue[0][0] < cutoff:
                queue.popleft()
                expired += 1
            if not queue:
                del self._held[scope]
        self.counters.orphans_expired += expired
        return expired

    # ---- internals ---------------------------------------------------------------------------------------
    def _reject(self, cmd: Dial, reason: RejectReason, detail: str) -> Rejected:
        self.counters.rejected[reason] += 1
        return Rejected(cmd.attempt_id, reason, detail)

    def _remember(self, attempt_id: str) -> None:
        self._seen[attempt_id] = None
        if len(self._seen) > self._dedup_window:
            self._seen.popitem(last=False)

    def _adopt(self, scope: str, owner: Owner, *, steal: bool = False) -> int:
        """Make ``owner`` the owner of ``scope``'s ownerless (or, with ``steal``, all) calls and hand it the
        outcomes held for the scope; returns how many held outcomes were delivered."""
        if self._ownerless.get(scope) or steal:
            for call in self._calls.values():
                if call.dial.scope == scope and (call.owner is None or steal):
                    call.owner = owner
            self._ownerless.pop(scope, None)
        self.expire_orphans()
        delivered = 0
        for _, outcome in self._held.pop(scope, ()):
            if self.deliver(owner, outcome):
                delivered += 1
            else:
                self._hold(outcome)
        self.counters.orphans_delivered += delivered
        return delivered

    def _end_early(self, call: _Call, code: CompletionCode) -> None:
        if call.timer is not None:
            call.timer.cancel()
        elapsed_s = self._clock() - call.started
        call.code = code
        call.duration_ms = int(elapsed_s * 1000 / self.time_scale) if self.time_scale > 0 else 0
        self._finish(call)

    def _finish(self, call: _Call) -> None:
        if self._calls.pop(call.dial.attempt_id, None) is None:
            return
        d = call.dial
        outcome = Outcome(
            attempt_id=d.attempt_id, scope=d.scope, job=d.job, contact=d.contact, attempt_no=d.attempt_no,
            epoch=d.epoch, code=call.code.name, answered=call.code.name in ANSWERED, duration_ms=call.duration_ms,
        )
        self.counters.completed[call.code.name] += 1
        if call.owner is None:
            self._ownerless[d.scope] -= 1
            if self._ownerless[d.scope] <= 0:
                del self._ownerless[d.scope]
            self._hold(outcome)
        elif not self.deliver(call.owner, outcome):
            self._hold(outcome)

    def _hold(self, outcome: Outcome) -> None:
        self._held.setdefault(outcome.scope, deque()).append((self._clock(), outcome))
