"""One simulated deployment: the real electors of N daemon instances, the fake status store, a network and
heartbeats between them, the masters' side effects, random faults, and the invariants judged on the way.

What is real (imported from :mod:`pom_ha.ha`, unchanged): :class:`Elector` (acquire, renew, early
take-over, watchdog, ``safe_until``, ``is_master``, ``master_scope``, release, event outbox),
:class:`MasterTerm`, :class:`FakeStatusStore` (the CAS rules of the store contract on the store clock),
:class:`EpochGate` and :class:`EpochEnvelope` (message fencing), :class:`LeaseFence` (the fenced write's
predicate, evaluated on the store's row at the moment the write lands), :class:`HATimings`.

What is modelled here: the network (delay, loss, partitions of each node from the store and from its
peers), processes (crash = new instance, pause = SIGSTOP with timers run late on resume), per-host
monotonic clocks with their own origin and rate (drift), and heartbeats as contact between running,
connected nodes (a peer is gone after ``heartbeat_dead_after_s`` of silence on the observer's clock, at
once when it crashed; a master is vouched for until its last contact plus ``heartbeat_fresh_s`` on its own
clock) — the contact model of ``tests/unit/test_ha_state_machine.py``, answered through the elector's
:class:`~pom_ha.ha.election.PeerView` seam.

Invariants (per schedule):

* ``overlap:<sink>`` — on each of three sinks (``dial``: the master's own unfenced side effect, accepted
  the moment it acts; ``db``: a fenced write, accepted when it lands if the fence holds; ``event``: an
  enveloped message, accepted by the receiver's gate), no side effect of an older epoch is accepted
  after one of a newer epoch: the epochs' accepted intervals never overlap;
* ``no_master`` — after every heal, some running node is master within :func:`recovery_bound_s`;
* ``exception`` — the code under test never raises.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pom_ha.chaos.sim.bugs import SafeUntilDebugReturn
from pom_ha.chaos.sim.loop import SimClock, SimFuture, SimTask, SimTimer, run_now
from pom_ha.ha.election import Elector
from pom_ha.ha.fake_store import FakeStatusStore
from pom_ha.ha.fencing import EpochEnvelope, EpochGate, LeaseFence
from pom_ha.ha.roles import RoleState, SingletonRole
from pom_ha.ha.settings import HATimings
from pom_ha.ha.store import HAEvent, Holder, Lease, Member, StatusStore, StatusStoreError
from pom_ha.ha.term import MasterTerm, NotMaster

ROLE = SingletonRole("sim_role")
FAULT_KINDS = ("crash", "pause", "store_cut", "peer_cut", "cut_both", "delay", "loss")
SINKS = ("dial", "db", "event")
_NORMAL_DELAY = (0.0002, 0.003)


@dataclass(frozen=True)
class SimConfig:
    """The shape of every schedule (timings are the shipped defaults unless given)."""

    timings: HATimings = field(default_factory=HATimings)
    nodes: int = 3
    episodes: tuple[int, int] = (1, 2)
    fault_hold_s: tuple[float, float] = (0.05, 3.5)
    quiet_s: tuple[float, float] = (0.0, 0.5)
    #: the master's duty interval (its own clock): each tick places one dial, one fenced write, one event
    work_interval_s: float = 0.15
    #: clock rate error bound (|rate - 1|); default: :func:`drift_bound`
    max_drift: float | None = None
    max_delay_s: float = 1.5
    #: chance a fault targets the current master's node
    target_master: float = 0.6

    @property
    def drift(self) -> float:
        return drift_bound(self.timings) if self.max_drift is None else self.max_drift


def drift_bound(t: HATimings) -> float:
    """The clock rate error the timings tolerate, the tightest of the margins the HA core relies on:

    * lease: a renewal's deadline ``ttl - safety_margin`` on a slow host must fall before ``ttl`` on the
      store clock: ``rate >= (ttl - margin) / ttl``;
    * early take-over: ``exclusive_for`` on a slow master's clock must pass before ``takeover_stale`` on
      the store clock;
    * heartbeats: a master (slow) vouched for ``heartbeat_fresh`` after contact must stop before a peer
      (fast) calls it gone after ``heartbeat_dead_after`` of silence.

    Half the tightest is used, so two hosts drifting in opposite directions stay inside it.
    """
    lease = t.safety_margin_ms / t.lease_ttl_ms
    exclusive = 1 - t.exclusive_for_s / (t.takeover_stale_ms / 1000)
    heartbeat = (t.heartbeat_dead_after_s - t.heartbeat_fresh_s) / (t.heartbeat_dead_after_s + t.heartbeat_fresh_s)
    return min(lease, exclusive, heartbeat) / 2


def recovery_bound_s(t: HATimings, drift: float) -> float:
    """Longest a correct deployment may stay without a master once every fault is healed: the old lease
    expires (``ttl``) or a dormant's store backoff ends (``db_retry_max_backoff``), then one cycle and an
    acquire round trip (two store timeouts), all on clocks up to ``drift`` slow, plus the longest delay a
    message sent before the heal may still be in flight."""
    local = max(t.lease_ttl_s, t.db_retry_max_backoff_s) + t.renew_interval_s + 2 * t.store_timeout_s
    return local / (1 - drift) + 0.1


@dataclass
class Violation:
    kind: str
    at_s: float
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "at_s": round(self.at_s, 6), "detail": self.detail}


@dataclass
class Net:
    """One node's network to the store and to the message receiver."""

    cut: bool = False
    delay: tuple[float, float] = _NORMAL_DELAY
    loss: float = 0.0


