"""Ignite of the lab: a ``pom-*`` cache is REPLICATED, survives the loss of a node, and the node rejoins."""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from pyignite import AioClient
from pyignite.datatypes.cache_config import CacheMode
from pyignite.datatypes.prop_codes import PROP_CACHE_MODE
from pyignite.exceptions import CacheError

from pom_ha.infra.base import Launcher
from pom_ha.infra.ignite import CLIENT_ERRORS, IgniteLauncher, thin_client_addresses
from pom_ha.infra.stack import Stack

pytestmark = pytest.mark.integration

T = TypeVar("T")
CACHE = "pom-smoke"
# a killed node is noticed within failureDetectionTimeout (3 s); a busy 2-core machine gets slack
DEADLINE_S = 60.0
#: a read that fails costs one dead connection at most; more than this means the client is stuck
MAX_FAILURES_PER_READ = 2


async def connect(addresses: list[tuple[str, int]]) -> AioClient:
    client = AioClient(handshake_timeout=5.0)
    await client.connect(addresses)
    return client


async def retry(op: Callable[[], Awaitable[T]], deadline_s: float = DEADLINE_S) -> tuple[T, int]:
    """Run an idempotent call until it succeeds (pyignite does not retry); returns (result, failures)."""
    failures = 0
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return await asyncio.wait_for(op(), 10.0), failures
        except (*CLIENT_ERRORS, CacheError):
            failures += 1
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def until(check: Callable[[], Awaitable[bool]], what: str, deadline_s: float = DEADLINE_S) -> float:
    """Poll ``check`` until true; returns the seconds it took."""
    t0 = time.monotonic()
    while not await check():
        assert time.monotonic() - t0 < deadline_s, f"not within {deadline_s:.0f} s: {what}"
        await asyncio.sleep(0.2)
    return time.monotonic() - t0


def ignite(launcher: Launcher) -> IgniteLauncher:
    assert isinstance(launcher, IgniteLauncher)
    return launcher


async def read(client: AioClient, key: str) -> Any:
    cache = await client.get_cache(CACHE)
    return await cache.get(key)


async def test_replicated_entry_survives_node_kill_and_node_rejoins(stack: Stack) -> None:
    nodes = [ignite(launcher) for launcher in stack.launchers("ignite")]
    assert len(nodes) >= 2, "the lab topology needs at least two ignite nodes"
    a, b = nodes[0], nodes[1]

    async def whole() -> bool:
        for n in nodes:
            if n.topology_servers() != len(nodes) or not await n.probe():
                return False
        return True

    # earlier tests of the session kill and freeze nodes (a frozen node gets segmented and halts): heal first
    await stack.heal_ignite()
    await until(whole, "every ignite node in one active cluster before the test")
    key, value = f"k-{uuid.uuid4().hex}", f"v-{uuid.uuid4().hex}"
    everyone = thin_client_addresses(stack.topo)
    assert (a.address, a.thin_client_port) in everyone
    clients: list[AioClient] = []
    try:
        for addresses in ([(a.address, a.thin_client_port)], [(b.address, b.thin_client_port)], everyone):
            client, _ = await retry(functools.partial(connect, addresses))
            clients.append(client)
        via_a, via_b, via_all = clients

        cache_a = await via_a.get_or_create_cache(CACHE)
        settings = await cache_a.settings()
        assert settings is not None
        assert settings[PROP_CACHE_MODE] == CacheMode.REPLICATED, "the pom-* template was not applied"
        await cache_a.put(key, value)
        # FULL_SYNC: the put returned after every node applied it, so B has it now; B's thin-client side may
        # learn of a cache created a moment ago a little later ("Cache does not exist"), hence the retry
        assert (await retry(lambda: read(via_b, key)))[0] == value
        assert (await retry(lambda: read(via_all, key)))[0] == value

        await asyncio.to_thread(a.kill)
        got, _ = await retry(lambda: read(via_all, key))
        assert got == value

        async def a_left() -> bool:
            return b.topology_servers() == len(nodes) - 1

        await until(a_left, f"{a.name} leaves the topology seen by {b.name}")
        # pyignite does not retry by itself: a call that lands on the dead node's address fails and the
        # client moves on. Once the cluster has dropped the node, each read needs at most a couple of tries
        # (a loaded machine makes it two rather than one; the first recovery above is bounded by its deadline)
        per_read = []
        for _ in range(10):
            got, more = await retry(lambda: read(via_all, key))
            assert got == value
            per_read.append(more)
        assert max(per_read) <= MAX_FAILURES_PER_READ, f"failed tries per read while {a.name} was down: {per_read}"
    finally:
        for client in clients:
            await client.close()
        a.start()
        await a.wait_ready()
    await check_rejoined(a, b, len(nodes), key, value)


async def check_rejoined(a: IgniteLauncher, b: IgniteLauncher, size: int, key: str, value: str) -> None:
    async def full() -> bool:
        seen_by_b = b.topology_servers() == size
        return seen_by_b and await a.role() == f"server (topology {size} nodes)"

    await until(full, f"{a.name} rejoins a {size}-node topology")
    via_a, _ = await retry(lambda: connect([(a.address, a.thin_client_port)]))
    try:
        got, _ = await retry(lambda: read(via_a, key))
        assert got == value, f"{a.name} did not get the replicated entry back after rejoining"
    finally:
        await via_a.close()
