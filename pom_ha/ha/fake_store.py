"""An in-memory status store with an injectable clock, for unit tests and the HA state-machine test.

It implements exactly the CAS rules of :mod:`pom_ha.ha.store` on its own clock. Optional ``latency_s``
advances the clock before the operation is evaluated and again before it returns (request and reply in
flight), which is how tests show that a caller's deadline is measured from when it *sent* a call.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from pom_ha.ha.store import HAEvent, Holder, Lease, Member, StatusStore, StatusStoreError


class FakeTimer:
    def __init__(self, due_s: float, seq: int, callback: Callable[[], None]) -> None:
        self.due_s = due_s
        self.seq = seq
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: FakeTimer) -> bool:
        return (self.due_s, self.seq) < (other.due_s, other.seq)


class FakeClock:
    """A clock shared by the fake store and the processes under test; ``advance`` is the only way time moves.

    It is also a scheduler: ``call_later`` timers fire, in time order and at their exact due time, while
    ``advance`` moves the clock past them (this is how an elector's deadline watchdog runs in tests).
    """

    def __init__(self, start_s: float = 1_000.0) -> None:
        self.now_s = start_s
        self._timers: list[FakeTimer] = []
        self._seq = 0

    def __call__(self) -> float:
        return self.now_s

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> FakeTimer:
        self._seq += 1
        timer = FakeTimer(self.now_s + max(0.0, delay_s), self._seq, callback)
        heapq.heappush(self._timers, timer)
        return timer

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not go backwards")
        target = self.now_s + seconds
        while self._timers and self._timers[0].due_s <= target:
            timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self.now_s = max(self.now_s, timer.due_s)
            timer.callback()
        self.now_s = target

    async def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))

    def as_datetime(self) -> datetime:
        return datetime.fromtimestamp(self.now_s, UTC)


class FakeStatusStore(StatusStore):
    """Leases, members and events in dictionaries; ``available=False`` makes every call fail (retriable);
    ``stalled=True`` makes every call hang until its ``timeout_s`` (then fail)."""

    def __init__(self, ttl_ms: int, clock: FakeClock | None = None, *, latency_s: float = 0.0) -> None:
        self.ttl_ms = ttl_ms
        self.clock = clock or FakeClock()
        self.latency_s = latency_s
        self.available = True
        self.stalled = False
        self.calls = 0
        self._leases: dict[tuple[str, str], Lease] = {}
        self._members: dict[tuple[str, str], Member] = {}
        self.events: list[HAEvent] = []

    # ---- plumbing ----------------------------------------------------------------------------------
    async def _enter(self, timeout_s: float | None) -> datetime:
        self.calls += 1
        if not self.available:
            raise StatusStoreError("fake store unavailable", retriable=True)
        if self.stalled:
            await asyncio.sleep(timeout_s if timeout_s is not None else 3600)
            raise StatusStoreError(f"fake store call timed out after {timeout_s} s", retriable=True)
        if self.latency_s:
            self.clock.advance(self.latency_s)
        return self.clock.as_datetime()

    def _leave(self) -> None:
        if self.latency_s:
            self.clock.advance(self.latency_s)

    def _ttl(self) -> timedelta:
        return timedelta(milliseconds=self.ttl_ms)

    def _observed(self, lease: Lease, now: datetime) -> Lease:
        return replace(lease, observed_at=now, sent_at_mono=None, valid_until_mono=None, exclusive_until_mono=None)

    def _grant(self, key: tuple[str, str], holder: Holder, epoch: int, now: datetime) -> Lease:
        lease = Lease(
            service=key[0], scope=key[1], holder_server=holder.server, holder_instance=holder.instance,
            holder_endpoint=holder.endpoint, epoch=epoch, acquired_at=now, renewed_at=now,
            expires_at=now + self._ttl(), released_at=None, observed_at=now,
        )
        self._leases[key] = lease
        self._notify(*key)
        return lease

    # ---- leases ---------------------------------------------------------------------------------------
    async def now(self, *, timeout_s: float | None = None) -> datetime:
        now = await self._enter(timeout_s)
        self._leave()
        return now

    async def try_acquire(
        self, service: str, scope: str, holder: Holder, *, timeout_s: float | None = None
    ) -> Lease | None:
        now = await self._enter(timeout_s)
        try:
            cur = self._leases.get((service, scope))
            if cur is not None and cur.expires_at > now:
                return None
            return self._grant((service, scope), holder, (cur.epoch if cur else 0) + 1, now)
        finally:
            self._leave()

    async def try_take_over(
        self, observed: Lease, holder: Holder, stale_ms: int, *, timeout_s: float | None = None
    ) -> Lease | None:
        now = await self._enter(timeout_s)
        try:
            key = (observed.service, observed.scope)
            cur = self._leases.get(key)
            if (
                cur is None
                or cur.epoch != observed.epoch
                or cur.renewed_at != observed.renewed_at
                or cur.renewed_at is None
                or cur.renewed_at > now - timedelta(milliseconds=stale_ms)
            ):
                return None
            return self._grant(key, holder, cur.epoch + 1, now)
        finally:
            self._leave()

    async def renew(self, lease: Lease, *, timeout_s: float | None = None) -> Lease | None:
        now = await self._enter(timeout_s)
        try:
            key = (lease.service, lease.scope)
            cur = self._leases.get(key)
            if cur is None or not _still_held(cur, lease, now):
                return None
            new = replace(cur, renewed_at=now, expires_at=now + self._ttl(), observed_at=now)
            self._leases[key] = new
            return new
        finally:
            self._leave()

    async def release(self, lease: Lease, *, timeout_s: float | None = None) -> bool:
        now = await self._enter(timeout_s)
        try:
            key = (lease.service, lease.scope)
            cur = self._leases.get(key)
            if cur is None or not _still_held(cur, lease, now):
                return False
            self._leases[key] = replace(cur, expires_at=now, released_at=now, observed_at=now)
            self._notify(*key)
            return True
        finally:
            self._leave()

    async def read(self, service: str, scope: str, *, timeout_s: float | None = None) -> Lease | None:
        now = await self._enter(timeout_s)
        try:
            cur = self._leases.get((service, scope))
            return None if cur is None else self._observed(cur, now)
        finally:
            self._leave()

    async def leases(self, service: str, *, timeout_s: float | None = None) -> list[Lease]:
        now = await self._enter(timeout_s)
        try:
            return [self._observed(v, now) for (s, _), v in sorted(self._leases.items()) if s == service]
        finally:
            self._leave()

    def row(self, service: str, scope: str) -> Lease | None:
        """The stored row itself (no copy, ``observed_at`` as last written): for simulations that evaluate a
        fence on it many times (:mod:`pom_ha.chaos.sim`)."""
        return self._leases.get((service, scope))

    def peek(self, service: str, scope: str) -> Lease | None:
        """The current row without going through the (possibly unavailable) call path: for test oracles."""
        cur = self._leases.get((service, scope))
        return None if cur is None else self._observed(cur, self.clock.as_datetime())

    # ---- members and events ---------------------------------------------------------------------------
    async def upsert_member(self, member: Member, *, timeout_s: float | None = None) -> None:
        now = await self._enter(timeout_s)
        try:
            key = (member.service, member.server)
            prev = self._members.get(key)
            started = prev.started_at if prev is not None and prev.instance_id == member.instance_id else now
            self._members[key] = replace(member, started_at=started, seen_at=now)
        finally:
            self._leave()

    async def members(self, service: str, *, timeout_s: float | None = None) -> list[Member]:
        await self._enter(timeout_s)
        try:
            return [m for (s, _), m in sorted(self._members.items()) if s == service]
        finally:
            self._leave()

    async def record_event(self, event: HAEvent, *, timeout_s: float | None = None) -> None:
        await self._enter(timeout_s)
        try:
            self.events.append(event)
        finally:
            self._leave()


def _still_held(cur: Lease, lease: Lease, now: datetime) -> bool:
    """The stored lease is still ``lease``'s holder's, at its epoch, and unexpired (renew and release CAS)."""
    return (
        cur.holder_instance == lease.holder_instance
        and cur.epoch == lease.epoch
        and cur.expires_at > now
    )
