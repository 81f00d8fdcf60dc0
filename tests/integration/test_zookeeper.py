"""The ZooKeeper ensemble: holds Kafka's metadata, keeps writing with one member down, refuses
writes without a quorum, and agrees on one state again once the members are back."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NodeExistsError
from kazoo.handlers.threading import KazooTimeoutError

from pom_ha.infra.base import Launcher
from pom_ha.infra.kafka import broker_ids
from pom_ha.infra.stack import Stack
from pom_ha.infra.zookeeper import KAFKA_CHROOT, zookeeper_connect

pytestmark = pytest.mark.integration

# kazoo's synchronous calls block forever without a quorum: every call goes through _call's timeout
CALL_TIMEOUT_S = 3.0
#: how long a write is given to be confirmed while the ensemble has no quorum
NO_QUORUM_WINDOW_S = 8.0
RECOVERY_S = 60.0
TEST_ROOT = "/pomha-test"


async def _call(start_async: Callable[[], Any], timeout_s: float = CALL_TIMEOUT_S) -> Any:
    """Run a kazoo ``*_async`` call and wait for its result off the event loop."""
    return await asyncio.to_thread(lambda: start_async().get(timeout=timeout_s))


async def _client(hosts: str) -> KazooClient:
    zk = KazooClient(hosts=hosts, timeout=10.0, connection_retry={"max_tries": -1, "max_delay": 1.0})
    await asyncio.to_thread(zk.start, 15.0)
    return zk


async def _close(zk: KazooClient) -> None:
    await asyncio.to_thread(zk.stop)
    await asyncio.to_thread(zk.close)


@pytest.fixture
async def zk(stack: Stack) -> AsyncIterator[KazooClient]:
    client = await _client(zookeeper_connect(stack.topo, chroot=False))
    try:
        yield client
    finally:
        await _close(client)


async def _create(zk: KazooClient, path: str) -> bool:
    """One attempt to create ``path``; True when the ensemble confirmed it (or it already exists)."""
    try:
        await _call(lambda: zk.create_async(path, b"x"))
    except NodeExistsError:
        return True  # an earlier attempt whose answer was lost did land
    except (KazooException, KazooTimeoutError):
        return False
    return True


async def _write_within(zk: KazooClient, path: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await _create(zk, path):
            return True
        await asyncio.sleep(0.2)
    return False


async def _wait_role(member: Launcher, role: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while await member.role() != role:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def _broker_ids_in_zk(zk: KazooClient) -> set[int]:
    try:
        children = await _call(lambda: zk.get_children_async(f"{KAFKA_CHROOT}/brokers/ids"))
    except (KazooException, KazooTimeoutError):
        return set()
    return {int(c) for c in children}


async def _wait_brokers_registered(stack: Stack, zk: KazooClient, seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    while True:
        found = await _broker_ids_in_zk(zk)
        if found == broker_ids(stack.topo) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.5)


async def _member_view(stack: Stack, member: Launcher, parent: str, paths: list[str]) -> tuple[bool, ...]:
    """Which of ``paths`` exist as seen by one member alone, after it caught up with the leader."""
    own = await _client(f"{member.address}:{stack.topo.ports.zookeeper_client}")
    try:
        await _call(lambda: own.sync_async(parent))
        return tuple([await _call(partial(own.exists_async, p)) is not None for p in paths])
    finally:
        await _close(own)


async def test_every_kafka_broker_is_registered_under_the_chroot(stack: Stack, zk: KazooClient) -> None:
    assert await _wait_brokers_registered(stack, zk, RECOVERY_S) == broker_ids(stack.topo)


async def test_writes_need_a_quorum_and_resume_when_it_is_back(stack: Stack, zk: KazooClient) -> None:
    members = stack.launchers("zookeeper")
    assert len(members) == 3, "this test is written for the three-member lab ensemble"
    roles = {m.server.name: await m.role() for m in members}
    assert sorted(roles.values()) == ["follower", "follower", "leader"], roles
    # the leader first (forces an election), then one follower: the third member is left alone
    victims: list[Launcher] = sorted(members, key=lambda m: roles[m.server.name] != "leader")[:2]
    run = f"{TEST_ROOT}/{uuid.uuid4().hex[:8]}"
    one_down, no_quorum, back = f"{run}/one-down", f"{run}/no-quorum", f"{run}/back"
    assert await _write_within(zk, TEST_ROOT, 15.0)
    assert await _write_within(zk, run, 15.0)
    try:
        victims[0].kill()
        assert await _write_within(zk, one_down, 30.0), "2 of 3 members must still accept writes"

        victims[1].kill()
        survivor = next(m for m in members if m not in victims)
        assert await _wait_role(survivor, "not serving", 15.0), "a lone member must stop serving"
        assert not await _write_within(zk, no_quorum, NO_QUORUM_WINDOW_S), (
            f"a write was confirmed by a single member within {NO_QUORUM_WINDOW_S} s"
        )
    finally:
        for victim in victims:
            victim.start()
        await asyncio.gather(*(victim.wait_ready() for victim in victims))

    assert await _write_within(zk, back, RECOVERY_S), "writes must resume once the quorum is back"
    # the unconfirmed write may or may not have landed, but every member must give the same answer
    views = {m.server.name: await _member_view(stack, m, run, [one_down, no_quorum]) for m in members}
    assert {v[0] for v in views.values()} == {True}, views
    assert len({v[1] for v in views.values()}) == 1, views
    # the brokers' sessions may have expired during the outage: leave them registered again
    assert await _wait_brokers_registered(stack, zk, RECOVERY_S) == broker_ids(stack.topo)