class SimElector(Elector):
    """The real elector; ``wake`` (lease NOTIFY, watchdog, peer change) also reaches the simulated loop."""

    sim_node: SimNode

    def wake(self) -> None:
        super().wake()
        self.sim_node.woken()


class _BuggySafeUntil(SafeUntilDebugReturn, SimElector):
    pass


class SimLink(StatusStore):
    """One node's path to the shared fake store: each call is a request and a reply on the simulated
    network, evaluated by the real fake store when (if) the request lands, and failing with
    ``StatusStoreError`` at the caller's timeout (on its clock) when either is lost or late."""

    def __init__(self, node: SimNode) -> None:
        self.node = node
        self.world = node.world
        self.ttl_ms = node.world.store.ttl_ms

    async def _call(self, op: Callable[[], Any], timeout_s: float | None) -> Any:
        fut = SimFuture()
        world, node = self.world, self.node
        now = world.clock.now_s
        timeout = world.timings.store_timeout_s if timeout_s is None else max(0.0, timeout_s)
        deadline = now + timeout / node.rate
        net = node.net

        def timed_out() -> None:
            fut.set_error(StatusStoreError(f"simulated store call timed out after {timeout:.3f} s"))

        def land() -> None:
            if node.net.cut:
                world.clock.call_later(max(0.0, deadline - world.clock.now_s), timed_out)
                return
            try:
                result: Any = op()
                error: BaseException | None = None
            except StatusStoreError as exc:
                result, error = None, exc
            if node.net.delay is _NORMAL_DELAY and node.net.loss == 0.0 and world.clock.now_s <= deadline:
                # a healthy link: the request's delay was the round trip, the reply lands with it
                if error is not None:
                    fut.set_error(error)
                else:
                    fut.set_result(result)
                return
            reply_at = world.clock.now_s + world.delay(node.net)
            if node.net.cut or world.lost(node.net) or reply_at > deadline:
                world.clock.call_later(max(0.0, deadline - world.clock.now_s), timed_out)
            elif error is not None:
                world.clock.call_later(reply_at - world.clock.now_s, lambda: fut.set_error(error))
            else:
                world.clock.call_later(reply_at - world.clock.now_s, lambda: fut.set_result(result))

        if net.cut or world.lost(net):
            world.clock.call_later(timeout / node.rate, timed_out)
        else:
            world.clock.call_later(world.delay(net), land)
        return await fut

    async def now(self, *, timeout_s: float | None = None) -> Any:
        store = self.world.store
        return await self._call(lambda: run_now(store.now()), timeout_s)

    async def try_acquire(self, service: str, scope: str, holder: Holder, *, timeout_s: float | None = None
                          ) -> Lease | None:
        store = self.world.store
        result: Lease | None = await self._call(lambda: run_now(store.try_acquire(service, scope, holder)), timeout_s)
        return result

    async def try_take_over(self, observed: Lease, holder: Holder, stale_ms: int, *, timeout_s: float | None = None
                            ) -> Lease | None:
        store = self.world.store
        result: Lease | None = await self._call(
            lambda: run_now(store.try_take_over(observed, holder, stale_ms)), timeout_s
        )
        return result

    async def renew(self, lease: Lease, *, timeout_s: float | None = None) -> Lease | None:
        store = self.world.store
        result: Lease | None = await self._call(lambda: run_now(store.renew(lease)), timeout_s)
        return result

    async def release(self, lease: Lease, *, timeout_s: float | None = None) -> bool:
        store = self.world.store
        result: bool = await self._call(lambda: run_now(store.release(lease)), timeout_s)
        return result

    async def read(self, service: str, scope: str, *, timeout_s: float | None = None) -> Lease | None:
        store = self.world.store
        result: Lease | None = await self._call(lambda: run_now(store.read(service, scope)), timeout_s)
        return result

    async def leases(self, service: str, *, timeout_s: float | None = None) -> list[Lease]:
        store = self.world.store
        result: list[Lease] = await self._call(lambda: run_now(store.leases(service)), timeout_s)
        return result

    async def upsert_member(self, member: Member, *, timeout_s: float | None = None) -> None:
        store = self.world.store
        await self._call(lambda: run_now(store.upsert_member(member)), timeout_s)

    async def members(self, service: str, *, timeout_s: float | None = None) -> list[Member]:
        store = self.world.store
        result: list[Member] = await self._call(lambda: run_now(store.members(service)), timeout_s)
        return result

    async def record_event(self, event: HAEvent, *, timeout_s: float | None = None) -> None:
        # the event rows are history, not state: deliver them without counting them in the simulation's cost
        await self._call(lambda: None, timeout_s)


