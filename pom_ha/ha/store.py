"""The status store contract: leases, members and HA events, each operation one compare-and-set.

Shape borrowed from Patroni's ``AbstractDCS``: one abstract class, one error type, and the timing rules
here rather than in the heads of implementers.

Clocks
    Every lease timestamp (``acquired_at``, ``renewed_at``, ``expires_at``, ``observed_at``) is on the
    *store's* clock (PostgreSQL ``now()``); a host clock never decides whether a lease is expired.
    The caller's own safety deadline is on ``time.monotonic()``: see :attr:`Lease.valid_until_mono`.

Operations (all CAS, all evaluated on the store clock)
    ``try_acquire``  succeeds only when no lease row exists or it has expired (``expires_at <= now``);
                     bumps ``epoch`` every time, also when the same holder re-acquires after expiry.
    ``try_take_over`` the corroborated early takeover: succeeds only when the lease still has the
                     observed ``epoch`` and ``renewed_at`` and ``renewed_at <= now - stale_ms``;
                     bumps ``epoch``. A master that renewed in between wins.
    ``renew``        keeps ``epoch``; succeeds only when the caller holds that epoch and the lease has
                     not expired; sets ``renewed_at = now``, ``expires_at = now + ttl``.
    ``release``      sets ``expires_at = now`` only when still held (unexpired) by that epoch.
    Acquire, take-over and release notify lease watchers (``subscribe``) with ``(service, scope)``.

Timing rules (who must finish within what)
    * Every call takes ``timeout_s``; an implementation raises :class:`StatusStoreError` with
      ``retriable=True`` no later than shortly after it and abandons the call (it must never hang).
      Callers pass ``min(store_timeout, time left on their lease)``.
    * A caller may act as master only until ``valid_until_mono = sent_at_mono + ttl - safety_margin``,
      where ``sent_at_mono`` is ``time.monotonic()`` taken *before* the call was sent. The store sets
      ``expires_at = now + ttl`` with ``now`` no earlier than the moment it received the call, so the
      lease cannot expire in the store before ``valid_until_mono`` unless clocks drift by more than
      the safety margin over one TTL.
    * A renewal not confirmed by ``valid_until_mono`` means demotion, whatever happens to the call later.
    * An early take-over needs ``renewed_at <= now - stale_ms``; ``renewed_at`` is no earlier than the
      send time, so none can happen before ``sent_at_mono + stale_ms`` (``exclusive_until_mono``, with a
      margin). Past that, a master may only go on while its heartbeat peers confirm they still see it.
    * A failed call (``StatusStoreError``) says nothing about whether the change was applied: the caller
      must read, or treat the lease as lost at ``valid_until_mono``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

MemberState = Literal["MASTER", "DORMANT", "RUNNING", "STOPPED"]
EventKind = Literal["acquired", "took_over", "renewed_late", "released", "expired", "lost", "demoted", "stopped"]
LeaseWatcher = Callable[[str, str], None]


class StatusStoreError(Exception):
    """The store could not answer; ``retriable`` says whether trying again can help."""

    def __init__(self, message: str, *, retriable: bool = True) -> None:
        super().__init__(message)
        self.retriable = retriable


@dataclass(frozen=True)
class Holder:
    """Who holds (or wants) a lease: the POM server, the daemon instance, its heartbeat endpoint."""

    server: str
    instance: str
    endpoint: str | None = None


@dataclass(frozen=True)
class Lease:
    """One lease row as the store returned it, plus the caller's own monotonic deadline.

    ``valid_until_mono`` is set only on leases returned by acquire/take-over/renew: the moment (on this
    process's ``time.monotonic()``) after which the caller must no longer act as master.
    ``exclusive_until_mono`` (earlier) is when a corroborated early take-over becomes possible; past it
    the caller stays master only while its peers confirm by heartbeat that they still see it.
    """

    service: str
    scope: str
    holder_server: str | None
    holder_instance: str | None
    holder_endpoint: str | None
    epoch: int
    acquired_at: datetime | None
    renewed_at: datetime | None
    expires_at: datetime
    released_at: datetime | None
    observed_at: datetime
    sent_at_mono: float | None = None
    valid_until_mono: float | None = None
    exclusive_until_mono: float | None = None

    @property
    def expired(self) -> bool:
        """Expired on the store clock at the time it was read."""
        return self.expires_at <= self.observed_at

    @property
    def released(self) -> bool:
        return self.released_at is not None

    def held_by(self, instance: str) -> bool:
        return self.holder_instance == instance

    def renewals_stopped_ms(self) -> float:
        """How long (store clock) since the last renewal, at the time the row was read."""
        if self.renewed_at is None:
            return float("inf")
        return (self.observed_at - self.renewed_at).total_seconds() * 1000

    def with_deadline(self, sent_at_mono: float, valid_for_s: float, exclusive_for_s: float | None = None) -> Lease:
        exclusive = min(valid_for_s, valid_for_s if exclusive_for_s is None else exclusive_for_s)
        return replace(
            self, sent_at_mono=sent_at_mono, valid_until_mono=sent_at_mono + valid_for_s,
            exclusive_until_mono=sent_at_mono + exclusive,
        )


@dataclass(frozen=True)
class Member:
    """One ``ha_member`` row: a daemon instance of a service on a POM server."""

    service: str
    server: str
    instance_id: str
    state: MemberState
    scopes: tuple[str, ...] = ()
    endpoint: str | None = None
    load: int = 0
    started_at: datetime | None = None
    seen_at: datetime | None = None


@dataclass(frozen=True)
class HAEvent:
    """One ``ha_event`` row. ``age_s`` back-dates an event that waited in a buffer (store clock - age)."""

    service: str
    scope: str
    server: str
    instance_id: str
    kind: EventKind
    epoch: int | None
    decision: str
    detail: dict[str, Any] = field(default_factory=dict)
    age_s: float = 0.0


class StatusStore(ABC):
    """Leases, members and events. Every method may raise :class:`StatusStoreError` (only that)."""

    #: lease time to live applied by acquire/take-over/renew, milliseconds
    ttl_ms: int

    async def start(self) -> None:
        """Open connections/listeners. Must not fail when the backend is down (calls fail instead)."""
        return None

    async def close(self) -> None:
        """Release every resource; idempotent."""
        return None

    @abstractmethod
    async def now(self, *, timeout_s: float | None = None) -> datetime:
        """The store clock."""

    @abstractmethod
    async def try_acquire(
        self, service: str, scope: str, holder: Holder, *, timeout_s: float | None = None
    ) -> Lease | None:
        """Take the lease if absent or expired; bumps the epoch. ``None`` when someone holds it."""

    @abstractmethod
    async def try_take_over(
        self, observed: Lease, holder: Holder, stale_ms: int, *, timeout_s: float | None = None
    ) -> Lease | None:
        """Take a lease *before* expiry: only if ``observed.epoch`` and ``observed.renewed_at`` are unchanged
        and ``renewed_at <= now - stale_ms``. ``None`` otherwise (the master renewed: it wins)."""

    @abstractmethod
    async def renew(self, lease: Lease, *, timeout_s: float | None = None) -> Lease | None:
        """Extend a lease the caller holds; same epoch. ``None`` when lost (expired or taken)."""

    @abstractmethod
    async def release(self, lease: Lease, *, timeout_s: float | None = None) -> bool:
        """Expire the lease now if still held by that epoch; False when it no longer was."""

    @abstractmethod
    async def read(self, service: str, scope: str, *, timeout_s: float | None = None) -> Lease | None:
        """The lease row (``valid_until_mono`` unset), or ``None`` if never acquired."""

    @abstractmethod
    async def leases(self, service: str, *, timeout_s: float | None = None) -> list[Lease]:
        """Every lease row of a service (all scopes)."""

    @abstractmethod
    async def upsert_member(self, member: Member, *, timeout_s: float | None = None) -> None:
        """Insert or update the member row; ``seen_at = now``; ``started_at`` resets when the instance changes."""

    @abstractmethod
    async def members(self, service: str, *, timeout_s: float | None = None) -> list[Member]:
        """Every member row of a service, ordered by server."""

    @abstractmethod
    async def record_event(self, event: HAEvent, *, timeout_s: float | None = None) -> None:
        """Append one HA transition."""

    def subscribe(self, watcher: LeaseWatcher) -> Callable[[], None]:
        """Call ``watcher(service, scope)`` (best effort, from the event loop) when a lease is acquired,
        taken over or released; ``("*", "*")`` after a reconnect, when notifications may have been missed.
        Returns an unsubscribe function."""
        watchers = self._watchers()
        watchers.append(watcher)

        def unsubscribe() -> None:
            if watcher in watchers:
                watchers.remove(watcher)

        return unsubscribe

    def _watchers(self) -> list[LeaseWatcher]:
        found: list[LeaseWatcher] | None = getattr(self, "_lease_watchers", None)
        if found is None:
            found = []
            self._lease_watchers = found
        return found

    def _notify(self, service: str, scope: str) -> None:
        for watcher in list(self._watchers()):
            watcher(service, scope)
