"""Runtime parameter changes of this CM's running jobs, received over ActiveMQ (docs/activemq.md).

The CM subscribes to :data:`~pom_ha.messaging.runtime.RUNTIME_QUEUE` with the selector
``pom_owner = '<its instance id>'`` (made again after every broker failover), applies a change to the
job's runner and answers on :data:`~pom_ha.messaging.runtime.REPLY_QUEUE`. The message is ACKed only after
the answer was confirmed by the broker, so a change being handled when the broker died is delivered again
by the new master; the request id makes that copy (or the sender's resend) answer with the first result
instead of applying twice.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from pom_ha.messaging.runtime import REPLY_QUEUE, REQUEST_HEADER, RuntimeChange, RuntimeReply, owner_selector
from pom_ha.messaging.stomp import Frame, StompClient
from services.campaign_manager.completions import DB_ERRORS
from services.campaign_manager.job_store import FenceLost

REMEMBERED_REQUESTS = 10_000
REPLY_TTL_MS = 120_000


class RuntimeControl:
    def __init__(self, client: StompClient, *, server: str, instance: str, runner_of: Callable[[int], Any],
                 log: Any) -> None:
        self.client = client
        self.server, self.instance = server, instance
        self.runner_of = runner_of  # job id -> its active JobRunner or None
        self.log = log
        self.done: OrderedDict[str, RuntimeReply] = OrderedDict()
        self.applied = 0
        self.refused = 0
        self.duplicates = 0
        # one change at a time, in arrival order: two changes of a job apply in the order they were queued,
        # and a second copy of a request (a resend after a failover) finds the first one's result
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        from pom_ha.messaging.runtime import RUNTIME_QUEUE

        await self.client.subscribe(RUNTIME_QUEUE, self.on_message, selector=owner_selector(self.instance),
                                    prefetch=10)

    async def on_message(self, frame: Frame) -> None:
        try:
            change = RuntimeChange.from_json(frame.body)
        except (ValueError, KeyError, TypeError) as exc:
            self.log.warning("malformed runtime change dropped", error=str(exc), body=frame.body[:200])
            return  # ACKed: it can never be applied
        async with self._lock:
            reply = self.done.get(change.request_id)
            if reply is not None:
                self.duplicates += 1
            else:
                reply = await self._apply(change)
                self.done[change.request_id] = reply
                while len(self.done) > REMEMBERED_REQUESTS:
                    self.done.popitem(last=False)
        # the reply must be confirmed before the change is ACKed (an exception leaves it unACKed)
        await self.client.send(REPLY_QUEUE, reply.to_json(), timeout_s=5.0, headers={
            REQUEST_HEADER: change.request_id, "expires": str(int(time.time() * 1000) + REPLY_TTL_MS)})

    async def _apply(self, change: RuntimeChange) -> RuntimeReply:
        def answer(status: str, detail: str) -> RuntimeReply:
            if status == "applied":
                self.applied += 1
            else:
                self.refused += 1
            self.log.info("runtime change " + status, job=change.job_id, action=change.action,
                          request=change.request_id, detail=detail)
            return RuntimeReply(change.request_id, change.job_id, status, detail, self.server, self.instance)

        if change.expired():
            return answer("refused", "the change expired before it reached the Campaign Manager; nothing applied")
        runner = self.runner_of(change.job_id)
        if runner is None:
            return answer("refused", f"job {change.job_id} is not run by this Campaign Manager any more "
                                     "(moved or ended); nothing applied — send the change again")
        try:
            detail = await runner.apply_runtime_change(change.action, change.pacing_rate, change.request_id)
        except RuntimeRefused as exc:
            return answer("refused", str(exc))
        except FenceLost:
            return answer("refused", f"job {change.job_id} moved to another Campaign Manager meanwhile; "
                                     "nothing applied — send the change again")
        except DB_ERRORS as exc:
            return answer("refused", f"the database did not confirm the change ({type(exc).__name__}); "
                                     "nothing applied — send it again")
        return answer("applied", detail)


class RuntimeRefused(Exception):
    """The job cannot take the change now (its state, or it is no longer ours); nothing was applied."""