class SimPeers:
    """One node's heartbeat view (the elector's ``PeerView``) from the world's contact model."""

    def __init__(self, node: SimNode) -> None:
        self.node = node
        self.world = node.world

    def _find(self, instance: str) -> SimNode | None:
        for other in self.world.nodes:
            if other.instance == instance:
                return other
        return None

    def failure_corroborated(self, instance: str) -> bool:
        world, me = self.world, self.node
        if instance not in me.seen:
            return False  # a peer never seen corroborates nothing
        other = self._find(instance)
        if other is None or other.crashed:
            return True  # its connections were reset
        silent = world.clock.now_s - world.contact(me, other)
        return silent * me.rate > world.dead_after_s

    def stepped_down(self, instance: str) -> bool:
        world, me = self.world, self.node
        other = self._find(instance)
        if other is None or other.crashed or instance not in me.seen:
            return False
        if world.in_contact(me, other):
            return not other.has_live_term()
        silent = world.clock.now_s - world.contact(me, other)
        if silent * me.rate > world.dead_after_s:
            return False
        return world.last_flag.get((me.index, other.index)) is False

    def confirmed_until(self) -> float:
        world, me = self.world, self.node
        until = float("inf")
        for other in world.nodes:
            if other is me:
                continue
            last = world.contact(me, other)
            if last == float("-inf"):
                return float("-inf")  # a listed peer that never acknowledged a PING
            until = min(until, me.mono_at(last) + world.fresh_s)
        return until


