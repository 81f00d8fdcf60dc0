"""A tiny deterministic coroutine scheduler on the project's virtual clock (``FakeClock``).

The real HA code is ``async`` only where it calls the status store. Here a store call suspends on a
:class:`SimFuture` (the only thing ever yielded), and the scheduler resumes the coroutine when a virtual
timer completes that future. There is no event loop, no thread and no wall clock: ``FakeClock.advance``
fires timers in (due time, creation order), so one seed always gives one history.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Coroutine, Generator
from typing import Any

from pom_ha.ha.fake_store import FakeClock


class SimTimer:
    __slots__ = ("callback", "cancelled", "due_s")

    def __init__(self, due_s: float, callback: Callable[[], None]) -> None:
        self.due_s = due_s
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class SimClock(FakeClock):
    """:class:`FakeClock` (the fake store's clock) with a leaner timer heap: the same order — due time,
    then creation — with the comparisons done on tuples."""

    def __init__(self, start_s: float = 1_000.0) -> None:
        super().__init__(start_s)
        self._heap: list[tuple[float, int, SimTimer]] = []
        self._n = 0

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> SimTimer:  # type: ignore[override]
        self._n += 1
        due = self.now_s + (delay_s if delay_s > 0.0 else 0.0)
        timer = SimTimer(due, callback)
        heapq.heappush(self._heap, (due, self._n, timer))
        return timer

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not go backwards")
        target = self.now_s + seconds
        heap, pop = self._heap, heapq.heappop
        while heap and heap[0][0] <= target:
            due, _, timer = pop(heap)
            if timer.cancelled:
                continue
            if due > self.now_s:
                self.now_s = due
            timer.callback()
        self.now_s = target


class SimFuture:
    """A one-shot result a coroutine can ``await`` inside the simulation."""

    __slots__ = ("_done", "_error", "_result", "_waiter")

    def __init__(self) -> None:
        self._done = False
        self._result: Any = None
        self._error: BaseException | None = None
        self._waiter: Callable[[], None] | None = None

    @property
    def done(self) -> bool:
        return self._done

    def set_result(self, value: Any) -> None:
        if self._done:
            return
        self._done, self._result = True, value
        self._wake()

    def set_error(self, error: BaseException) -> None:
        if self._done:
            return
        self._done, self._error = True, error
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter()

    def __await__(self) -> Generator[SimFuture, None, Any]:
        if not self._done:
            yield self
        if self._error is not None:
            raise self._error
        return self._result


class SimTask:
    """Drives one coroutine: ``step`` runs it until it awaits a pending :class:`SimFuture` or returns.

    ``resume`` is how a completed future wakes the task: the owner decides when (a paused process runs it
    on resume, a crashed one never). ``on_done(result, error)`` is called once at the end.
    """

    __slots__ = ("_coro", "_on_done", "_resume", "finished")

    def __init__(
        self, coro: Coroutine[Any, Any, Any], resume: Callable[[Callable[[], None]], None],
        on_done: Callable[[Any, BaseException | None], None],
    ) -> None:
        self._coro = coro
        self._resume = resume
        self._on_done = on_done
        self.finished = False

    def step(self) -> None:
        if self.finished:
            return
        try:
            fut = self._coro.send(None)
        except StopIteration as stop:
            self.finished = True
            self._on_done(stop.value, None)
            return
        except Exception as exc:  # the code under test raised: report it, the simulation decides
            self.finished = True
            self._on_done(None, exc)
            return
        if not isinstance(fut, SimFuture):
            self.kill()
            raise RuntimeError(f"simulated code awaited {fut!r}: only SimFuture can suspend a simulated task")
        fut._waiter = self._wake

    def _wake(self) -> None:
        self._resume(self.step)

    def kill(self) -> None:
        """The process died: the coroutine never runs again (its ``finally`` blocks do not matter)."""
        if not self.finished:
            self.finished = True
            self._coro.close()


def run_now(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (the fake store's operations) and return its value."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("a store operation suspended; the simulated store must answer at once")
