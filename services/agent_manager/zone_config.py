"""Zone configuration "Save and Apply" on the Agent Manager side (requests in ``zone_apply_requests``).

* The zone's current master (this AM holding the zone's lease) handles a pending request: every agent of
  the zone is forced out (``FORCED_LOGOUT zone_reset``, rows persisted logged out under the fence), the
  request is marked handled (fenced), then the zone lease is released (``Elector.release``: the term ends,
  the desktops' sessions close and they walk their address lists) and ``released_at`` is recorded.
* Hand-over: from the request until ``released_at + grace_s``, an AM that is not the allocated server
  skips claiming the free zone while the allocated server has a live ``agent_manager`` member row
  (``AllocationSpread.load`` reports a huge load for that zone, so the HA core's ClaimSpread keeps leaving
  the lease to the others); the allocated server's AM claims it at once (load 0 for that zone, no
  ``claim_spread_ms`` wait). If the allocated AM is not alive, nobody skips: the zone is never orphaned.
  This is done here, without touching ``pom_ha/ha``, by giving the electors of this daemon a ClaimSpread
  subclass (the one hook the HA core offers for "should this daemon claim this free lease now").
* Takeovers of a failed master are not affected (the HA core never delays them by the spread).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from pom_ha.ha.daemon import HADaemon
from pom_ha.ha.election import ClaimSpread, Elector
from services.agent_manager.zone import ZoneRuntime

log = structlog.get_logger("services.agent_manager.zone_config")

POLL_S = 0.25
MEMBER_ALIVE_S = 5.0
RESERVED_LOAD = 1_000_000

SQL_REQUESTS = """
SELECT r.id, r.zone, r.allocated_server, r.reason, r.handled_at IS NOT NULL AS handled,
       EXTRACT(EPOCH FROM (coalesce(r.released_at, r.handled_at, now()) + r.grace_s * interval '1 second'
                           - now()))::float8 AS remaining_s,
       EXISTS (SELECT 1 FROM ha_member m WHERE m.service = 'agent_manager' AND m.server = r.allocated_server
               AND m.state IN ('MASTER', 'DORMANT') AND m.seen_at > now() - $1 * interval '1 second') AS alive
FROM zone_apply_requests r
WHERE r.handled_at IS NULL OR coalesce(r.released_at, r.handled_at) + r.grace_s * interval '1 second' > now()
ORDER BY r.id
"""
SQL_HANDLED = ("UPDATE zone_apply_requests SET handled_at = now(), handled_by = $2, logged_out = $3, result = $4"
               " WHERE id = $1 AND handled_at IS NULL AND {fence}")
SQL_RELEASED = "UPDATE zone_apply_requests SET released_at = now() WHERE id = $1"


@dataclass
class Reservation:
    server: str
    until: float  # monotonic
    alive: bool


class AllocationSpread(ClaimSpread):
    """ClaimSpread that keeps a zone being handed to another (live) AM out of this daemon's claims."""

    def __init__(self, step_s: float, me: str, reservations: Callable[[], dict[str, Reservation]]) -> None:
        super().__init__(step_s)
        self.me = me
        self._reservations = reservations

    def load(self, asking: Elector) -> int:
        res = self._reservations().get(asking.scope)
        if res is not None and res.alive and time.monotonic() < res.until:
            return 0 if res.server == self.me else RESERVED_LOAD
        return super().load(asking)


