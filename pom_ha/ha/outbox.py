"""HA events waiting to be written: transitions happen exactly when the store may be unreachable.

An elector appends one :class:`HAEvent` per transition; :meth:`EventOutbox.flush` writes them in order
and keeps the rest when the store fails. Each event is back-dated by the time it waited (``age_s``, on
the monotonic clock), so the timeline stays right even when written late. Bounded: the oldest events
are dropped (and counted) after ``max_events``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from pom_ha.ha.store import HAEvent, StatusStore, StatusStoreError


class EventOutbox:
    def __init__(self, max_events: int = 512, clock: Callable[[], float] = time.monotonic) -> None:
        self._queue: deque[tuple[HAEvent, float]] = deque()
        self._max = max_events
        self._clock = clock
        self._flushing = False
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, event: HAEvent) -> None:
        if len(self._queue) >= self._max:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append((event, self._clock()))

    async def flush(self, store: StatusStore, timeout_s: float) -> int:
        """Write queued events in order; returns how many were written (stops at the first failure).

        One flusher at a time: a second caller while a flush runs returns 0 at once — the running flush
        keeps going until the queue is empty, so it also writes what the second caller wanted written (two
        flushers would write the head event twice and pop past the end of the queue).
        """
        if self._flushing:
            return 0
        self._flushing = True
        written = 0
        try:
            while self._queue:
                event, queued_at = self._queue[0]
                try:
                    await store.record_event(replace(event, age_s=max(0.0, self._clock() - queued_at)),
                                             timeout_s=timeout_s)
                except StatusStoreError:
                    break
                self._queue.popleft()
                written += 1
        finally:
            self._flushing = False
        return written