class SimNode:
    """One daemon instance slot: a process (restarted with a new instance id after a crash), its clock,
    its network, its elector cycle loop and, while master, its duty loop."""

    def __init__(self, world: World, index: int, rate: float) -> None:
        self.world = world
        self.index = index
        self.rate = rate
        self.origin = 1000.0 * index - 377.0  # each host's monotonic clock has its own origin
        self.net = Net()
        self.gen = 0
        self.instance = f"pom{index + 1}-0"
        self.paused = False
        self.crashed = False
        self.deferred: list[Callable[[], None]] = []
        self.seen: set[str] = set()
        self.cycle: SimTask | None = None
        self.cycle_timer: SimTimer | None = None
        self.wake_pending = False
        self.elector = self._new_elector()

    # ---- clock and timers -------------------------------------------------------------------------
    def mono(self) -> float:
        return self.origin + self.world.clock.now_s * self.rate

    def mono_at(self, t: float) -> float:
        return self.origin + t * self.rate

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> SimTimer:
        gen = self.gen
        return self.world.clock.call_later(max(0.0, delay_s) / self.rate, lambda: self.run(gen, callback))

    def run(self, gen: int, callback: Callable[[], None]) -> None:
        """Run ``callback`` in this process now: later if paused (SIGCONT runs overdue work), never if the
        process it belonged to is gone."""
        if gen != self.gen or self.crashed:
            return
        if self.paused:
            self.deferred.append(callback)
        else:
            callback()

    @property
    def running(self) -> bool:
        return not self.paused and not self.crashed

    def has_live_term(self) -> bool:
        term = self.elector.term
        return term is not None and term.active

    # ---- the process ---------------------------------------------------------------------------------
    def _new_elector(self) -> SimElector:
        world = self.world
        holder = Holder(f"pom{self.index + 1}", self.instance, f"10.0.0.{self.index + 1}:7000")
        cls = _BuggySafeUntil if "safe_until_debug_return" in world.bugs else SimElector
        elector = cls(
            SimLink(self), ROLE, holder, world.timings, peers=SimPeers(self), clock=self.mono,
            call_later=self.call_later, on_event=self._on_event if world.tracing else None,
            rng=random.Random(world.rng.getrandbits(64)),
        )
        elector.sim_node = self
        elector.on_promote(self._promoted)
        return elector

    def start(self, delay_s: float) -> None:
        self.cycle_timer = self.call_later(delay_s, self.start_cycle)

    def start_cycle(self) -> None:
        self.cycle_timer = None
        self.wake_pending = False
        gen = self.gen
        task = SimTask(self.elector.run_cycle(), lambda step: self.run(gen, step), self._cycle_done)
        self.cycle = task
        task.step()

    def _cycle_done(self, _decision: object, error: BaseException | None) -> None:
        self.cycle = None
        if error is not None:
            self.world.violate("exception", f"node {self.index + 1}: run_cycle raised {error!r}")
            return
        self.world.after_cycle()
        if self.elector.state is RoleState.STOPPED:
            return
        self.cycle_timer = self.call_later(0.0 if self.wake_pending else self.elector.next_delay_s, self.start_cycle)

    def woken(self) -> None:
        """``Elector.run`` semantics: a wake during a cycle makes the next one start at once."""
        if self.cycle is not None:
            self.wake_pending = True
        elif self.cycle_timer is not None:
            self.cycle_timer.cancel()
            self.cycle_timer = self.call_later(0.0, self.start_cycle)

    def _on_event(self, event: HAEvent) -> None:
        self.world.log(f"node {self.index + 1} ({self.instance}) {event.kind} epoch {event.epoch}: {event.decision}")

    # ---- master duties: a term-bound loop, as a daemon's TermContext.every --------------------------
    def _promoted(self, term: MasterTerm) -> None:
        self.call_later(self.world.work_interval, lambda: self._work(term))

    def _work(self, term: MasterTerm) -> None:
        if not term.active:
            return  # the term ended: its tasks are cancelled
        try:
            scope = self.elector.master_scope()
        except NotMaster:
            scope = None
        if scope is not None and scope.epoch == term.epoch:
            self.world.side_effects(self, term.epoch)
        self.call_later(self.world.work_interval, lambda: self._work(term))

    # ---- faults ----------------------------------------------------------------------------------------
    def crash(self) -> None:
        self.crashed = True
        if self.cycle is not None:
            self.cycle.kill()
            self.cycle = None
        if self.cycle_timer is not None:
            self.cycle_timer.cancel()
            self.cycle_timer = None
        term = self.elector.term
        if term is not None:
            term.end("process killed")  # its tasks die with it (nothing else of it runs again)
        self.deferred = []
        self.gen += 1
        self.instance = f"pom{self.index + 1}-{self.gen}"

    def restart(self) -> None:
        self.crashed = False
        self.paused = False
        self.deferred = []
        self.seen = set()
        self.elector = self._new_elector()
        self.start(self.world.rng.uniform(0.0, 0.05))

    def resume(self) -> None:
        # overdue timers and replies run first, while the node still hears nothing new (contact is frozen
        # until it is running again); whatever they defer in turn runs too
        for _ in range(1000):
            if not self.deferred:
                break
            deferred, self.deferred = self.deferred, []
            for callback in deferred:
                callback()
        self.paused = False


