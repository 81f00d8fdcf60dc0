"""Keep the local Ignite server node up: start it when down, restart it after a crash with backoff, and
restart it when it stays alive but unhealthy for longer than a start may take.

Health is the launcher's own probe (thin-client handshake + cluster ACTIVE), and the node is started by the
launcher itself (``IgniteLauncher.start``): same rendered config, same pid file, same server uid through
setpriv, so the lab's fault injection and ``infra status`` see a node this supervisor restarted exactly as
one the stack started.

Whole-cluster starts are staggered: when no other node answers, the supervisor of the ``rank``-th server
waits up to ``rank * stagger_s`` for a peer to come up and then joins it, instead of every node starting at
once. Three nodes forming a cluster together on a busy 2-core machine were seen to crash in the initial
partition exchange ("Failed to reinitialize local partitions", JVM halted); a node joining a live cluster
does not. A single node lost (peers answer) is restarted at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

import structlog

from pom_ha.ha.retry import Backoff
from pom_ha.infra.ignite import IgniteLauncher, thin_handshake
from pom_ha.infra.process import InfraError

log = structlog.get_logger("services.cache_service.supervisor")

NodeState = Literal["unknown", "down", "starting", "healthy", "unhealthy"]


class NodeSupervisor:
    def __init__(
        self, launcher: IgniteLauncher, *, interval_s: float = 0.5, backoff: Backoff | None = None,
        hung_after_s: float | None = None, stable_after_s: float = 30.0,
        peers: list[tuple[str, int]] | None = None, rank: int = 0, stagger_s: float = 10.0,
    ) -> None:
        self.launcher = launcher
        self.peers = peers or []
        self.rank = rank
        self.stagger_s = stagger_s
        self.interval_s = interval_s
        # the first start is immediate; each further start waits 1 s, 2 s, 4 s ... 30 s until the node has
        # been healthy for ``stable_after_s`` (a crash loop does not hammer the machine)
        self.backoff = backoff or Backoff(initial_s=1.0, max_s=30.0, factor=2.0, jitter=0.1)
        self.hung_after_s = hung_after_s if hung_after_s is not None else launcher.start_timeout_s
        self.stable_after_s = stable_after_s
        self.state: NodeState = "unknown"
        self.starts = 0  # processes this supervisor started
        self.crashes = 0  # times the node process was found gone after it had been seen
        self.hung_kills = 0
        self.last_error: str | None = None
        self.healthy_event = asyncio.Event()
        self._since = time.monotonic()  # when the current state began
        self._next_start_at = 0.0
        self._log = log.bind(node=launcher.name)
        self._topology: tuple[int | None, float] = (None, 0.0)  # (servers seen by the node, since when)

    async def run(self) -> None:
        while True:
            await self.tick()
            await asyncio.sleep(self.interval_s)

    async def tick(self) -> None:
        now = time.monotonic()
        if not await asyncio.to_thread(self.launcher.running):
            await self._when_down(now)
            return
        if await self.launcher.probe():
            servers = await asyncio.to_thread(self.launcher.topology_servers)
            if servers != self._topology[0]:
                self._topology = (servers, now)
            if self.state != "healthy":
                self._log.info("ignite node healthy", after_s=round(now - self._since, 2), was=self.state)
                self._set("healthy", now)
                self.healthy_event.set()
            elif now - self._since > self.stable_after_s:
                self.backoff.reset()
            return
        if self.state == "healthy":
            self._log.warning("ignite node unhealthy (alive, but no handshake or cluster not ACTIVE)")
            self._set("unhealthy", now)
        elif self.state in ("unknown", "down"):
            self._set("starting", now)  # found alive (started by someone else) and not ready yet
        if now - self._since > self.hung_after_s:
            self._log.error("ignite node alive but unhealthy too long: killing it to restart it",
                            for_s=round(now - self._since, 1))
            self.hung_kills += 1
            await asyncio.to_thread(self.launcher.kill)

    async def _when_down(self, now: float) -> None:
        if self.state in ("healthy", "starting", "unhealthy"):
            self.crashes += 1
            self._log.warning("ignite node process is gone", was=self.state, crashes=self.crashes)
        if self.state != "down":
            self._set("down", now)
        if now < self._next_start_at:
            return
        if self.rank and now < self._since + self.rank * self.stagger_s and not await self._a_peer_answers():
            return  # the whole cluster is down: lower-ranked servers start first, this one joins them
        self._next_start_at = now + self.backoff.next_delay()
        try:
            rec = await asyncio.to_thread(self.launcher.start)
        except InfraError as exc:  # e.g. its ports not released yet: try again after the backoff
            self.last_error = str(exc)
            self._log.warning("cannot start ignite node yet", error=str(exc))
            return
        self.starts += 1
        self.last_error = None
        self._log.info("ignite node started", pid=rec.pid, starts=self.starts)
        self._set("starting", now)

    def topology_settled(self, for_s: float) -> bool:
        """Healthy, and the node's topology has not changed for ``for_s`` (nodes are done joining)."""
        servers, since = self._topology
        return self.state == "healthy" and servers is not None and time.monotonic() - since >= for_s

    async def _a_peer_answers(self) -> bool:
        if not self.peers:
            return True
        return any(await asyncio.gather(*(thin_handshake(h, p, 1.0) for h, p in self.peers)))

    def _set(self, state: NodeState, now: float) -> None:
        self.state = state
        self._since = now
        if state != "healthy":
            self.healthy_event.clear()

    def snapshot(self) -> dict[str, object]:
        rec = self.launcher.record()
        return {
            "node": self.launcher.name, "state": self.state, "pid": rec.pid if rec else None,
            "for_s": round(time.monotonic() - self._since, 1), "starts": self.starts, "crashes": self.crashes,
            "hung_kills": self.hung_kills, "last_error": self.last_error,
        }
