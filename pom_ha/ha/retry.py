"""Backoff policy for reconnects and retries: exponential, jittered, capped, with an injectable sleep.

Modelled on kazoo's ``KazooRetry``: the policy owns no clock and no event loop, so a test passes a fake
``sleep`` (and a seeded ``random``) and runs a retry loop instantly.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

Sleep = Callable[[float], Awaitable[None]]


@dataclass
class Backoff:
    """Delays ``initial_s * factor**n`` capped at ``max_s``, each multiplied by ``1 ± jitter``.

    ``reset()`` after a success; ``next_delay()`` after a failure; ``await wait()`` sleeps that delay.
    """

    initial_s: float = 0.05
    max_s: float = 5.0
    factor: float = 2.0
    jitter: float = 0.2
    sleep: Sleep = asyncio.sleep
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def reset(self) -> None:
        self.attempts = 0

    def next_delay(self) -> float:
        base = min(self.max_s, self.initial_s * (self.factor ** self.attempts))
        self.attempts += 1
        spread = base * self.jitter
        return max(0.0, min(self.max_s, base + self.rng.uniform(-spread, spread)))

    async def wait(self) -> float:
        delay = self.next_delay()
        await self.sleep(delay)
        return delay