class Sink:
    """Where side effects are accepted; judges that no older epoch is accepted after a newer one."""

    def __init__(self, world: World, name: str) -> None:
        self.world = world
        self.name = name
        self.highest = 0
        self.highest_first: tuple[float, int] = (0.0, 0)
        self.accepted = 0

    def accept(self, epoch: int, node: SimNode) -> None:
        now = self.world.clock.now_s
        self.accepted += 1
        if epoch > self.highest:
            self.highest = epoch
            self.highest_first = (now, node.index)
        elif epoch < self.highest:
            at, by = self.highest_first
            self.world.violate(
                f"overlap:{self.name}",
                f"{self.name}: epoch {epoch} (node {node.index + 1}) accepted at {self.world.rel(now):.3f} s, after "
                f"epoch {self.highest} (node {by + 1}) was accepted at {self.world.rel(at):.3f} s",
            )


@dataclass
class ScheduleResult:
    seed: int
    violations: list[Violation]
    faults: int
    episodes: int
    recoveries_s: list[float]
    simulated_s: float
    accepted: dict[str, int]
    trace: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "violations": [v.to_json() for v in self.violations], "faults": self.faults,
            "episodes": self.episodes, "recoveries_s": [round(r, 4) for r in self.recoveries_s],
            "simulated_s": round(self.simulated_s, 3), "accepted": self.accepted, "trace": self.trace,
        }


