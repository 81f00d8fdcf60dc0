"""The base daemon: signals, graceful stop, task supervision, member rows, heartbeats, /health and /metrics.

A service subclasses :class:`HADaemon` and writes only its own behaviour::

    class RuleEngine(HADaemon):
        async def run_master(self, elector: Elector, term: MasterTerm) -> None:
            while True:                                   # cancelled when the term ends
                ok = await self.fenced_execute(term, "UPDATE rules SET ... WHERE id = $1 AND {fence}", rid)
                ...

    sys.exit(asyncio.run(RuleEngine(DaemonConfig(...)).main()))

Supervision follows aiokafka's coordinator: the daemon waits on a closing future together with its tasks;
a task that crashes is logged with its traceback and stops the daemon cleanly with exit code 1.
SIGTERM/SIGINT stop it gracefully: master work is ended (``checkpoint`` first), leases are released
(NOTIFY via the trigger), GOODBYE goes out on the heartbeats, member rows become STOPPED.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import ssl
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog

from pom_ha.ha.election import ClaimSpread, Elector
from pom_ha.ha.fencing import FencedWrite, LeaseFence, execute_fenced
from pom_ha.ha.heartbeat import HeartbeatNode
from pom_ha.ha.logsetup import redact_dsn
from pom_ha.ha.metrics import HAMetrics
from pom_ha.ha.pg_store import PgStatusStore
from pom_ha.ha.ports import DaemonPorts, Sinks, TermPorts
from pom_ha.ha.roles import ConnectionState, PoolMember, RoleKind, ZoneRole
from pom_ha.ha.sdnotify import notify
from pom_ha.ha.settings import HATimings
from pom_ha.ha.status_http import StatusHTTP
from pom_ha.ha.store import HAEvent, Holder, Member, MemberState, StatusStore, StatusStoreError
from pom_ha.ha.term import MasterTerm, NotMaster

log = structlog.get_logger("pom_ha.ha.daemon")


@dataclass(frozen=True)
class DaemonConfig:
    server: str  # POM server name (pom1)
    address: str  # that server's address: heartbeat and HTTP listen here
    dsn: str  # PostgreSQL; never logged (redact_dsn)
    roles: tuple[RoleKind, ...]
    timings: HATimings = field(default_factory=HATimings)
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    http_port: int = 0
    heartbeat_port: int = 0
    server_ssl: ssl.SSLContext | None = None
    client_ssl: ssl.SSLContext | None = None
    instance_tag: str | None = None
    checkpoint_timeout_s: float = 0.1


class HADaemon:
    """Subclass and override :meth:`run_master` (and optionally :meth:`setup`, :meth:`checkpoint`,
    :meth:`teardown`); start extra supervised work with :meth:`spawn`."""

    def __init__(self, config: DaemonConfig, *, store: StatusStore | None = None) -> None:
        if not config.roles:
            raise ValueError("a daemon needs at least one role")
        self.config = config
        self.timings = config.timings
        self.store: StatusStore = store or PgStatusStore(
            config.dsn, config.timings, application_name=f"pom-ha:{config.server}"
        )
        self.metrics = HAMetrics()
        self.http = StatusHTTP(self.health, self.metrics)
        self.electors: list[Elector] = []
        self.heartbeats: dict[str, HeartbeatNode] = {}
        self.exit_code = 0
        self.state = "starting"
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing: asyncio.Future[str] | None = None
        self._members_dirty = asyncio.Event()
        self._db: Any = None
        self._log = log.bind(server=config.server, instance=config.instance_id)
        #: the event publisher and cache of this daemon's master work (a service fills what it has)
        self.sinks = Sinks()
        self.ports = DaemonPorts(config.server, config.instance_id, config.timings, self._log, self.app_db,
                                 self.fenced_execute, self.sinks)

    # ---- hooks for subclasses ------------------------------------------------------------------------
    async def setup(self) -> None:
        """After heartbeats, store and HTTP are up, before the first HA cycle."""

    async def run_master(self, elector: Elector, term: MasterTerm) -> None:
        """Master-only work of ``elector``'s role for one term; cancelled when the term ends."""
        await term.ended.wait()

    async def checkpoint(self, elector: Elector, term: MasterTerm) -> None:
        """Graceful stop, before the lease is released: finish or checkpoint protected work (bounded by
        ``checkpoint_timeout_s``)."""

    async def teardown(self) -> None:
        """Last step of a stop, after leases are released."""

    def member_load(self, service: str) -> int:
        """The ``load`` published in ``ha_member`` (least-busy allocation reads it)."""
        return 0

    # ---- services for subclasses -------------------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """Start a supervised task: if it crashes, the daemon stops with exit code 1."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        return task

    async def app_db(self) -> Any:
        """A lazily created asyncpg pool for the service's own (fenced) writes."""
        if self._db is None:
            self._db = await asyncpg.create_pool(
                self.config.dsn, min_size=0, max_size=4, timeout=self.timings.store_timeout_s,
                max_inactive_connection_lifetime=60.0,
                server_settings={"application_name": f"pom-ha:{self.config.server}:app"},
            )
        return self._db

    async def fenced_execute(self, term: MasterTerm, sql: str, *args: object) -> FencedWrite:
        """A fenced write under ``term``'s lease on the app pool, counted in /metrics (ok/rejected/error)."""
        labels = (term.service, term.scope)
        try:
            pool = await self.app_db()
            async with pool.acquire(timeout=self.timings.store_timeout_s) as conn:
                result = await execute_fenced(
                    conn, _lease_fence(term), sql, *args, timeout_s=self.timings.store_timeout_s
                )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            self.metrics.fenced_writes.labels(*labels, "error").inc()
            raise
        self.metrics.fenced_writes.labels(*labels, "ok" if result.fence_held else "rejected").inc()
        return result

    def term_ports(self, term: MasterTerm) -> TermPorts:
        """The ports of ``term`` for the workers of its master work (they never get the daemon)."""
        return TermPorts(term, self.ports)

    def request_stop(self, reason: str = "requested", *, exit_code: int = 0) -> None:
        if exit_code:
            self.exit_code = exit_code
        if self._closing is not None and not self._closing.done():
            self._closing.set_result(reason)

    # ---- main ------------------------------------------------------------------------------------------
    async def main(self) -> int:
        """Run until SIGTERM/SIGINT or a crash; returns the process exit code."""
        loop = asyncio.get_running_loop()
        self._closing = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        structlog.contextvars.bind_contextvars(server=self.config.server)
        self._log.info("daemon starting", database=redact_dsn(self.config.dsn), address=self.config.address,
                       roles=[r.label for r in self.config.roles], tag=self.config.instance_tag)
        reason = "cancelled"
        try:
            await self._start()
            self.state = "running"
            # systemd (Type=notify): heartbeats, status store and /health are up, the electors run
            notify("READY=1", f"STATUS=running on {self.config.address}, /metrics on port {self.http.port}")
            reason = await self._supervise()
        finally:
            await self._stop(reason)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return self.exit_code

    async def _start(self) -> None:
        services = sorted({r.service for r in self.config.roles if not isinstance(r, PoolMember)})
        for i, service in enumerate(services):
            node = HeartbeatNode(
                server=self.config.server, instance=self.config.instance_id, service=service,
                host=self.config.address, port=self.config.heartbeat_port if i == 0 else 0, timings=self.timings,
                epoch=functools.partial(self._epoch_of, service), server_ssl=self.config.server_ssl,
                client_ssl=self.config.client_ssl, on_rtt=self._on_rtt,
                on_change=functools.partial(self._wake_for_peer, service),
            )
            await node.start()
            self.heartbeats[service] = node
        spreads: dict[str, ClaimSpread] = {}
        for role in self.config.roles:
            if isinstance(role, PoolMember):
                continue
            node = self.heartbeats[role.service]
            spread = None
            if isinstance(role, ZoneRole):
                spread = spreads.setdefault(role.service, ClaimSpread(self.timings.claim_spread_ms / 1000))
            elector = Elector(
                self.store, role, Holder(self.config.server, self.config.instance_id, node.endpoint),
                self.timings, peers=node, on_event=self._on_event, spread=spread,
            )
            self.electors.append(elector)
            # every role scope has a series from the start, so "no master anywhere" is a sum of zeros
            self.metrics.role_master.labels(role.service, elector.scope).set(0)
        self.store.subscribe(self._on_lease_change)
        await self.store.start()
        http_port = await self.http.start(self.config.address, self.config.http_port)
        self._log.info("status endpoint listening", url=f"http://{self.config.address}:{http_port}/health")
        await self.setup()
        self.spawn(self._membership(), name="membership")
        for elector in self.electors:
            self.spawn(elector.run(), name=f"elector-{elector.role.label}")
            self.spawn(self._role_worker(elector), name=f"master-{elector.role.label}")

    async def _supervise(self) -> str:
        assert self._closing is not None
        while True:
            done, _ = await asyncio.wait({self._closing, *self._tasks}, return_when=asyncio.FIRST_COMPLETED)
            if self._closing in done:
                return self._closing.result()
            for task in [t for t in self._tasks if t in done]:
                self._tasks.discard(task)
                if task.cancelled():
                    self._log.error("supervised task was cancelled", task=task.get_name())
                    self.request_stop(f"task {task.get_name()} cancelled", exit_code=1)
                elif (exc := task.exception()) is not None:
                    self._log.error("supervised task crashed", task=task.get_name(), exc_info=exc)
                    self.request_stop(f"task {task.get_name()} crashed", exit_code=1)

    async def _stop(self, reason: str) -> None:
        """Graceful stop: end master work, release leases, GOODBYE, member rows STOPPED, close."""
        t0 = time.monotonic()
        self.state = "stopping"
        notify("STOPPING=1", f"STATUS=stopping: {reason}")
        self._log.info("daemon stopping", reason=reason)
        for task in list(self._tasks):
            if task.get_name().startswith("elector-"):
                task.cancel()
        for elector in self.electors:
            if elector.term is not None and elector.is_master:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.config.checkpoint_timeout_s):
                        await self.checkpoint(elector, elector.term)
        await asyncio.gather(*(e.stop(reason) for e in self.electors), return_exceptions=True)
        released_ms = (time.monotonic() - t0) * 1000
        for node in self.heartbeats.values():
            await node.goodbye()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        with contextlib.suppress(StatusStoreError):
            await self._publish_members("STOPPED")
        with contextlib.suppress(Exception):
            await self.teardown()
        for node in self.heartbeats.values():
            await node.close()
        await self.http.close()
        await self.store.close()
        if self._db is not None:
            self._db.terminate()
        self.state = "stopped"
        self._log.info("daemon stopped", reason=reason, exit_code=self.exit_code,
                       leases_released_ms=round(released_ms, 1), stop_ms=round((time.monotonic() - t0) * 1000, 1))

    # ---- roles ---------------------------------------------------------------------------------------------
    async def _role_worker(self, elector: Elector) -> None:
        """Each term: run_master inside the term's scope (cancelled on demotion; a crash propagates)."""
        while True:
            term = await elector.wait_master()
            try:
                async with term:
                    term.create_task(self.run_master(elector, term), name=f"run-master-{elector.role.label}")
            except NotMaster:
                await asyncio.sleep(0)  # the term ended between the two calls; never spin

    def _on_event(self, event: HAEvent) -> None:
        self.metrics.transition(event)
        self._members_dirty.set()
        if event.kind in ("acquired", "took_over"):
            self.metrics.role_master.labels(event.service, event.scope).set(1)
            if event.epoch is not None:
                self.metrics.epoch.labels(event.service, event.scope).set(event.epoch)
                structlog.contextvars.bind_contextvars(epoch=event.epoch)
        elif event.kind in ("lost", "demoted", "released"):
            self.metrics.role_master.labels(event.service, event.scope).set(0)

    def _on_lease_change(self, service: str, scope: str) -> None:
        for elector in self.electors:
            if service == "*" or (elector.service == service and elector.scope == scope):
                elector.wake()

    def _wake_for_peer(self, service: str, _peer_instance: str) -> None:
        for elector in self.electors:
            if elector.service == service:
                elector.wake()

    def _epoch_of(self, service: str) -> int:
        # the epoch of a live term (not ``is_master``, which is briefly False while a renewal is pending):
        # peers read 0 as "its term ended" (HeartbeatNode.stepped_down), so 0 must never hide a live term
        return max(
            (e.term.epoch for e in self.electors if e.service == service and e.term is not None and e.term.active),
            default=0,
        )

    def _on_rtt(self, peer: str, rtt_s: float) -> None:
        self.metrics.heartbeat_rtt.labels(peer).observe(rtt_s)

    # ---- membership ----------------------------------------------------------------------------------------
    async def _membership(self) -> None:
        """Every renew interval (and at once after a transition): member rows, peers, gauges."""
        failing = False
        while True:
            self._members_dirty.clear()
            try:
                await self._publish_members(None)
                if failing:
                    self._log.info("member rows published again")
                failing = False
            except StatusStoreError as exc:
                if not failing:
                    self._log.warning("cannot publish member rows", error=str(exc))
                failing = True
            for e in self.electors:
                self.metrics.store_up.labels(e.service, e.scope).set(
                    1 if e.connection is ConnectionState.CONNECTED else 0
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timings.renew_interval_s):
                    await self._members_dirty.wait()

    async def _publish_members(self, forced: MemberState | None) -> None:
        timeout = self.timings.store_timeout_s
        for service in sorted({r.service for r in self.config.roles}):
            electors = [e for e in self.electors if e.service == service]
            held = tuple(sorted(e.scope for e in electors if e.is_master))
            state: MemberState
            if forced is not None:
                state = forced
            elif not electors:
                state = "RUNNING"
            else:
                state = "MASTER" if held else "DORMANT"
            node = self.heartbeats.get(service)
            await self.store.upsert_member(
                Member(service, self.config.server, self.config.instance_id, state,
                       () if forced else held, node.endpoint if node else None, self.member_load(service)),
                timeout_s=timeout,
            )
            if node is None or forced is not None:
                continue
            members = await self.store.members(service, timeout_s=timeout)
            newest = max((m.seen_at for m in members if m.seen_at is not None), default=None)
            horizon = self.timings.lease_ttl_s * 10
            node.set_peers({
                m.instance_id: (m.server, m.endpoint) for m in members
                if m.endpoint and m.state != "STOPPED" and m.instance_id != self.config.instance_id
                and (newest is None or m.seen_at is None or (newest - m.seen_at).total_seconds() < horizon)
            })
            self.metrics.heartbeat_peers_alive.labels(service).set(len(node.alive_peers()))

    # ---- /health -------------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        roles = [
            {
                "service": e.service, "scope": e.scope, "role": "MASTER" if e.is_master else "DORMANT",
                "epoch": e.epoch, "connection": e.connection.value, "decision": e.decision,
            }
            for e in self.electors
        ]
        roles += [
            {"service": r.service, "scope": None, "role": "RUNNING", "epoch": None, "connection": None,
             "decision": "pool member"}
            for r in self.config.roles if isinstance(r, PoolMember)
        ]
        masters = [r for r in roles if r["role"] == "MASTER"]
        overall = "MASTER" if masters else ("DORMANT" if self.electors else "RUNNING")
        epochs = [int(r["epoch"]) for r in masters if r["epoch"] is not None]
        return {
            "server": self.config.server, "instance": self.config.instance_id, "tag": self.config.instance_tag,
            "state": self.state, "role": overall, "epoch": max(epochs) if epochs else None,
            "scopes": sorted(str(r["scope"]) for r in masters), "roles": roles,
            "heartbeat": {
                s: {"endpoint": n.endpoint, "alive_peers": n.alive_peers(), "protocol_errors": n.protocol_errors}
                for s, n in self.heartbeats.items()
            },
        }


def _lease_fence(term: MasterTerm) -> LeaseFence:
    return LeaseFence(term.service, term.scope, term.epoch)
