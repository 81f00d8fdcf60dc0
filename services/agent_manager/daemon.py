"""The Agent Manager daemon: one ``ZoneRole("agent_manager", zone)`` per zone (MASTER or DORMANT per zone,
active-active across daemons) and the desktop server on ``<server address>:ports.desktop``.

The desktop listener runs on every AM, master or not. A ``LOGIN`` for a zone this AM is master of goes to
that zone's :class:`ZoneRuntime`; a zone it does not hold is refused with ``ERROR zone_unavailable`` naming
the zone and, when the lease shows one, the master's desktop address (the client tries the next address).
A recovered AM stays DORMANT: the HA core never takes a lease from a live master, and nothing here
releases one on its own: moving a zone is the administrator's "Save and Apply" (``zone_config.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import ssl
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import structlog

from pom_ha.desktop.protocol import (
    ErrorFrame,
    Heartbeat,
    Login,
    ProtocolCounters,
    ProtocolError,
    StateReport,
    read_frame,
    refuse_and_close,
)
from pom_ha.ha.daemon import DaemonConfig, HADaemon
from pom_ha.ha.election import Elector
from pom_ha.ha.store import StatusStoreError
from pom_ha.ha.term import MasterTerm
from services.agent_manager.cache_link import AgentCacheLink
from services.agent_manager.session import Session
from services.agent_manager.zone import DesktopSettings, ZoneRuntime
from services.agent_manager.zone_config import ZoneConfigWatcher

SERVICE = "agent_manager"
BIND_RETRIES = 40
# a failover brings every desktop of the zone back at once: the default backlog (100) would drop SYNs
LISTEN_BACKLOG = 4096
# a LOGIN for a zone whose master is gone (lease expired, or its failure corroborated on the heartbeat link) is
# held this long for this AM's takeover instead of being refused into the desktop's backoff
LOGIN_PARK_S = 1.5
LEASE_CACHE_S = 0.1
log = structlog.get_logger("services.agent_manager")


class AgentManagerDaemon(HADaemon):

    def __init__(
        self, config: DaemonConfig, *, zones: Sequence[str], desktop_port: int,
        manager_addresses: Sequence[str] = (), desktop_heartbeat_ms: int = 500, desktop_miss_limit: int = 4,
        peer_desktop_addresses: dict[str, str] | None = None, desktop_ssl: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(config)
        self.zone_names = list(zones)
        self.desktop_port = desktop_port
        self.desktop_ssl = desktop_ssl
        self.manager_addresses = list(manager_addresses)
        self.peer_desktop_addresses = peer_desktop_addresses or {}
        self.desktop_heartbeat_ms = desktop_heartbeat_ms
        self.desktop_miss_limit = desktop_miss_limit
        self.runtimes: dict[str, ZoneRuntime] = {}
        self.counters = ProtocolCounters()
        self.sessions: set[Session] = set()
        self.refused_logins = 0
        self._server: asyncio.Server | None = None
        self.desktop = DesktopSettings(desktop_heartbeat_ms, desktop_miss_limit, self.manager_addresses)
        self.zone_config = ZoneConfigWatcher(self, self.runtimes)
        self._masters_changed = asyncio.Event()
        self._lease_cache: dict[str, tuple[float, Any]] = {}
        self.parked_logins = 0

    @property
    def cache_link(self) -> AgentCacheLink | None:
        """Agent states and callbacks to the cache service (``--cache``; set by __main__); None: no cache. The
        zones' workers reach it as their term's cache sink."""
        link: AgentCacheLink | None = self.sinks.cache
        return link

    @cache_link.setter
    def cache_link(self, link: AgentCacheLink | None) -> None:
        self.sinks.cache = link

    # ---- HA hooks -------------------------------------------------------------------------------------------
    async def setup(self) -> None:
        # before the electors start cycling (HADaemon._start calls setup first): the claim gate of
        # "Save and Apply" (services/agent_manager/zone_config.py)
        self.zone_config.install([e for e in self.electors if e.service == SERVICE],
                                 self.timings.claim_spread_ms / 1000)
        self.spawn(self.zone_config.run(), name="zone-config")
        self.spawn(self._heartbeat_ticker(), name="desktop-heartbeats")
        for attempt in range(BIND_RETRIES):
            try:
                self._server = await asyncio.start_server(
                    self._serve, self.config.address, self.desktop_port, reuse_address=True,
                    backlog=LISTEN_BACKLOG, ssl=self.desktop_ssl)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or attempt == BIND_RETRIES - 1:
                    raise
                await asyncio.sleep(0.05)
        self._log.info("desktop server listening", address=f"{self.config.address}:{self.desktop_port}",
                       zones=self.zone_names, tls=self.desktop_ssl is not None)

    async def run_master(self, elector: Elector, term: MasterTerm) -> None:
        runtime = ZoneRuntime(self.term_ports(term), self.desktop, lease_acquired_at=lambda: (
            elector.lease.acquired_at if elector.lease is not None else None))
        self.runtimes[term.scope] = runtime
        self._masters_changed.set()  # parked logins of this zone go on (one wake-up each, no polling)
        self._masters_changed = asyncio.Event()
        try:
            await runtime.run()
        finally:
            if self.runtimes.get(term.scope) is runtime:
                del self.runtimes[term.scope]
            self._log.info("zone released", zone=term.scope, epoch=term.epoch, reason=term.end_reason)

    def member_load(self, service: str) -> int:
        return sum(len(r.sessions) for r in self.runtimes.values())

    async def teardown(self) -> None:
        if self._server is not None:
            self._server.close()
        for session in list(self.sessions):
            session.abort()
        if self.cache_link is not None:
            await self.cache_link.close()
        self._log.info("desktop protocol counters", **self.counters.as_dict(), refused_logins=self.refused_logins)

    def health(self) -> dict[str, Any]:
        out = super().health()
        out["desktop"] = {
            "connections": len(self.sessions), "refused_logins": self.refused_logins,
            "parked_logins": self.parked_logins,
            "protocol": self.counters.as_dict(),
            "zones": {
                z: {
                    "available": r.available, "epoch": r.epoch, "agents": len(r.sessions),
                    "takeover": None if r.report is None else {
                        "known_agents": r.report.known_agents, "reconnected": r.report.reconnected,
                        "desktop_errors": r.report.desktop_errors, "nuisance": r.report.nuisance,
                        "detached": r.report.detached, "wait_ms": round(r.report.wait_ms, 1),
                        "total_ms": round(r.report.total_ms, 1), "outage_s": round(r.report.outage_s, 3),
                    },
                }
                for z, r in self.runtimes.items()
            },
        }
        out["cache"] = None if self.cache_link is None else self.cache_link.info()
        return out

    # ---- desktop connections ----------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(reader, writer)
        self.sessions.add(session)
        silence_s = self.desktop_heartbeat_ms * self.desktop_miss_limit / 1000
        try:
            while not session.closed:
                try:
                    async with asyncio.timeout(silence_s):
                        frame = await read_frame(reader, "to_manager")
                except TimeoutError:
                    await refuse_and_close(writer, ProtocolError(
                        "heartbeat_timeout", "frame", f"nothing heard for {silence_s:.1f} s"), self.counters)
                    session.closed = True
                    break
                except ProtocolError as exc:
                    self._log.warning("malformed desktop frame; closing that connection", error=str(exc),
                                      agent=session.agent_id, peer=str(writer.get_extra_info("peername")))
                    await refuse_and_close(writer, exc, self.counters)
                    session.closed = True
                    break
                if frame is None:
                    break
                await self._handle(session, frame)
                if session.runtime is not None:
                    session.beating = True
        except (ConnectionError, OSError):
            pass
        finally:
            if session.runtime is not None:
                session.runtime.session_closed(session)
            self.sessions.discard(session)
            session.close()

    async def _heartbeat_ticker(self) -> None:
        """One task beats every logged-in desktop (``seq`` counts up per tick, so per connection too): one
        frame serialised per tick instead of a task, a timer and a drain per desktop."""
        for seq in itertools.count():
            data = Heartbeat(seq=seq).to_bytes()
            for session in list(self.sessions):
                if session.beating:
                    session.write_nowait(data)
            await asyncio.sleep(self.desktop_heartbeat_ms / 1000)

    async def _handle(self, session: Session, frame: Any) -> None:
        if isinstance(frame, Heartbeat):
            return
        runtime = session.runtime
        if isinstance(frame, StateReport):
            if runtime is not None:
                runtime.on_state_report(session, frame)
            return
        if isinstance(frame, Login):
            if runtime is not None:
                await session.send(ErrorFrame(req=frame.req, code="invalid_transition", fatal=False,
                                              reason=f"this connection is already logged in as {session.agent_id}"))
                return
            await self._login(session, frame)
            return
        req = getattr(frame, "req", None)
        if runtime is None or not runtime.term.active:
            await session.send(ErrorFrame(req=req, code="not_logged_in", fatal=False,
                                          reason=f"{frame.TYPE}: log in first"))
            return
        try:
            await runtime.request(session, frame)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._log.warning("desktop request failed on the store", zone=runtime.zone, error=str(exc))
            await session.send(ErrorFrame(req=req, code="zone_unavailable", fatal=False,
                                          reason=f"zone {runtime.zone}: state not saved ({type(exc).__name__})"))

    async def _login(self, session: Session, frame: Login) -> None:
        zone = frame.zone
        if zone not in self.zone_names:
            self.refused_logins += 1
            await session.send(ErrorFrame(
                req=frame.req, code="unknown_zone", fatal=False,
                reason=f"zone {zone!r} is not a zone of this deployment; known: {self.zone_names}"))
            return
        runtime = self.runtimes.get(zone)
        if (runtime is None or not runtime.term.active) and await self._master_gone(zone):
            runtime = await self._park(session, zone)
        if runtime is not None and runtime.resetting:
            self.refused_logins += 1
            await session.send(ErrorFrame(
                req=frame.req, code="zone_unavailable", fatal=False,
                reason=f"zone {zone}: being handed to its allocated server (Save and Apply); try the next address"))
            return
        if runtime is None or not runtime.term.active:
            self.refused_logins += 1
            await session.send(ErrorFrame(req=frame.req, code="zone_unavailable", fatal=False,
                                          reason=await self._not_master_reason(zone)))
            return
        try:
            await runtime.login(session, frame)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._log.warning("desktop login failed on the store", zone=zone, error=str(exc))
            await session.send(ErrorFrame(req=frame.req, code="zone_unavailable", fatal=False,
                                          reason=f"zone {zone}: login not saved ({type(exc).__name__})"))

    async def _lease(self, zone: str) -> Any:
        """The zone's lease row, read at most every LEASE_CACHE_S (a failover's reconnect storm must not turn
        into one database read per refused login); None when unknown."""
        now = time.monotonic()
        cached = self._lease_cache.get(zone)
        if cached is not None and now - cached[0] < LEASE_CACHE_S:
            return cached[1]
        lease = None
        with contextlib.suppress(StatusStoreError, OSError, TimeoutError):
            lease = await self.store.read(SERVICE, zone, timeout_s=self.timings.store_timeout_s)
        self._lease_cache[zone] = (time.monotonic(), lease)
        return lease

    async def _master_gone(self, zone: str) -> bool:
        """Whether this AM is about to compete for the zone: its lease is free or expired, already ours, or its
        holder's failure is corroborated on this AM's heartbeat link."""
        elector = next((e for e in self.electors if e.service == SERVICE and e.scope == zone), None)
        if elector is None:
            return False
        lease = await self._lease(zone)
        if lease is None or lease.expired or lease.holder_instance is None:
            return True
        if lease.holder_server == self.config.server:
            return True
        node = self.heartbeats.get(SERVICE)
        return node is not None and node.failure_corroborated(lease.holder_instance)

    async def _park(self, session: Session, zone: str) -> ZoneRuntime | None:
        """Hold a login while this AM takes the zone over (at most LOGIN_PARK_S): the desktop is served as soon
        as the takeover starts instead of walking its address list with backoff."""
        self.parked_logins += 1
        deadline = time.monotonic() + LOGIN_PARK_S
        while not session.closed:
            changed = self._masters_changed  # set (and replaced) when a term starts: wakes every parked login
            runtime = self.runtimes.get(zone)
            if runtime is not None and runtime.term.active:
                return runtime
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()
        return None

    async def _not_master_reason(self, zone: str) -> str:
        where = "no master known"
        with contextlib.suppress(StatusStoreError, OSError, TimeoutError):
            lease = await self._lease(zone)
            if lease is not None and not lease.expired and lease.holder_server:
                if lease.holder_server == self.config.server:
                    where = "this Agent Manager is taking it over"
                else:
                    addr = self.peer_desktop_addresses.get(lease.holder_server, "?")
                    where = f"master is {lease.holder_server} at {addr}"
        return f"zone {zone}: {self.config.server} is not its Agent Manager master; {where}"