class World:
    def __init__(self, seed: int, config: SimConfig, bugs: frozenset[str], tracing: bool) -> None:
        self.seed = seed
        self.config = config
        self.timings = config.timings
        self.work_interval = config.work_interval_s
        self.bugs = bugs
        self.tracing = tracing
        self.trace: list[str] = []
        self.rng = random.Random(seed)
        self._random = self.rng.random
        self.clock = SimClock(start_s=1_000.0)
        self.t0 = self.clock.now_s
        self.store = FakeStatusStore(self.timings.lease_ttl_ms, self.clock)
        self.store.subscribe(self._notified)
        self.drift = config.drift
        self.bound = recovery_bound_s(self.timings, self.drift)
        self.dead_after_s = self.timings.heartbeat_dead_after_s
        self.fresh_s = self.timings.heartbeat_fresh_s
        self.violations: list[Violation] = []
        self.hb_cut: set[int] = set()
        self.last_contact: dict[tuple[int, int], float] = {}
        self.last_flag: dict[tuple[int, int], bool] = {}
        self.sinks = {name: Sink(self, name) for name in SINKS}
        self.gate = EpochGate()
        self.heal_at: float | None = None
        self.recoveries: list[float] = []
        self.faults = 0
        self.nodes: list[SimNode] = []
        for i in range(config.nodes):
            rate = 1.0 + self.rng.uniform(-self.drift, self.drift)
            self.nodes.append(SimNode(self, i, rate))
        self.refresh_contacts()

    # ---- plumbing -------------------------------------------------------------------------------------
    def rel(self, t: float) -> float:
        return t - self.t0

    def log(self, text: str) -> None:
        if self.tracing:
            self.trace.append(f"{self.rel(self.clock.now_s):9.4f} {text}")

    def delay(self, net: Net) -> float:
        lo, hi = net.delay
        return lo + (hi - lo) * self._random()

    def lost(self, net: Net) -> bool:
        return net.loss > 0.0 and self._random() < net.loss

    def violate(self, kind: str, detail: str) -> None:
        self.violations.append(Violation(kind, self.rel(self.clock.now_s), detail))
        self.log(f"VIOLATION {kind}: {detail}")

    # ---- heartbeats as contact ------------------------------------------------------------------------
    def in_contact(self, a: SimNode, b: SimNode) -> bool:
        return (
            not (a.paused or a.crashed or b.paused or b.crashed)
            and (not self.hb_cut or (a.index not in self.hb_cut and b.index not in self.hb_cut))
        )

    def contact(self, a: SimNode, b: SimNode) -> float:
        if self.in_contact(a, b):
            return self.clock.now_s
        key = (a.index, b.index) if a.index < b.index else (b.index, a.index)
        return self.last_contact.get(key, float("-inf"))

    def refresh_contacts(self) -> None:
        """Call before and after any change of who can hear whom."""
        now = self.clock.now_s
        for a in self.nodes:
            for b in self.nodes:
                if a is b or not self.in_contact(a, b):
                    continue
                if a.index < b.index:
                    self.last_contact[(a.index, b.index)] = now
                self.last_flag[(a.index, b.index)] = b.has_live_term()
                a.seen.add(b.instance)

    def _forget_contacts(self, node: SimNode) -> None:
        for key in [k for k in self.last_contact if node.index in k]:
            del self.last_contact[key]
        for key in [k for k in self.last_flag if node.index in k]:
            del self.last_flag[key]

    def _notified(self, _service: str, _scope: str) -> None:
        """A lease NOTIFY: delivered over each node's store connection (unless cut or lost)."""
        for node in self.nodes:
            if node.crashed or node.net.cut or self.lost(node.net):
                continue
            self.clock.call_later(self.delay(node.net), _waker(node))

    # ---- side effects ---------------------------------------------------------------------------------
    def side_effects(self, node: SimNode, epoch: int) -> None:
        self.sinks["dial"].accept(epoch, node)
        net = node.net
        if not net.cut and not self.lost(net):  # the fenced write and the event leave together
            self.clock.call_later(self.delay(net), lambda: self._land(node, epoch))

    def _land(self, node: SimNode, epoch: int) -> None:
        if node.net.cut:
            return
        self._land_write(node, epoch)
        self._land_event(node, epoch)

    def _land_write(self, node: SimNode, epoch: int) -> None:
        fence = LeaseFence(ROLE.service, ROLE.scope, epoch)
        row = self.store.row(fence.service, fence.scope)
        # LeaseFence.select: epoch = $n AND expires_at > now(), on the store's row at the moment it lands
        holds = (
            row is not None and row.expires_at > self.clock.as_datetime()
            and (row.epoch == fence.epoch or "fence_ignores_epoch" in self.bugs)
        )
        if holds:
            self.sinks["db"].accept(epoch, node)

    def _land_event(self, node: SimNode, epoch: int) -> None:
        envelope = EpochEnvelope(ROLE.service, ROLE.scope, epoch, None)
        if "no_epoch_gate" in self.bugs or self.gate.admit(envelope):
            self.sinks["event"].accept(epoch, node)

    # ---- liveness ---------------------------------------------------------------------------------------
    def has_master(self) -> bool:
        return any(n.running and n.elector.is_master for n in self.nodes)

    def after_cycle(self) -> None:
        if self.heal_at is not None and self.has_master():
            self.recoveries.append(self.clock.now_s - self.heal_at)
            self.log(f"master again after {self.clock.now_s - self.heal_at:.3f} s")
            self.heal_at = None

    # ---- running ----------------------------------------------------------------------------------------
    def run_for(self, seconds: float) -> None:
        end = self.clock.now_s + seconds
        while self.clock.now_s < end and not self.violations:
            self.clock.advance(min(0.25, end - self.clock.now_s))

    def run_until_master(self) -> None:
        if self.heal_at is None:
            return
        if self.has_master():
            self.after_cycle()
            return
        limit = self.heal_at + self.bound
        while self.heal_at is not None and not self.violations:
            if self.clock.now_s >= limit:
                self.violate("no_master", f"no master {self.bound:.2f} s after every fault healed")
                return
            self.clock.advance(min(0.25, limit - self.clock.now_s))

    # ---- faults -----------------------------------------------------------------------------------------
    def pick_node(self) -> SimNode:
        masters = [n for n in self.nodes if n.elector.state is RoleState.MASTER and not n.crashed]
        if masters and self.rng.random() < self.config.target_master:
            return masters[0]
        return self.nodes[self.rng.randrange(len(self.nodes))]

    def inject(self, kind: str, node: SimNode) -> Callable[[], None]:
        """Inject one fault now; returns its heal."""
        self.faults += 1
        self.refresh_contacts()
        name = f"node {node.index + 1}"
        heal: Callable[[], None]
        if kind == "crash":
            if node.crashed:
                return lambda: None
            node.crash()
            self._wake_peers(node)

            def heal() -> None:
                if node.crashed:
                    self._forget_contacts(node)
                    node.restart()
        elif kind == "pause":
            if node.paused or node.crashed:
                return lambda: None
            node.paused = True

            def heal() -> None:
                if node.paused:
                    node.resume()
        elif kind in ("store_cut", "peer_cut", "cut_both"):
            store, peers = kind in ("store_cut", "cut_both"), kind in ("peer_cut", "cut_both")
            if store:
                node.net.cut = True
            if peers:
                self.hb_cut.add(node.index)

            def heal() -> None:
                node.net.cut = False
                self.hb_cut.discard(node.index)
        elif kind == "delay":
            hi = self.rng.uniform(0.05, self.config.max_delay_s)
            node.net.delay = (hi / 4, hi)
            name += f" up to {hi:.3f} s"

            def heal() -> None:
                node.net.delay = _NORMAL_DELAY
        elif kind == "loss":
            node.net.loss = self.rng.uniform(0.2, 1.0)
            name += f" p={node.net.loss:.2f}"

            def heal() -> None:
                node.net.loss = 0.0
        else:
            raise ValueError(f"unknown fault {kind!r}")
        self.refresh_contacts()
        self.log(f"inject {kind} {name} (rate {node.rate:.4f})")

        def healed() -> None:
            self.log(f"heal {kind} node {node.index + 1}")
            self.refresh_contacts()
            heal()
            self.refresh_contacts()

        return healed

    def _wake_peers(self, dead: SimNode) -> None:
        """A crashed process's heartbeat connections are reset: its peers' electors look at once."""
        for node in self.nodes:
            if node is not dead and node.running and node.index not in self.hb_cut:
                node.elector.wake()


