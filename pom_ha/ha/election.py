"""The HA cycle of one elected role (a singleton or one zone): acquire, renew, take over, demote, release.

Every ``renew_interval_ms`` (or at once when woken by a lease NOTIFY or a peer leaving) the elector runs
one cycle and returns a short decision, logged once when it changes:

* dormant: read the lease; acquire it if absent/released/expired; take it over early only when the
  failure is *corroborated* — the master's heartbeat is gone (or it said GOODBYE) AND its ``renewed_at``
  stopped advancing for ``takeover_stale_renewals`` renewal intervals on the database clock; the take-over
  is itself a CAS on the observed (epoch, renewed_at), so a master that renewed in between wins.
* master: renew. The lease is usable until ``valid_until_mono = sent + ttl - safety_margin`` (monotonic,
  from when the renewal was *sent*), and exclusively so until ``exclusive_until_mono = sent + ~stale``:
  an early take-over cannot happen before that. Past it the master goes on only while every heartbeat
  peer has acknowledged a PING recent enough that it cannot have called the master gone yet. A watchdog
  ends the term (cancelling master work) the moment either bound passes without a confirmed renewal —
  before the lease can be anyone else's. A renewal answered "lost" demotes at once. A failed call
  suspends the connection: the role is not master for callers (``is_master`` False) until a renewal is
  confirmed again.
* release (graceful): end the term, release the lease (expires now, NOTIFY through the trigger).

A role never claims mastership without a successful acquire; while the store is unreachable a dormant
retries with backoff (``db_retry_max_backoff_ms``). Every transition is one ``ha_event`` row.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog

from pom_ha.ha.outbox import EventOutbox
from pom_ha.ha.retry import Backoff
from pom_ha.ha.roles import ConnectionState, ElectedRole, RoleState
from pom_ha.ha.settings import HATimings
from pom_ha.ha.store import EventKind, HAEvent, Holder, Lease, StatusStore, StatusStoreError
from pom_ha.ha.term import MasterTerm, NotMaster

log = structlog.get_logger("pom_ha.ha.election")
TermCallback = Callable[[MasterTerm], Awaitable[None] | None]


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


#: schedule ``callback`` after ``delay_s`` on the elector's clock (default: the running loop's call_later)
CallLater = Callable[[float, Callable[[], None]], TimerHandle]


class PeerView(Protocol):
    """What the elector needs from heartbeats (:class:`pom_ha.ha.heartbeat.HeartbeatNode` provides it)."""

    def failure_corroborated(self, instance: str) -> bool:
        """Dormant side: that instance was seen and is gone now (closed, silent, or GOODBYE)."""
        ...

    def stepped_down(self, instance: str) -> bool:
        """Dormant side: that instance is alive and says it is master of nothing (it ended its term)."""
        ...

    def confirmed_until(self) -> float:
        """Master side: monotonic time until which no peer can have called us gone (inf: no peers)."""
        ...


class NoHeartbeats:
    """Without heartbeats a failure is never corroborated (dormants wait for expiry), and nobody can
    take a lease early, so a master's exclusivity lasts until its TTL deadline."""

    def failure_corroborated(self, instance: str) -> bool:
        return False

    def stepped_down(self, instance: str) -> bool:
        return False

    def confirmed_until(self) -> float:
        return float("inf")


class ClaimSpread:
    """Spreads the free leases of one service (its zones) over the daemons that compete for them.

    All electors of one service in one daemon share one instance. A dormant elector that finds its lease
    free claims it at once only when this daemon holds (or is claiming) no other lease of the service;
    otherwise it waits ``claim_spread_ms`` per lease already held, which gives less busy daemons the first
    chance. Takeovers of a failed master are never delayed: the survivor takes every zone (the guide's rule).
    """

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self._members: list[Elector] = []
        self._claiming: set[int] = set()

    def join(self, elector: Elector) -> None:
        self._members.append(elector)

    def load(self, asking: Elector) -> int:
        return sum(1 for e in self._members if e is not asking and (e.is_master or id(e) in self._claiming))

    def claiming(self, elector: Elector, on: bool) -> None:
        if on:
            self._claiming.add(id(elector))
        else:
            self._claiming.discard(id(elector))


