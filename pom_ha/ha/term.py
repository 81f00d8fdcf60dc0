"""A master term: one epoch of mastership, and the tasks that may only run during it.

The elector creates a :class:`MasterTerm` on promotion and ends it on demotion or release. Ending is
synchronous (every task gets ``cancel()`` at once) so the elector can stop master work exactly at its
deadline, before the lease could have expired anywhere. Used as an async context manager, a term behaves
like a TaskGroup bounded by the term::

    async with role.master_scope() as term:          # raises NotMaster when not master
        term.create_task(write_loop(term.epoch))
    # the block returns once the term has ended and its tasks are done; a task that crashed re-raises here
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")


class NotMaster(Exception):
    """Master-only work was requested while not master (or after the term ended)."""


class MasterTerm:
    """``on_error(task, error)``: called when a task of the term crashes (besides the re-raise at ``__aexit__``),
    for holders that supervise the term's tasks themselves (e.g. a job runner of the Campaign Manager)."""

    def __init__(self, service: str, scope: str, epoch: int, *,
                 on_error: Callable[[asyncio.Task[Any], BaseException], None] | None = None) -> None:
        self.service = service
        self.scope = scope
        self.epoch = epoch
        self.ended = asyncio.Event()
        self.end_reason: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._failed = asyncio.Event()
        self._errors: list[BaseException] = []
        self._on_error = on_error

    @property
    def active(self) -> bool:
        return not self.ended.is_set()

    def create_task(self, coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        """Run ``coro`` for the rest of this term; it is cancelled when the term ends."""
        if not self.active:
            coro.close()
            raise NotMaster(f"term of epoch {self.epoch} ended: {self.end_reason}")
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self._errors.append(error)
            self._failed.set()
            if self._on_error is not None:
                self._on_error(task, error)

    def end(self, reason: str) -> None:
        """End the term now: cancel every task (synchronously). Idempotent."""
        if self.ended.is_set():
            return
        self.end_reason = reason
        self.ended.set()
        for task in list(self._tasks):
            task.cancel()

    async def wait_tasks(self, timeout_s: float | None = None) -> bool:
        """Wait for the term's tasks to finish; False if some were still running at ``timeout_s``."""
        pending = [t for t in self._tasks if not t.done()]
        if not pending:
            return True
        _done, still = await asyncio.wait(pending, timeout=timeout_s)
        return not still

    async def __aenter__(self) -> MasterTerm:
        if not self.active:
            raise NotMaster(f"term of epoch {self.epoch} ended: {self.end_reason}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            ended = asyncio.ensure_future(self.ended.wait())
            failed = asyncio.ensure_future(self._failed.wait())
            try:
                await asyncio.wait({ended, failed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in (ended, failed):
                    waiter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiter
        for task in list(self._tasks):
            task.cancel()
        await self.wait_tasks()
        if exc is None and self._errors:
            raise self._errors[0]
