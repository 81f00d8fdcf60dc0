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
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import structlog

from pom_ha.desktop.protocol import (
    ErrorFrame,
    Frame,
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
from services.agent_manager.zone import ZoneRuntime
from services.agent_manager.zone_config import ZoneConfigWatcher

SERVICE = "agent_manager"
BIND_RETRIES = 40
log = structlog.get_logger("services.agent_manager")


class Session:
    """One desktop connection. Frames to the desktop go out one at a time (a lock per connection)."""

    _ids = itertools.count(1)

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.session_id = f"s{next(self._ids)}-{uuid.uuid4().hex[:6]}"
        self.agent_id: str | None = None
        self.runtime: ZoneRuntime | None = None
        self.closed = False
        self._lock = asyncio.Lock()

    def attach(self, runtime: ZoneRuntime, agent_id: str) -> None:
        self.runtime, self.agent_id = runtime, agent_id

    def detach(self) -> None:
        self.runtime, self.agent_id = None, None

    async def send(self, frame: Frame) -> None:
        if self.closed:
            return
        try:
            async with self._lock:
                self.writer.write(frame.to_bytes())
                async with asyncio.timeout(1.0):
                    await self.writer.drain()
        except (ConnectionError, OSError, TimeoutError):
            self.abort()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.transport.abort()


class AgentManagerDaemon(HADaemon):
    def __init__(
        self, config: DaemonConfig, *, zones: Sequence[str], desktop_port: int,
        manager_addresses: Sequence[str] = (), desktop_heartbeat_ms: int = 500, desktop_miss_limit: int = 4,
        peer_desktop_addresses: dict[str, str] | None = None,
    ) -> None:
        super().__init__(config)
        self.zone_names = list(zones)
        self.desktop_port = desktop_port
        self.manager_addresses = list(manager_addresses)
        self.peer_desktop_addresses = peer_desktop_addresses or {}
        self.desktop_heartbeat_ms = desktop_heartbeat_ms
        self.desktop_miss_limit = desktop_miss_limit
        self.runtimes: dict[str, ZoneRuntime] = {}
        self.counters = ProtocolCounters()
        self.sessions: set[Session] = set()
        self.refused_logins = 0
        self._server: asyncio.Server | None = None
        self.zone_config = ZoneConfigWatcher(self)

    # ---- HA hooks -------------------------------------------------------------------------------------------
    async def setup(self) -> None:
        # before the electors start cycling (HADaemon._start calls setup first): the claim gate of
        # "Save and Apply" (services/agent_manager/zone_config.py)
        self.zone_config.install([e for e in self.electors if e.service == SERVICE],
                                 self.timings.claim_spread_ms / 1000)
        self.spawn(self.zone_config.run(), name="zone-config")
        for attempt in range(BIND_RETRIES):
            try:
                self._server = await asyncio.start_server(
                    self._serve, self.config.address, self.desktop_port, reuse_address=True)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or attempt == BIND_RETRIES - 1:
                    raise
                await asyncio.sleep(0.05)
        self._log.info("desktop server listening", address=f"{self.config.address}:{self.desktop_port}",
                       zones=self.zone_names)

    async def run_master(self, elector: Elector, term: MasterTerm) -> None:
        runtime = ZoneRuntime(self, elector, term)
        self.runtimes[term.scope] = runtime
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
        self._log.info("desktop protocol counters", **self.counters.as_dict(), refused_logins=self.refused_logins)

    def health(self) -> dict[str, Any]:
        out = super().health()
        out["desktop"] = {
            "connections": len(self.sessions), "refused_logins": self.refused_logins,
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
        return out

    # ---- desktop connections ----------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(reader, writer)
        self.sessions.add(session)
        beats: asyncio.Task[None] | None = None
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
                if beats is None and session.runtime is not None:
                    beats = asyncio.create_task(self._heartbeats(session))
                await self._handle(session, frame)
                if beats is None and session.runtime is not None:
                    beats = asyncio.create_task(self._heartbeats(session))
        except (ConnectionError, OSError):
            pass
        finally:
            if beats is not None:
                beats.cancel()
            if session.runtime is not None:
                session.runtime.session_closed(session)
            self.sessions.discard(session)
            session.close()

    async def _heartbeats(self, session: Session) -> None:
        for seq in itertools.count():
            if session.closed:
                return
            await session.send(Heartbeat(seq=seq))
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

    async def _not_master_reason(self, zone: str) -> str:
        where = "no master known"
        with contextlib.suppress(StatusStoreError, OSError, TimeoutError):
            lease = await self.store.read(SERVICE, zone, timeout_s=self.timings.store_timeout_s)
            if lease is not None and not lease.expired and lease.holder_server:
                if lease.holder_server == self.config.server:
                    where = "this Agent Manager is taking it over"
                else:
                    addr = self.peer_desktop_addresses.get(lease.holder_server, "?")
                    where = f"master is {lease.holder_server} at {addr}"
        return f"zone {zone}: {self.config.server} is not its Agent Manager master; {where}"
