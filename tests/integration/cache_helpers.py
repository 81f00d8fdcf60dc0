"""Helpers the cache-service integration tests share."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg

from pom_ha.cache import CacheUnavailable, OperationalCache, rebuild_from_postgres


async def rebuild_when_lock_free(db: asyncpg.Connection, cache: OperationalCache, deadline_s: float = 120.0) -> Any:
    """Our own rebuild (what a cache service does), once no other holds the rebuild lock (60 s TTL) and the
    restarted cluster takes the creation of its caches (refused as "being rebuilt" while it settles: the cache
    service waits for a settled topology too)."""
    t0 = time.monotonic()
    last: CacheUnavailable | None = None
    while True:
        try:
            result = await rebuild_from_postgres(db, cache)
        except CacheUnavailable as exc:
            result, last = None, exc
        else:
            last = None
        if result is not None:
            return result
        assert time.monotonic() - t0 < deadline_s, f"no rebuild within {deadline_s:.0f} s (lock held, or {last})"
        await asyncio.sleep(0.5)
