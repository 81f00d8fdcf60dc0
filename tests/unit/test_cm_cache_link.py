"""The Campaign Manager's cache link without servers: statistics published from PostgreSQL's counters and
coalesced, a frozen cache logged once per outage, and CACHE_REBUILT applied when the generation changes."""

from __future__ import annotations

import time
from typing import Any

import structlog

from pom_ha.cache import JobEntry, StatisticsFrozen
from services.campaign_manager.cache_link import CacheLink, apply_cache_rebuilt


class FakeCache:
    def __init__(self) -> None:
        self.jobs: dict[int, JobEntry] = {}
        self.down = False
        self.gen: int | None = None
        self.puts = 0
        self.stats = type("S", (), {"ok": 0})()

    async def put_job(self, entry: JobEntry) -> None:
        if self.down:
            raise StatisticsFrozen(f"update job {entry.job_id}", "no cache node is reachable")
        self.puts += 1
        self.jobs[entry.job_id] = entry

    async def generation(self) -> int | None:
        return self.gen


class FakePool:
    def __init__(self) -> None:
        self.reads = 0

    async def fetch(self, _sql: str, ids: list[int], _states: list[str],
                    timeout: float | None = None) -> list[Any]:  # noqa: ASYNC109 (asyncpg)
        self.reads += 1
        return [{"id": j, "campaign_id": 1, "zone": "default", "state": "Running", "contacts_total": 10,
                 "contacts_pending": 4, "contacts_dialing": 1, "contacts_done": 5, "contacts_filtered_out": 0,
                 "attempts_total": 7, "attempts_in_flight": 1, "attempts_completed": 6,
                 "by_code": '{"ANSWER_HUMAN": 6}'} for j in ids]


class FakeStore:
    def __init__(self, state: str) -> None:
        self.current = state

    async def state(self) -> tuple[str, str | None]:
        return self.current, "Stopped" if self.current == "Stopping" else None


class FakeRunner:
    def __init__(self, job_id: int, state: str) -> None:
        self.job_id = job_id
        self.store = FakeStore(state)
        self.active = True
        self.marks: list[tuple[str | None, bool]] = []
        self.moves: list[tuple[str, str, str | None]] = []

    def mark_refilter(self, cause: str | None, *, running: bool = False) -> None:
        self.marks.append((cause, running))

    async def set_state(self, from_state: str, to_state: str, *, reason: str | None = None) -> bool:
        if self.store.current != from_state:
            return False
        self.moves.append((from_state, to_state, reason))
        self.store.current = to_state
        return True


def link(cache: FakeCache, runners: list[FakeRunner], pool: FakePool | None = None) -> CacheLink:
    fakes: Any = runners
    return CacheLink(cache, pool or FakePool(), lambda: fakes, structlog.get_logger("test"))  # type: ignore[arg-type]


async def test_touches_are_coalesced_into_one_read_and_one_put_per_job() -> None:
    cache, pool = FakeCache(), FakePool()
    cl = link(cache, [], pool)
    for _ in range(5):
        cl.touch(3)
        cl.touch(4)
    await cl.publish_once()
    assert pool.reads == 1 and cache.puts == 2
    entry = cache.jobs[3]
    assert entry.source == "live" and entry.counters is not None and entry.counters.attempts_total == 7
    await cl.publish_once()  # nothing touched since: nothing read
    assert pool.reads == 1


async def test_frozen_statistics_are_logged_once_per_outage_and_retried() -> None:
    cache = FakeCache()
    cl = link(cache, [])
    cache.down = True
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            cl.touch(3)
            await cl.publish_once()
        assert cl.refused == 3 and cl.outages == 1 and cl.info()["frozen"]
        assert cl.info()["pending"] == 1  # kept for the next round
        cache.down = False
        await cl.publish_once()  # the job left marked is published without a new touch
        cache.down = True
        cl.touch(3)
        await cl.publish_once()
    events = [e["event"] for e in logs]
    assert events.count("statistics frozen: the cache service does not take job statistics; dialing goes on") == 2
    assert events.count("statistics publication works again") == 1
    assert cl.outages == 2 and 3 in cache.jobs


async def test_generation_change_applies_cache_rebuilt_to_running_and_paused_jobs() -> None:
    cache = FakeCache()
    running, paused, stopping = FakeRunner(1, "Running"), FakeRunner(2, "Paused"), FakeRunner(3, "Stopping")
    cl = link(cache, [running, paused, stopping])
    cache.gen = int(time.time() * 1000) - 60_000  # older than the link: the cache this CM started with
    assert not await cl.check_generation()
    assert not await cl.check_generation()
    cache.gen = None  # lost, not rebuilt yet
    assert not await cl.check_generation()
    cache.gen = int(time.time() * 1000) + 1
    assert await cl.check_generation()
    assert running.moves == [("Running", "Filter in Progress", "cache rebuilt: filtering again")]
    assert running.marks == [("cache rebuilt", True)]
    assert paused.moves == [] and paused.marks == [("cache rebuilt", False)]
    assert stopping.moves == [] and stopping.marks == []
    assert cl.rebuilds_seen == 1
    assert not await cl.check_generation()  # same generation: applied once


async def test_a_paused_job_is_not_published_after_a_rebuild_until_it_resumes() -> None:
    cache, pool = FakeCache(), FakePool()
    paused = FakeRunner(2, "Paused")
    cl = link(cache, [paused], pool)
    cache.gen = cl.started_ms + 5
    assert await cl.check_generation()
    states = {"state": "Paused"}
    original = pool.fetch

    async def fetch(*args: Any, **kwargs: Any) -> list[Any]:
        return [{**r, **states} for r in await original(*args, **kwargs)]

    pool.fetch = fetch  # type: ignore[method-assign]
    cl.touch(2)
    await cl.publish_once()
    assert 2 not in cache.jobs  # the rebuild's entry (no statistics) stays
    states["state"] = "Running"  # resumed
    cl.touch(2)
    await cl.publish_once()
    assert cache.jobs[2].counters is not None


async def test_a_first_generation_written_after_the_start_is_a_rebuild() -> None:
    cache = FakeCache()
    running = FakeRunner(1, "Running")
    cl = link(cache, [running])
    cache.gen = cl.started_ms + 5
    assert await cl.check_generation()
    assert running.store.current == "Filter in Progress"


async def test_a_job_that_left_running_meanwhile_is_left_alone() -> None:
    runner = FakeRunner(1, "Running")

    async def moved(*_a: Any, **_k: Any) -> bool:
        return False

    runner.set_state = moved  # type: ignore[method-assign]
    assert await apply_cache_rebuilt(runner) == "unchanged: the job left Running meanwhile"  # type: ignore[arg-type]
    assert runner.marks == [("cache rebuilt", True), (None, False)]