def _waker(node: SimNode) -> Callable[[], None]:
    gen = node.gen
    return lambda: node.run(gen, node.elector.wake)


def run_schedule(seed: int, *, config: SimConfig | None = None, bugs: frozenset[str] = frozenset(),
                 trace: bool = False) -> ScheduleResult:
    """Run one schedule: start, then 1-3 episodes of (quiet, 1-2 faults held, heal all, wait for a master)."""
    config = config or SimConfig()
    world = World(seed, config, bugs, trace)
    rng = world.rng
    for node in world.nodes:
        node.start(rng.uniform(0.0, 0.05))
    world.heal_at = world.clock.now_s
    world.log(f"start: {config.nodes} nodes, clock rates " + ", ".join(f"{n.rate:.4f}" for n in world.nodes))
    world.run_until_master()
    episodes = rng.randint(*config.episodes)
    done = 0
    for _ in range(episodes):
        if world.violations:
            break
        done += 1
        world.run_for(rng.uniform(*config.quiet_s))
        heals = []
        for _ in range(1 if rng.random() < 0.7 else 2):
            kind = FAULT_KINDS[rng.randrange(len(FAULT_KINDS))]
            heals.append(world.inject(kind, world.pick_node()))
        world.run_for(rng.uniform(*config.fault_hold_s))
        for heal in heals:
            heal()
        world.heal_at = world.clock.now_s
        world.after_cycle()
        world.run_until_master()
    # a short tail: late messages of the last episode still land and are judged
    if not world.violations:
        world.run_for(0.3)
    return ScheduleResult(
        seed=seed, violations=world.violations, faults=world.faults, episodes=done,
        recoveries_s=world.recoveries, simulated_s=world.clock.now_s - world.t0,
        accepted={name: sink.accepted for name, sink in world.sinks.items()}, trace=world.trace,
    )
