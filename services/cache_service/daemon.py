"""The Cache service daemon: a pool member (``ha_member`` service ``cache_service``, RUNNING on every server,
no election — every Ignite node serves, as in the guide) that supervises its server's Ignite node and rebuilds
the cache from PostgreSQL when the whole cache was lost and came back.

Why :class:`HADaemon` and no role of its own: the cache has no master, but the daemon still wants the base
daemon's member rows (``pom-ha status``), signals, task supervision and /health; a ``PoolMember`` role gives
exactly that and nothing else (no lease, no heartbeat).

Whole-cache loss is detected on the data, not on timing: the rebuild writes a generation into ``pom-meta``
last; an in-memory cluster that lost every node comes back without it. Any cache service that sees its local
node healthy and no generation rebuilds (one at a time, through the rebuild lock).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg

from pom_ha.cache.client import OperationalCache
from pom_ha.cache.errors import CacheUnavailable
from pom_ha.cache.rebuild import RebuildResult, rebuild_from_postgres
from pom_ha.ha.daemon import DaemonConfig, HADaemon
from pom_ha.infra.ignite import IgniteLauncher
from services.cache_service.supervisor import NodeSupervisor

SERVICE = "cache_service"


class CacheServiceDaemon(HADaemon):
    def __init__(
        self, config: DaemonConfig, *, launcher: IgniteLauncher, cache: OperationalCache,
        supervisor: NodeSupervisor | None = None, rebuild_check_s: float = 1.0, stop_node_on_exit: bool = False,
        settle_s: float = 3.0,
    ) -> None:
        super().__init__(config)
        self.launcher = launcher
        self.cache = cache
        self.supervisor = supervisor or NodeSupervisor(launcher)
        self.rebuild_check_s = rebuild_check_s
        self.settle_s = settle_s
        self.stop_node_on_exit = stop_node_on_exit
        self.rebuilds: list[RebuildResult] = []
        self.generation: int | None = None
        self.rebuild_wait = False  # another cache service holds the rebuild lock
        self._missing_logged = False

    async def setup(self) -> None:
        self.spawn(self.supervisor.run(), name="ignite-supervisor")
        self.spawn(self._rebuilder(), name="cache-rebuild")

    async def _rebuilder(self) -> None:
        """While the local node is healthy: when the cache has no generation, rebuild it from PostgreSQL."""
        failing = False
        while True:
            await self.supervisor.healthy_event.wait()
            try:
                generation = await self.cache.generation()
                if generation is None and not self._missing_logged:
                    self._log.warning("the cache has no generation (whole cache lost, or first start)")
                self._missing_logged = generation is None
                self.generation = generation
                if generation is None and not self.supervisor.topology_settled(self.settle_s):
                    pass  # creating caches while nodes still join was seen to halt Ignite nodes: wait
                elif generation is None:
                    result = await rebuild_from_postgres(await self.app_db(), self.cache,
                                                         owner=self.config.instance_id)
                    if result is not None:
                        self.rebuilds.append(result)
                        self.generation = result.generation
                    elif not self.rebuild_wait:
                        self._log.info("another cache service is rebuilding the cache")
                    self.rebuild_wait = result is None
                else:
                    self.rebuild_wait = False
                failing = False
            except (CacheUnavailable, OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                if not failing:
                    self._log.warning("cache rebuild check failed; retrying", error=str(exc))
                failing = True
            await asyncio.sleep(self.rebuild_check_s)

    def member_load(self, service: str) -> int:
        return 0

    def health(self) -> dict[str, Any]:
        out = super().health()
        last = self.rebuilds[-1] if self.rebuilds else None
        out["ignite"] = self.supervisor.snapshot()
        out["cache"] = {
            "generation": self.generation, "rebuilds": len(self.rebuilds),
            "last_rebuild": None if last is None else {
                "generation": last.generation, "jobs": last.jobs, "refiltered": last.refiltered,
                "paused": last.paused, "ms": round(last.seconds * 1000, 1),
            },
            "client": vars(self.cache.stats),
        }
        return out

    async def teardown(self) -> None:
        with contextlib.suppress(Exception):
            await self.cache.close()
        if self.stop_node_on_exit:
            await asyncio.to_thread(self.launcher.stop)
