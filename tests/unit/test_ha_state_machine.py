"""The HA state machine under random schedules: three electors, one fake store, one fake clock.

Rules move time (watchdogs fire at their exact instant), run cycles, cut and restore a node's store
connectivity, add store latency, pause/resume (SIGSTOP-like: nothing of that node runs, its timers wait),
crash/restart nodes, cut heartbeats between nodes, and release gracefully.

Heartbeats are modelled as the protocol behaves: two running nodes whose link is not cut are in contact
continuously; a paused or cut-off peer is called gone after ``heartbeat_dead_after_s`` of silence, a
crashed one at once (its sockets are reset); a master's peers vouch for it only up to
``heartbeat_fresh_s`` after their last contact. A paused node's overdue timers fire on resume before it
can hear anything new. Invariants, checked after every step:

* at most one node believes it is master (``is_master``) at any instant;
* any running node with a live term (master work not cancelled) holds the lease in the store at that
  epoch, unexpired on the store clock — demotion always comes before expiry;
* a master never promises itself more than the store granted: its deadline (monotonic, from the send
  time) falls before the store's ``expires_at``, its exclusivity bound no later than ``renewed_at`` plus
  the take-over staleness;
* epochs only grow (in the store, and no two terms ever share an epoch);
* leases expire: a lease in the store whose ``expires_at`` passed has no master.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Coroutine
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pom_ha.ha.election import Elector
from pom_ha.ha.fake_store import FakeClock, FakeStatusStore, FakeTimer
from pom_ha.ha.roles import SingletonRole
from pom_ha.ha.settings import HATimings
from pom_ha.ha.store import HAEvent, Holder, Lease, Member, StatusStore, StatusStoreError
from pom_ha.ha.term import MasterTerm

TIMINGS = HATimings()
ROLE = SingletonRole("rule_engine")
NODES = 3
_instances = itertools.count(1)


class LinkedStore(StatusStore):
    """One node's path to the shared fake store; ``up=False`` is a network cut (calls fail, retriable)."""

    def __init__(self, shared: FakeStatusStore) -> None:
        self.shared = shared
        self.ttl_ms = shared.ttl_ms
        self.up = True

    def _check(self) -> None:
        if not self.up:
            raise StatusStoreError("link down", retriable=True)

    async def now(self, *, timeout_s: float | None = None) -> Any:
        self._check()
        return await self.shared.now()

    async def try_acquire(self, service: str, scope: str, holder: Holder, *, timeout_s: float | None = None
                          ) -> Lease | None:
        self._check()
        return await self.shared.try_acquire(service, scope, holder)

    async def try_take_over(self, observed: Lease, holder: Holder, stale_ms: int, *, timeout_s: float | None = None
                            ) -> Lease | None:
        self._check()
        return await self.shared.try_take_over(observed, holder, stale_ms)

    async def renew(self, lease: Lease, *, timeout_s: float | None = None) -> Lease | None:
        self._check()
        return await self.shared.renew(lease)

    async def release(self, lease: Lease, *, timeout_s: float | None = None) -> bool:
        self._check()
        return await self.shared.release(lease)

    async def read(self, service: str, scope: str, *, timeout_s: float | None = None) -> Lease | None:
        self._check()
        return await self.shared.read(service, scope)

    async def leases(self, service: str, *, timeout_s: float | None = None) -> list[Lease]:
        self._check()
        return await self.shared.leases(service)

    async def upsert_member(self, member: Member, *, timeout_s: float | None = None) -> None:
        self._check()
        await self.shared.upsert_member(member)

    async def members(self, service: str, *, timeout_s: float | None = None) -> list[Member]:
        self._check()
        return await self.shared.members(service)

    async def record_event(self, event: HAEvent, *, timeout_s: float | None = None) -> None:
        self._check()
        await self.shared.record_event(event)


class Node:
    """One daemon instance: an elector, its store link, its own monotonic clock origin, pause/crash state."""

    def __init__(self, machine: HAMachine, index: int) -> None:
        self.machine = machine
        self.index = index
        self.offset = 1000.0 * index - 377.0  # each host's monotonic clock has its own origin
        self.link = LinkedStore(machine.store)
        self.paused = False
        self.crashed = False
        self.deferred: list[Callable[[], None]] = []
        self.terms: list[MasterTerm] = []
        self.elector = self._new_elector()

    def _new_elector(self) -> Elector:
        holder = Holder(f"pom{self.index + 1}", f"i{next(_instances)}", f"127.0.1.{self.index + 1}:7000")
        elector = Elector(
            self.link, ROLE, holder, TIMINGS, peers=SimPeers(self.machine, self), clock=self.mono,
            call_later=self.call_later,
        )
        elector.on_promote(self._promoted)
        return elector

    def mono(self) -> float:
        return self.machine.clock() + self.offset

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> FakeTimer:
        def fire() -> None:
            if self.crashed:
                return
            if self.paused:
                self.deferred.append(callback)  # a stopped process runs its overdue timers on SIGCONT
            else:
                callback()

        return self.machine.clock.call_later(delay_s, fire)

    def _promoted(self, term: MasterTerm) -> None:
        self.terms.append(term)
        term.create_task(asyncio.sleep(3600), name="master-work")

    def resume(self) -> None:
        # overdue timers run first, before any new heartbeat could be heard: contact is still frozen
        deferred, self.deferred = self.deferred, []
        for callback in deferred:
            callback()
        self.machine.touch_contacts()
        self.paused = False

    def has_live_term(self) -> bool:
        """What its heartbeats report: the epoch of a live term, or 0 (HADaemon._epoch_of)."""
        return any(t.active for t in self.terms)

    def crash(self) -> None:
        self.machine.touch_contacts()
        self.crashed = True
        for term in self.terms:
            term.end("process killed")

    def restart(self) -> None:
        self.machine.touch_contacts()
        self.crashed = False
        self.paused = False
        self.deferred = []
        self.link.up = True
        self.elector = self._new_elector()  # a new process: a new instance id

    @property
    def running(self) -> bool:
        return not self.paused and not self.crashed


