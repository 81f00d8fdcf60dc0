"""Cache client without servers: values round-trip, impact errors say what was refused, the rebuild stages
a running job through Filter in Progress, a client with every node down refuses at once, and the node
supervisor starts, restarts with backoff and kills a hung node (fake launcher, no JVM)."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from pom_ha.cache import (
    AddContactRefused,
    AgentEntry,
    CacheUnavailable,
    Callback,
    CallbackRefused,
    ContactAdd,
    JobCounters,
    JobEntry,
    JobStartRefused,
    OperationalCache,
    StatisticsFrozen,
)
from pom_ha.cache.rebuild import _staged
from pom_ha.ha.retry import Backoff
from pom_ha.infra.process import InfraError, ProcessRecord
from services.cache_service.supervisor import NodeSupervisor


def test_values_round_trip() -> None:
    job = JobEntry(7, 3, "east", "Running", JobCounters(10, 4, 1, 5, 0, 9, 1, 8, {"ANSWER_HUMAN": 6}),
                   updated_at=1.5)
    assert JobEntry.decode(job.encode()) == job
    paused = JobEntry(8, 3, "east", "Paused", None, refilter=True)
    assert JobEntry.decode(paused.encode()) == paused
    agent = AgentEntry("a1", "Ready", job_id=7)
    assert AgentEntry.decode(agent.encode()) == agent
    cb = Callback("cb1", 7, "c1", "a1", "2026-12-01T10:00:00+00:00", "call back after lunch")
    assert Callback.decode(cb.encode()) == cb
    contact = ContactAdd(4, "c9", "+33123456789", "Europe/Paris", {"name": "x"})
    assert ContactAdd.decode(contact.encode()) == contact
    assert contact.key == "4:c9"


@pytest.mark.parametrize(
    ("error", "impact"),
    [(CallbackRefused, "callback refused"), (StatisticsFrozen, "monitor statistics frozen"),
     (JobStartRefused, "new job start refused"), (AddContactRefused, "add contact refused")],
)
def test_impact_errors_are_distinct_and_clear(error: type[CacheUnavailable], impact: str) -> None:
    exc = error("start job 7", "no cache node is reachable")
    assert isinstance(exc, CacheUnavailable)
    assert str(exc).startswith(impact + ": start job 7")
    assert "nothing was changed" in str(exc)


def test_rebuild_stages_running_through_filter_in_progress_and_holds_paused_statistics() -> None:
    counters = JobCounters(contacts_total=3)
    running = JobEntry(1, 1, "default", "Running", counters, source="rebuild")
    first, then = _staged(running)
    assert (first.state, first.counters) == ("Filter in Progress", None)
    assert then == running
    first, then = _staged(JobEntry(2, 1, "default", "Paused", counters))
    assert (first.state, first.counters, first.refilter, then) == ("Paused", None, True, None)
    queued = JobEntry(3, 1, "default", "Queued", counters)
    assert _staged(queued) == (queued, None)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_every_node_down_is_refused_quickly_with_the_operations_impact() -> None:
    cache = OperationalCache([("127.0.0.1", _closed_port()), ("127.0.0.1", _closed_port())], deadline_s=30)
    calls = [
        (cache.set_callback(Callback("cb", 1, "c", None, "2026-12-01T10:00:00+00:00")), CallbackRefused),
        (cache.job_statistics([1, 2]), StatisticsFrozen),
        (cache.start_job(JobEntry(1, 1, "default", "Filter in Progress")), JobStartRefused),
        (cache.add_contact(ContactAdd(1, "c", "+33123456789", "Europe/Paris")), AddContactRefused),
    ]
    for call, error in calls:
        t0 = time.monotonic()
        with pytest.raises(error, match="all 2 down"):
            await call
        assert time.monotonic() - t0 < 2.0
    assert cache.stats.refused == 4
    await cache.close()


class FakeLauncher:
    name = "ignite-pom9"
    start_timeout_s = 5.0

    def __init__(self) -> None:
        self.alive = False
        self.healthy = False
        self.starts = 0
        self.kills = 0
        self.refuse_start = False

    def running(self) -> bool:
        return self.alive

    async def probe(self) -> bool:
        return self.alive and self.healthy

    def start(self) -> ProcessRecord:
        if self.refuse_start:
            raise InfraError("port in use")
        self.starts += 1
        self.alive = True
        return ProcessRecord(self.name, 1000 + self.starts, "m", "log")

    def kill(self) -> None:
        self.kills += 1
        self.alive = False

    def topology_servers(self) -> int | None:
        return 3 if self.alive else None

    def record(self) -> ProcessRecord | None:
        return ProcessRecord(self.name, 1000 + self.starts, "m", "log") if self.alive else None


async def test_supervisor_starts_restarts_with_backoff_and_kills_a_hung_node(monkeypatch: Any) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])

    async def no_thread(fn: Any, *args: Any) -> Any:
        return fn(*args)

    monkeypatch.setattr(asyncio, "to_thread", no_thread)
    node = FakeLauncher()
    sup = NodeSupervisor(node, backoff=Backoff(initial_s=1.0, max_s=8.0, jitter=0.0),  # type: ignore[arg-type]
                         hung_after_s=5.0, stable_after_s=10.0)
    await sup.tick()  # down -> started at once
    assert (node.starts, sup.state) == (1, "starting")
    node.healthy = True
    await sup.tick()
    assert sup.state == "healthy" and sup.healthy_event.is_set()
    assert not sup.topology_settled(3.0)
    now[0] += 3.0
    assert sup.topology_settled(3.0)
    now[0] -= 3.0
    node.alive = False  # crash
    now[0] += 0.5
    await sup.tick()  # the first start's backoff (1 s) has not passed yet
    assert (sup.state, sup.crashes, node.starts) == ("down", 1, 1)
    now[0] += 1.0
    await sup.tick()
    assert (node.starts, sup.state) == (2, "starting")
    node.alive = False  # crash loop: the next start waits 2 s
    now[0] += 1.5
    await sup.tick()
    assert node.starts == 2
    node.refuse_start = True
    now[0] += 1.0
    await sup.tick()
    assert node.starts == 2 and sup.last_error == "port in use"
    node.refuse_start = False
    now[0] += 5.0
    await sup.tick()
    assert node.starts == 3
    node.healthy = False  # alive but never healthy: killed after hung_after_s, then started again
    now[0] += 6.0
    await sup.tick()
    assert node.kills == 1 and sup.hung_kills == 1
    now[0] += 10.0
    await sup.tick()
    assert node.starts == 4


async def test_whole_cluster_start_is_staggered_but_a_lone_restart_is_not(monkeypatch: Any) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])

    async def no_thread(fn: Any, *args: Any) -> Any:
        return fn(*args)

    monkeypatch.setattr(asyncio, "to_thread", no_thread)
    peer_up = [False]

    async def peers() -> bool:
        return peer_up[0]

    node = FakeLauncher()
    sup = NodeSupervisor(node, rank=2, stagger_s=10.0, peers=[("127.0.0.1", 1)])  # type: ignore[arg-type]
    monkeypatch.setattr(sup, "_a_peer_answers", peers)
    await sup.tick()
    assert node.starts == 0 and sup.state == "down"  # nobody up: the lower-ranked servers go first
    now[0] += 5.0
    peer_up[0] = True
    await sup.tick()
    assert node.starts == 1  # a peer is up: join it at once
    node.alive = False
    peer_up[0] = False
    sup2 = NodeSupervisor(FakeLauncher(), rank=1, stagger_s=10.0, peers=[("127.0.0.1", 1)])  # type: ignore[arg-type]
    monkeypatch.setattr(sup2, "_a_peer_answers", peers)
    await sup2.tick()
    now[0] += 10.5
    await sup2.tick()
    assert sup2.launcher.starts == 1  # type: ignore[attr-defined]  # nobody came: it forms the cluster itself