class ZoneConfigWatcher:
    def __init__(self, daemon: HADaemon, runtimes: dict[str, ZoneRuntime]) -> None:
        self.daemon = daemon
        self.runtimes = runtimes  # zone -> its runtime while this daemon is the zone's master
        self.me = daemon.config.server
        self.reservations: dict[str, Reservation] = {}
        self._wake = asyncio.Event()
        self._busy: set[int] = set()
        self._log = log.bind(server=self.me)

    def install(self, electors: list[Elector], step_s: float) -> None:
        spread = AllocationSpread(step_s, self.me, lambda: self.reservations)
        for elector in electors:
            spread.join(elector)
            elector.use_spread(spread)  # the HA core's claim hook (see the module doc)

    def reserve(self, zone: str, server: str, seconds: float) -> None:
        self.reservations[zone] = Reservation(server, time.monotonic() + seconds, True)

    async def run(self) -> None:
        pool = await self.daemon.app_db()
        conn: Any = None
        listener: Callable[..., None] = lambda *_a: self._wake.set()  # noqa: E731
        while True:
            try:
                if conn is None:
                    conn = await pool.acquire()
                    await conn.add_listener("zone_apply_requests", listener)
                rows = await conn.fetch(SQL_REQUESTS, MEMBER_ALIVE_S)
                self._refresh(rows)
                for r in rows:
                    if not r["handled"] and int(r["id"]) not in self._busy:
                        self._maybe_handle(r)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self._log.warning("zone configuration poll failed; retrying", error=str(exc))
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await pool.release(conn)
                    conn = None
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self._wake.wait()

    def _refresh(self, rows: list[Any]) -> None:
        now = time.monotonic()
        fresh: dict[str, Reservation] = {}
        for r in rows:
            remaining = float(r["remaining_s"] or 0.0)
            if remaining > 0:
                fresh[r["zone"]] = Reservation(r["allocated_server"], now + remaining, bool(r["alive"]))
        # keep a local reservation (set before our own release) until it ends
        for zone, res in self.reservations.items():
            if zone not in fresh and res.until > now:
                fresh[zone] = res
        self.reservations = fresh

    def _maybe_handle(self, r: Any) -> None:
        zone = r["zone"]
        runtime = self.runtimes.get(zone)
        if runtime is None or not runtime.term.active:
            return  # not our zone (its master handles it; a free zone goes to the allocated AM)
        req_id = int(r["id"])
        self._busy.add(req_id)
        self.daemon.spawn(self._handle(req_id, zone, r["allocated_server"], bool(r["alive"]), str(r["reason"])),
                          name=f"zone-apply-{req_id}")

    async def _handle(self, req_id: int, zone: str, server: str, alive: bool, reason: str = "zone_reset") -> None:
        try:
            runtime = self.runtimes.get(zone)
            if runtime is None or not runtime.term.active:
                return
            if reason == "sdk_connection_lost":
                await self._sdk_lost(runtime, req_id, zone, server, alive)
                return
            moving = server != self.me
            if moving and not alive:
                # releasing now would leave the zone to whoever claims first: refuse, nobody is logged out
                result = f"refused: no live Agent Manager on {server}; zone kept by {self.me}, no agent logged out"
                await self.daemon.fenced_execute(runtime.term, SQL_HANDLED, req_id, self.me, 0, result)
                self._log.warning("zone apply refused", zone=zone, request=req_id, reason=result)
                return
            count = await runtime.reset("zone_reset", f"zone {zone}: Save and Apply by the administrator; "
                                        f"the zone is allocated to {server}", keep_closed=moving)
            if count is None:
                self._log.warning("zone apply: no longer master before the agents were logged out", zone=zone)
                return
            result = f"{count} agent(s) logged out; " + (
                f"zone released to {server}" if moving else "zone kept: already on the allocated server")
            ok = await self.daemon.fenced_execute(runtime.term, SQL_HANDLED, req_id, self.me, count, result)
            if not ok:
                self._log.warning("zone apply: fence lost before the request was marked", zone=zone)
                return
            self._log.info("zone apply", zone=zone, request=req_id, allocated=server, logged_out=count)
            if not moving:
                runtime.reopen()
                return
            grace = await self._grace(req_id)
            self.reserve(zone, server, grace)
            elector = next(e for e in self.daemon.electors if e.scope == zone and e.service == runtime.term.service)
            await elector.release(f"zone {zone} applied to {server}")
            pool = await self.daemon.app_db()
            await pool.execute(SQL_RELEASED, req_id)
            self._log.info("zone released to its allocated server", zone=zone, allocated=server, request=req_id)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._log.warning("zone apply failed; will retry", zone=zone, request=req_id, error=str(exc))
        finally:
            self._busy.discard(req_id)
            self._wake.set()

    async def _sdk_lost(self, runtime: Any, req_id: int, zone: str, server: str, alive: bool) -> None:
        """Workspaces: the agent SDK's link to this AM broke for the zone. Every agent is logged out
        (``FORCED_LOGOUT sdk_connection_lost``, calls closed DESKTOP_ERROR); the zone goes to the secondary AM
        (``server``) when it is alive, where the desktops log in again; otherwise it stays here and they log in
        again here (their secondary address refuses them and names this master)."""
        moving = server != self.me and alive
        count = await runtime.reset("sdk_connection_lost", f"zone {zone}: the agent SDK connection to the Agent "
                                    f"Manager on {self.me} broke; log in again at the secondary address "
                                    f"({server})", keep_closed=moving)
        if count is None:
            self._log.warning("sdk connection lost: no longer master before the agents were logged out", zone=zone)
            return
        result = f"sdk_connection_lost: {count} agent(s) logged out; " + (
            f"zone handed to the secondary Agent Manager on {server}" if moving else
            f"zone kept by {self.me}" + ("" if server == self.me else f" (no live Agent Manager on {server})"))
        if not await self.daemon.fenced_execute(runtime.term, SQL_HANDLED, req_id, self.me, count, result):
            self._log.warning("sdk connection lost: fence lost before the request was marked", zone=zone)
            return
        self._log.warning("agent sdk connection lost", zone=zone, request=req_id, secondary=server, logged_out=count,
                          moving=moving)
        if not moving:
            runtime.reopen()
            return
        self.reserve(zone, server, await self._grace(req_id))
        elector = next(e for e in self.daemon.electors if e.scope == zone and e.service == runtime.term.service)
        await elector.release(f"zone {zone}: agent SDK connection lost, handed to {server}")
        pool = await self.daemon.app_db()
        await pool.execute(SQL_RELEASED, req_id)

    async def _grace(self, req_id: int) -> float:
        pool = await self.daemon.app_db()
        value = await pool.fetchval("SELECT grace_s FROM zone_apply_requests WHERE id = $1", req_id)
        return float(value or 0.0)