class SimPeers:
    """One node's heartbeat view (the PeerView the elector reads), from the machine's contact model."""

    def __init__(self, machine: HAMachine, me: Node) -> None:
        self.machine = machine
        self.me = me

    def failure_corroborated(self, instance: str) -> bool:
        for node in self.machine.nodes:
            if node.elector.holder.instance == instance:
                if node.crashed:
                    return True  # connection reset at once
                silent = self.machine.clock() - self.machine.contact(self.me, node)
                return silent >= TIMINGS.heartbeat_dead_after_s
        return True  # that process is gone (its node restarted with a new instance)

    def stepped_down(self, instance: str) -> bool:
        """Alive and heard, and master of nothing: as of now while in contact, else as of the last contact."""
        for node in self.machine.nodes:
            if node.elector.holder.instance == instance:
                if node.crashed:
                    return False
                if self.machine.in_contact(self.me, node):
                    return not node.has_live_term()
                return self.machine.last_master_flag.get((self.me.index, node.index)) is False
        return False

    def confirmed_until(self) -> float:
        others = [n for n in self.machine.nodes if n is not self.me]
        last = min((self.machine.contact(self.me, n) for n in others), default=float("inf"))
        return last + self.me.offset + TIMINGS.heartbeat_fresh_s


class HAMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.store = FakeStatusStore(TIMINGS.lease_ttl_ms, self.clock)
        self.hb_cuts: set[frozenset[int]] = set()
        self.last_contact: dict[frozenset[int], float] = {}
        #: (observer, peer) -> whether the peer was master the last time the observer heard it
        self.last_master_flag: dict[tuple[int, int], bool] = {}
        self.nodes: list[Node] = []
        self.max_store_epoch = 0
        self.steps_since_settle = 0
        self.term_epochs: list[int] = []

    def in_contact(self, a: Node, b: Node) -> bool:
        return a.running and b.running and frozenset((a.index, b.index)) not in self.hb_cuts

    def contact(self, a: Node, b: Node) -> float:
        """Last (store-clock) time a and b exchanged heartbeats: now while in contact."""
        if self.in_contact(a, b):
            return self.clock()
        return self.last_contact.get(frozenset((a.index, b.index)), float("-inf"))

    def touch_contacts(self) -> None:
        """Call before any change of who can hear whom: freezes the contact time of pairs in contact."""
        for a in self.nodes:
            for b in self.nodes:
                if a.index < b.index and self.in_contact(a, b):
                    self.last_contact[frozenset((a.index, b.index))] = self.clock()
                if a is not b and self.in_contact(a, b):
                    self.last_master_flag[(a.index, b.index)] = b.has_live_term()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        result = self.loop.run_until_complete(coro)
        self.loop.run_until_complete(asyncio.sleep(0))  # let cancelled master work unwind
        return result

    def teardown(self) -> None:
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    @initialize()
    def start(self) -> None:
        self.nodes = [Node(self, i) for i in range(NODES)]
        self.touch_contacts()
        self.settle()  # start from an elected master: the interesting faults hit a master

    # ---- rules ---------------------------------------------------------------------------------------------
    # durations around the interesting bounds (renew interval, exclusivity, TTL minus margin, TTL)
    @rule(ms=st.one_of(st.sampled_from([50, 250, 500, 750, 1000, 1500, 2000, 2300, 2600, 3100]),
                       st.integers(min_value=0, max_value=3500)))
    def advance(self, ms: int) -> None:
        """Time moves in 50 ms steps and safety is checked at each: a short unsafe window cannot hide."""
        while ms > 0:
            step = min(ms, 50)
            ms -= step
            self.clock.advance(step / 1000)
            self.run(asyncio.sleep(0))
            self.check_safety()

    @rule(i=st.integers(0, NODES - 1))
    def cycle(self, i: int) -> None:
        node = self.nodes[i]
        if node.running:
            decision = self.run(node.elector.run_cycle())
            assert decision and "BUG" not in decision

    @rule(i=st.integers(0, NODES - 1), up=st.booleans())
    def store_link(self, i: int, up: bool) -> None:
        self.nodes[i].link.up = up

    @rule(ms=st.sampled_from([0, 0, 20, 400, 700, 1000, 1300]))
    def store_latency(self, ms: int) -> None:
        self.store.latency_s = ms / 1000  # each way: request and reply both take this long

    @rule(i=st.integers(0, NODES - 1))
    def pause(self, i: int) -> None:
        if not self.nodes[i].crashed:
            self.touch_contacts()
            self.nodes[i].paused = True

    @rule(i=st.integers(0, NODES - 1))
    def resume(self, i: int) -> None:
        if self.nodes[i].paused:
            self.nodes[i].resume()
            self.run(asyncio.sleep(0))

    @rule(i=st.integers(0, NODES - 1), j=st.integers(0, NODES - 1))
    def heartbeat_cut(self, i: int, j: int) -> None:
        pair = frozenset((i, j))
        if i != j:
            self.touch_contacts()
            self.hb_cuts ^= {pair}

    @rule(i=st.integers(0, NODES - 1))
    def crash(self, i: int) -> None:
        if not self.nodes[i].crashed:
            self.nodes[i].crash()
            self.run(asyncio.sleep(0))

    @rule(i=st.integers(0, NODES - 1))
    def restart(self, i: int) -> None:
        if self.nodes[i].crashed:
            self.nodes[i].restart()

    @rule(i=st.integers(0, NODES - 1))
    def graceful_release(self, i: int) -> None:
        node = self.nodes[i]
        if node.running:
            self.run(node.elector.release("test"))
            assert not node.elector.is_master

    @precondition(lambda self: self.steps_since_settle >= 15)
    @rule()
    def settle(self) -> None:
        """Liveness: with every fault healed, exactly one master emerges within a few lease TTLs."""
        self.steps_since_settle = 0
        self.store.latency_s = 0.0
        self.touch_contacts()
        self.hb_cuts.clear()
        for node in self.nodes:
            if node.crashed:
                node.restart()
            if node.paused:
                node.resume()
            node.link.up = True
        self.run(asyncio.sleep(0))
        for _ in range(int(4 * TIMINGS.lease_ttl_ms / TIMINGS.renew_interval_ms)):
            for node in self.nodes:
                self.run(node.elector.run_cycle())
                self.check_safety()
            if sum(n.elector.is_master for n in self.nodes) == 1:
                return
            self.clock.advance(TIMINGS.renew_interval_s)
        raise AssertionError(f"no master after faults healed: {[n.elector.decision for n in self.nodes]}")

    # ---- invariants ------------------------------------------------------------------------------------------
    @invariant()
    def count_steps(self) -> None:
        self.steps_since_settle += 1

    @invariant()
    def check_safety(self) -> None:
        if not self.nodes:
            return
        now = self.clock.as_datetime()
        lease = self.store.peek(ROLE.service, ROLE.scope)
        masters = [n for n in self.nodes if not n.crashed and n.elector.is_master]
        assert len(masters) <= 1, f"two masters at once: {[n.index for n in masters]}"

        for node in self.nodes:
            live_terms = [t for t in node.terms if t.active]
            if node.crashed:
                assert not live_terms
                continue
            assert len(live_terms) <= 1
            if node.paused or not live_terms:
                continue
            term = live_terms[0]
            assert lease is not None
            assert lease.holder_instance == node.elector.holder.instance, "master work runs without the lease"
            assert lease.epoch == term.epoch
            assert lease.expires_at > now, "master work still running after the lease expired in the store"

        for node in self.nodes:
            own = node.elector.lease
            if node.crashed or own is None or lease is None or lease.epoch != own.epoch:
                continue
            assert own.valid_until_mono is not None and own.exclusive_until_mono is not None
            assert lease.renewed_at is not None
            valid_until = own.valid_until_mono - node.offset  # on the shared (store) clock
            exclusive_until = own.exclusive_until_mono - node.offset
            assert valid_until < lease.expires_at.timestamp(), "the master's deadline outlives the lease"
            assert exclusive_until <= lease.renewed_at.timestamp() + TIMINGS.takeover_stale_ms / 1000 + 1e-6, (
                "the master believes itself exclusive past the earliest possible early takeover"
            )

        running_terms = [t for n in self.nodes if n.running for t in n.terms if t.active]
        assert len(running_terms) <= 1, "two running nodes with master work at once"

        if lease is not None:
            assert lease.epoch >= self.max_store_epoch, "the store epoch went backwards"
            self.max_store_epoch = lease.epoch
            if lease.expires_at <= now:
                assert not masters, "a master on an expired lease"

        epochs = [t.epoch for n in self.nodes for t in n.terms]
        assert len(epochs) == len(set(epochs)), f"two terms share an epoch: {sorted(epochs)}"
        for node in self.nodes:
            own = [t.epoch for t in node.terms]
            assert own == sorted(own), "a node's epochs went backwards"


HAMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestHAStateMachine = HAMachine.TestCase