_DEADLINE_SLACK_S = 0.001


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


class Elector:
    """Runs the HA cycle of one :class:`SingletonRole` or :class:`ZoneRole` for one daemon instance."""

    def __init__(
        self, store: StatusStore, role: ElectedRole, holder: Holder, timings: HATimings, *,
        peers: PeerView | None = None, clock: Callable[[], float] = time.monotonic,
        call_later: CallLater | None = None, on_event: Callable[[HAEvent], None] | None = None,
        spread: ClaimSpread | None = None, rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.role = role
        self.holder = holder
        self.timings = timings
        self.peers: PeerView = peers or NoHeartbeats()
        self._clock = clock
        self._call_later = call_later
        self._on_event = on_event
        self._spread = spread
        self._free_since: float | None = None
        if spread is not None:
            spread.join(self)
        self.state = RoleState.DORMANT
        self.connection = ConnectionState.CONNECTING
        self.lease: Lease | None = None
        self.term: MasterTerm | None = None
        self.decision = ""
        self.last_epoch = 0
        self.outbox = EventOutbox(clock=clock)
        self._promote_cbs: list[TermCallback] = []
        self._demote_cbs: list[TermCallback] = []
        self._callback_tasks: set[asyncio.Future[Any]] = set()
        self._master_event: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._watchdog: TimerHandle | None = None
        self._next_delay_s: float | None = None
        self._backoff = Backoff(initial_s=timings.renew_interval_s / 2, max_s=timings.db_retry_max_backoff_s)
        if rng is not None:  # a seeded jitter for a deterministic simulation (pom_ha.chaos.sim)
            self._backoff.rng = rng
        self._log = log.bind(server=holder.server, service=role.service, scope=role.scope)

    # ---- public API ---------------------------------------------------------------------------------------
    @property
    def service(self) -> str:
        return self.role.service

    @property
    def scope(self) -> str:
        return self.role.scope

    @property
    def is_master(self) -> bool:
        """Master right now: a live term, a connection not suspended, and the lease still safely ours."""
        term = self.term
        return (
            self.state is RoleState.MASTER
            and term is not None
            and term.active
            and self.connection is ConnectionState.CONNECTED
            and self._clock() < self.safe_until()
        )

    def safe_until(self) -> float:
        """Monotonic time until which no one else can hold the lease: the TTL deadline, or earlier the
        exclusivity bound unless heartbeat peers confirm they still see us. ``-inf`` when not master."""
        lease = self.lease
        if self.state is not RoleState.MASTER or lease is None or lease.valid_until_mono is None:
            return float("-inf")
        exclusive = lease.exclusive_until_mono if lease.exclusive_until_mono is not None else lease.valid_until_mono
        return min(lease.valid_until_mono, max(exclusive, self.peers.confirmed_until()))

    @property
    def epoch(self) -> int | None:
        """The epoch of the current term, ``None`` when not master."""
        return self.lease.epoch if self.state is RoleState.MASTER and self.lease is not None else None

    def on_promote(self, callback: TermCallback) -> None:
        """``callback(term)`` after each promotion (run as a task; tasks it starts via ``term.create_task``
        are cancelled on demotion)."""
        self._promote_cbs.append(callback)

    def on_demote(self, callback: TermCallback) -> None:
        """``callback(term)`` after each demotion or release; ``term.end_reason`` says why."""
        self._demote_cbs.append(callback)

    async def wait_master(self) -> MasterTerm:
        """Wait until master (and not suspended); returns the current term."""
        while True:
            if self.is_master and self.term is not None:
                return self.term
            await self._master_flag().wait()
            if not self.is_master:
                self._master_flag().clear()

    def master_scope(self) -> MasterTerm:
        """The current term, to use as ``async with role.master_scope() as term``; raises NotMaster."""
        if self.term is None or not self.is_master:
            raise NotMaster(f"{self.role.label}: not master ({self.decision})")
        return self.term

    def wake(self) -> None:
        """Run the next cycle now (a lease NOTIFY or a peer change arrived)."""
        self._wake_flag().set()

    def claim_now(self) -> None:
        """Claim the lease at the next cycle if it is free, without the spread's wait (e.g. a zone whose home
        is this server was handed back), and run that cycle now."""
        self._free_since = float("-inf")  # the spread measures "free for how long" from here
        self.wake()

    def use_spread(self, spread: ClaimSpread) -> None:
        """Decide claims of a free lease with ``spread`` from now on (a service's own claim policy, installed
        before the first cycle)."""
        self._spread = spread

    @property
    def next_delay_s(self) -> float:
        """Seconds the last cycle asked to wait before the next one (the renew interval unless it said
        otherwise). :meth:`run` waits this long or until :meth:`wake`; a simulation driving
        :meth:`run_cycle` on a virtual clock does the same."""
        return self._next_delay_s if self._next_delay_s is not None else self.timings.renew_interval_s

    # ---- the cycle ---------------------------------------------------------------------------------------
    async def run_cycle(self) -> str:
        """One HA cycle; returns the decision."""
        self._next_delay_s = None
        if self.state is RoleState.STOPPED:
            return self._decide("no action: stopped")
        self.check_deadline()
        if self.state is RoleState.MASTER:
            decision = await self._master_cycle()
        else:
            decision = await self._dormant_cycle()
        if len(self.outbox):
            await self.outbox.flush(self.store, self.timings.store_timeout_s)
        return self._decide(decision)

    def check_deadline(self) -> bool:
        """Demote now if the lease may no longer be safely ours (see :meth:`safe_until`). True if it demoted."""
        lease = self.lease
        if self.state is not RoleState.MASTER or lease is None or lease.valid_until_mono is None:
            return False
        now = self._clock()
        # within a millisecond of the bound counts as past it: a timer may fire a hair early (the loop's
        # clock resolution, float rounding of "now + delay"), and re-arming for the remaining nanoseconds
        # would spin; demoting 1 ms early is always safe
        if now < self.safe_until() - _DEADLINE_SLACK_S:
            return False
        sent = lease.sent_at_mono or now
        detail = {"last_confirmed_renewal_sent_ms_ago": _ms(now - sent)}
        if now >= lease.valid_until_mono:
            self._demote("demoted", f"demoted: renewal not confirmed within {self.timings.valid_for_s:.1f} s", detail)
        else:
            self._demote(
                "demoted", "demoted: renewals unconfirmed and heartbeat peers cannot vouch for us, "
                "an early takeover is possible", detail,
            )
        if self.connection is ConnectionState.SUSPENDED:
            self.connection = ConnectionState.LOST
        return True

    async def _master_cycle(self) -> str:
        lease = self.lease
        assert lease is not None and lease.valid_until_mono is not None
        sent = self._clock()
        timeout = min(self.timings.store_timeout_s, lease.valid_until_mono - sent)
        try:
            renewed = await self.store.renew(lease, timeout_s=timeout)
        except StatusStoreError as exc:
            self.connection = ConnectionState.SUSPENDED
            self._master_flag().clear()
            if self.check_deadline():
                return self.decision
            self._next_delay_s = min(self.timings.renew_interval_s, max(0.0, lease.valid_until_mono - sent))
            return f"master suspended: renewal failed ({_reason(exc)}), demoting at the lease deadline unless renewed"
        now = self._clock()
        if self.state is not RoleState.MASTER or self.lease is not lease:
            # the watchdog demoted us while the call was in flight: give the lease back to the others
            if renewed is not None:
                await self._release_quietly(renewed)
            return self.decision
        if renewed is None:
            holder = await self._current_holder()
            self._demote("lost", f"demoted: lease lost{holder}", {"epoch": lease.epoch})
            return self.decision
        if now >= lease.valid_until_mono or now >= sent + self.timings.valid_for_s:
            self._demote(
                "demoted", f"demoted: renewal not confirmed within {self.timings.valid_for_s:.1f} s",
                {"renewal_round_trip_ms": _ms(now - sent)},
            )
            await self._release_quietly(renewed)
            return self.decision
        was_suspended = self.connection is not ConnectionState.CONNECTED
        gap = sent - (lease.sent_at_mono or sent)
        self.connection = ConnectionState.CONNECTED
        self.lease = renewed.with_deadline(sent, self.timings.valid_for_s, self.timings.exclusive_for_s)
        self._arm_watchdog()
        self._master_flag().set()
        if was_suspended or gap > 2 * self.timings.renew_interval_s:
            self._event("renewed_late", f"renewed late (epoch {lease.epoch}): {gap:.1f} s since the last renewal",
                        {"gap_ms": _ms(gap), "was_suspended": was_suspended})
        self._next_delay_s = max(0.0, sent + self.timings.renew_interval_s - now)
        return f"no action: master (epoch {lease.epoch}), lease renewed"

    async def _dormant_cycle(self) -> str:
        store_timeout = self.timings.store_timeout_s
        try:
            cur = await self.store.read(self.service, self.scope, timeout_s=store_timeout)
            self.connection = ConnectionState.CONNECTED
            self._backoff.reset()
            if cur is not None and cur.held_by(self.holder.instance) and not cur.expired:
                # a renewal of ours confirmed too late, or our previous run: unusable, free it for everyone
                await self._release_quietly(cur)
                return f"no action: dormant, released a stale lease of this instance (epoch {cur.epoch})"
            if cur is None or cur.expired:
                if (wait := self._spread_wait()) > 0:
                    self._next_delay_s = min(wait, self.timings.renew_interval_s)
                    return f"no action: dormant, lease free, leaving it {wait:.1f} s to less busy instances"
                sent = self._clock()
                if self._spread is not None:
                    self._spread.claiming(self, True)
                try:
                    won = await self.store.try_acquire(
                        self.service, self.scope, self.holder, timeout_s=store_timeout
                    )
                finally:
                    if self._spread is not None:
                        self._spread.claiming(self, False)
                self._free_since = None
                if won is None:
                    return "no action: dormant, another instance acquired the free lease first"
                return self._promote(won, sent, cur, took_over=False)
            self._free_since = None
            master = cur.holder_server or "?"
            stopped_ms = cur.renewals_stopped_ms()
            holder = cur.holder_instance or ""
            gone = self.peers.failure_corroborated(holder)
            stepped_down = not gone and self.peers.stepped_down(holder)
            if (gone or stepped_down) and stopped_ms >= self.timings.takeover_stale_ms:
                sent = self._clock()
                won = await self.store.try_take_over(
                    cur, self.holder, self.timings.takeover_stale_ms, timeout_s=store_timeout
                )
                if won is None:
                    return f"no action: dormant, early takeover refused, master {master} renewed in time"
                why = "gone" if gone else "stepped down (cut from the status store?)"
                return self._promote(won, sent, cur, took_over=True, why=why)
            if gone:
                self._next_delay_s = min(
                    self.timings.renew_interval_s, max(0.0, (self.timings.takeover_stale_ms - stopped_ms) / 1000)
                )
                return f"no action: dormant, master {master} gone from heartbeats, waiting for its renewals to stop"
            return f"no action: dormant, master {master} healthy"
        except StatusStoreError as exc:
            self.connection = ConnectionState.SUSPENDED
            self._next_delay_s = self._backoff.next_delay()
            return f"no action: status store unreachable ({_reason(exc)}), not claiming mastership"

    def _spread_wait(self) -> float:
        """Seconds this elector still leaves a free lease to less busy daemons (0: claim it now)."""
        if self._spread is None:
            return 0.0
        held = self._spread.load(self)
        now = self._clock()
        if held == 0:
            return 0.0
        if self._free_since is None:
            self._free_since = now
        return max(0.0, self._free_since + held * self._spread.step_s - now)

    # ---- transitions --------------------------------------------------------------------------------------
    def _promote(self, won: Lease, sent: float, prev: Lease | None, *, took_over: bool,
                 why: str = "gone") -> str:
        now = self._clock()
        lease = won.with_deadline(sent, self.timings.valid_for_s, self.timings.exclusive_for_s)
        assert lease.valid_until_mono is not None
        if now >= lease.valid_until_mono:
            self.lease = None
            return "no action: dormant, lease acquired too late to use it, it will expire"
        if won.epoch <= self.last_epoch:
            self._log.error("BUG: epoch did not grow", epoch=won.epoch, previous=self.last_epoch)
        self.last_epoch = max(self.last_epoch, won.epoch)
        self.lease = lease
        self.state = RoleState.MASTER
        self.connection = ConnectionState.CONNECTED
        self.term = MasterTerm(self.service, self.scope, won.epoch)
        self._arm_watchdog()
        detail: dict[str, Any] = {"acquire_round_trip_ms": _ms(now - sent)}
        gap = ""
        if prev is not None and prev.holder_server is not None:
            detail.update(previous_server=prev.holder_server, previous_instance=prev.holder_instance,
                          previous_epoch=prev.epoch, previous_released=prev.released)
            if prev.renewed_at is not None and won.acquired_at is not None:
                detail["gap_ms"] = _ms((won.acquired_at - prev.renewed_at).total_seconds())
        if took_over and prev is not None:
            stopped = prev.renewals_stopped_ms() / 1000
            decision = (f"took over {self.role.label}: master {prev.holder_server} {why}, "
                        f"renewals stopped {stopped:.1f} s (epoch {won.epoch})")
            self._event("took_over", decision, detail)
        else:
            if prev is not None and prev.holder_server is not None and not prev.released:
                self._event("expired", f"lease of {prev.holder_server} (epoch {prev.epoch}) expired",
                            dict(detail), epoch=prev.epoch)
                gap = f": lease of {prev.holder_server} expired"
            elif prev is not None and prev.holder_server is not None:
                gap = f": {prev.holder_server} released it"
            decision = f"acquired lease as master (epoch {won.epoch}){gap}"
            self._event("acquired", decision, detail)
        self._master_flag().set()
        self._fire(self._promote_cbs, self.term)
        return decision

    def _demote(self, kind: EventKind, decision: str, detail: dict[str, Any]) -> None:
        """Stop master work now (synchronously): cancel the term's tasks, then record and announce it."""
        term, lease = self.term, self.lease
        self.state = RoleState.DORMANT
        self.term = None
        self.lease = None
        self._master_flag().clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if term is not None:
            term.end(decision)
        self._event(kind, decision, detail, epoch=lease.epoch if lease else None)
        self._decide(decision)
        if term is not None:
            self._fire(self._demote_cbs, term)

    async def release(self, reason: str = "graceful stop") -> bool:
        """Give up mastership: end the term (waiting for its tasks), release the lease. True if released."""
        lease, term = self.lease, self.term
        if self.state is not RoleState.MASTER or lease is None or term is None:
            return False
        assert lease.valid_until_mono is not None
        term.end(f"released: {reason}")
        self._master_flag().clear()
        await term.wait_tasks(timeout_s=max(0.0, lease.valid_until_mono - self._clock()))
        released = False
        with contextlib.suppress(StatusStoreError):
            released = await self.store.release(
                lease, timeout_s=max(0.001, min(self.timings.store_timeout_s, lease.valid_until_mono - self._clock()))
            )
        decision = f"released lease (epoch {lease.epoch}): {reason}"
        if self.lease is lease:
            self._demote("released", decision, {"confirmed": released})
        else:  # the deadline passed while the term's tasks were finishing: already demoted
            self._event("released", decision, {"confirmed": released, "after_demotion": True}, epoch=lease.epoch)
        return released

    async def stop(self, reason: str = "graceful stop") -> None:
        """Release if master, then stop cycling; writes the pending events (best effort)."""
        if self.state is RoleState.MASTER:
            await self.release(reason)
        else:
            self._event("stopped", f"stopped: {reason}", {})
        self.state = RoleState.STOPPED
        self.wake()
        with contextlib.suppress(StatusStoreError):
            await self.outbox.flush(self.store, self.timings.store_timeout_s)

    # ---- the loop --------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Cycle until stopped: every renew interval, at once on :meth:`wake`."""
        wake = self._wake_flag()
        while self.state is not RoleState.STOPPED:
            wake.clear()
            await self.run_cycle()
            delay = self.next_delay_s
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await wake.wait()

    # ---- helpers --------------------------------------------------------------------------------------------
    def _arm_watchdog(self) -> None:
        """Demote exactly when the lease stops being safely ours, even while a cycle is stuck in a call."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        until = self.safe_until()
        if until == float("-inf"):
            return
        call_later = self._call_later
        if call_later is None:
            try:
                call_later = asyncio.get_running_loop().call_later
            except RuntimeError:
                return
        self._watchdog = call_later(max(0.0, until - self._clock()), self._deadline)

    def _deadline(self) -> None:
        self._watchdog = None
        if not self.check_deadline():
            self._arm_watchdog()  # heartbeat acknowledgements moved the bound: look again then
        self.wake()

    async def _release_quietly(self, lease: Lease) -> None:
        with contextlib.suppress(StatusStoreError):
            await self.store.release(lease, timeout_s=self.timings.store_timeout_s)

    async def _current_holder(self) -> str:
        try:
            cur = await self.store.read(self.service, self.scope, timeout_s=self.timings.store_timeout_s)
        except StatusStoreError:
            return ""
        if cur is None or cur.expired or cur.holder_server is None:
            return " (expired)"
        return f" to {cur.holder_server} (epoch {cur.epoch})"

    def _event(self, kind: EventKind, decision: str, detail: dict[str, Any], *, epoch: int | None = None) -> None:
        event = HAEvent(
            service=self.service, scope=self.scope, server=self.holder.server, instance_id=self.holder.instance,
            kind=kind, epoch=epoch if epoch is not None else (self.lease.epoch if self.lease else None),
            decision=decision, detail=detail,
        )
        self.outbox.add(event)
        if self._on_event is not None:
            self._on_event(event)

    def _decide(self, decision: str) -> str:
        if decision != self.decision:
            self.decision = decision
            self._log.info(decision, role_state=self.state.value, connection=self.connection.value,
                           epoch=self.epoch)
        return decision

    def _fire(self, callbacks: list[TermCallback], term: MasterTerm) -> None:
        for cb in callbacks:
            try:
                result = cb(term)
            except Exception:
                self._log.exception("role callback failed", callback=getattr(cb, "__name__", repr(cb)))
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._callback_tasks.add(task)
                task.add_done_callback(self._callback_done)

    def _callback_done(self, task: asyncio.Future[Any]) -> None:
        self._callback_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("role callback failed", exc_info=task.exception())

    def _master_flag(self) -> asyncio.Event:
        if self._master_event is None:
            self._master_event = asyncio.Event()
        return self._master_event

    def _wake_flag(self) -> asyncio.Event:
        if self._wake is None:
            self._wake = asyncio.Event()
        return self._wake


def _reason(exc: StatusStoreError) -> str:
    text = str(exc)
    return text if len(text) <= 80 else text[:77] + "..."
