"""How a job's attempts end: call outcomes, refused dials, timeouts, and the takeover of a dead owner's
in-flight attempts — all through one path that reads the contacts' attempts under lock, asks
:mod:`decisions` what each contact does next, and writes attempts and contacts in one fenced transaction.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from pom_ha.domain.attempts import CompletionCode
from pom_ha.domain.strategy import RetryStrategy
from services.campaign_manager.decisions import resolve_completions
from services.campaign_manager.job_store import FenceLost, JobStore, WriteConflict
from services.campaign_manager.metrics import CMMetrics

DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass(frozen=True, slots=True)
class Completion:
    """One attempt's end as reported (or decided) here. ``retry_at`` overrides the strategy for an attempt
    that never left (the platform refused its DIAL)."""

    contact_id: str
    attempt_no: int
    code: CompletionCode
    duration_ms: int | None = None
    retry_at: datetime | None = None


class CompletionWriter:
    """Applies completions of one job in batches (arrival order), retrying on database errors."""

    def __init__(self, store: JobStore, strategy: RetryStrategy, custom: Iterable[CompletionCode],
                 metrics: CMMetrics, log: Any, *, max_batch: int = 500, on_done: Callable[[str, int], None],
                 on_recorded: Callable[[list[tuple[str, int, str, int | None]]], Awaitable[None]] | None = None,
                 ) -> None:
        self.store = store
        self.strategy = strategy
        self.custom = list(custom)
        self.metrics = metrics
        self.log = log
        self.max_batch = max_batch
        self.on_done = on_done
        self.on_recorded = on_recorded  # after the commit: events and published results (never raises)
        self.queue: asyncio.Queue[Completion] = asyncio.Queue()
        self.busy = False

    @property
    def idle(self) -> bool:
        return self.queue.empty() and not self.busy

    def offer(self, completion: Completion) -> None:
        self.queue.put_nowait(completion)

    async def run(self) -> None:
        """Until cancelled; raises FenceLost when the job is no longer ours."""
        while True:
            batch = [await self.queue.get()]
            self.busy = True
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            delay = 0.05
            while True:
                try:
                    await self.apply(batch)
                    break
                except WriteConflict as exc:  # cannot happen with one writer per job; never loop on it
                    self.log.error("BUG: completion batch conflicted, dropped", error=str(exc), size=len(batch))
                    break
                except DB_ERRORS as exc:
                    self.log.warning("cannot record outcomes, retrying", error=f"{type(exc).__name__}: {exc}",
                                     retry_in_s=delay)
                    await asyncio.sleep(delay)
                    delay = min(2.0, delay * 2)
            self.busy = False

    async def apply(self, batch: list[Completion]) -> None:
        latest = {(c.contact_id, c.attempt_no): c for c in batch}
        now = datetime.now(UTC)
        store = self.store
        async with store.pool.acquire(timeout=store.timeout_s) as conn, conn.transaction():
            rows = await store.locked_attempts(conn, sorted({c.contact_id for c in batch}))
            done, updates = resolve_completions(
                store.job_id, store.fence.epoch, self.strategy, rows, {k: c.code for k, c in latest.items()}, now,
                self.custom, {k: c.retry_at for k, c in latest.items() if c.retry_at is not None})
            recorded = [(c, n, str(code), latest[(c, n)].duration_ms) for c, n, code in done]
            await store.complete(conn, recorded, updates)
        if self.on_recorded is not None and recorded:
            try:
                await self.on_recorded(recorded)
            except Exception:  # reporting never stops recording
                self.log.exception("reporting recorded outcomes failed")
        late = len(latest) - len(done)
        self.metrics.outcomes.labels("recorded").inc(len(done))
        self.metrics.count("outcomes_recorded", len(done))
        if late:
            self.metrics.outcomes.labels("late").inc(late)
            self.metrics.count("outcomes_late", late)
            self.log.info("outcomes of attempts already resolved dropped", count=late)
        for key in latest:
            self.on_done(*key)


async def resolve_in_flight(store: JobStore, strategy: RetryStrategy, custom: Iterable[CompletionCode],
                            ) -> list[tuple[str, int, str | None, str, int]]:
    """Takeover: every attempt of the job still 'dialing' belongs to a previous owner (or a previous term
    of ours) — resolve each as CALL_FAILOVER and schedule the contact per the strategy, in one fenced
    transaction. Returns the resolved attempts (contact, attempt_no, call_id, instance, epoch)."""
    now = datetime.now(UTC)
    async with store.pool.acquire(timeout=store.timeout_s) as conn, conn.transaction():
        dialing = await store.locked_dialing(conn)
        if not dialing:
            return []
        rows = await store.locked_attempts(conn, sorted({d[0] for d in dialing}))
        codes = {(d[0], d[1]): CompletionCode.CALL_FAILOVER for d in dialing}
        done, updates = resolve_completions(store.job_id, store.fence.epoch, strategy, rows, codes, now, custom)
        await store.complete(conn, [(c, n, code, None) for c, n, code in done], updates)
    return dialing


class InFlight:
    """Attempts this runner sent and has not seen end, with when they were written (monotonic)."""

    def __init__(self) -> None:
        self.started: dict[tuple[str, int], float] = {}
        self.ended_since_sweep: set[tuple[str, int]] = set()
        self._timing_out: set[tuple[str, int]] = set()

    def __len__(self) -> int:
        return len(self.started)

    def add(self, contact_id: str, attempt_no: int) -> None:
        self.started[(contact_id, attempt_no)] = time.monotonic()

    def done(self, contact_id: str, attempt_no: int) -> None:
        self.started.pop((contact_id, attempt_no), None)
        self._timing_out.discard((contact_id, attempt_no))
        self.ended_since_sweep.add((contact_id, attempt_no))

    def unknown(self, dialing: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """Of the attempts the database shows dialing under our epoch (read after the last
        ``ended_since_sweep.clear()``), those this runner neither tracks nor saw end meanwhile."""
        return [k for k in dialing if k not in self.started and k not in self.ended_since_sweep]

    def overdue(self, timeout_s: float) -> list[tuple[str, int]]:
        """Attempts in flight longer than ``timeout_s`` (each reported once)."""
        cutoff = time.monotonic() - timeout_s
        late = [k for k, t in self.started.items() if t < cutoff and k not in self._timing_out]
        self._timing_out.update(late)
        return late


__all__ = ["DB_ERRORS", "Completion", "CompletionWriter", "FenceLost", "InFlight", "resolve_in_flight"]
