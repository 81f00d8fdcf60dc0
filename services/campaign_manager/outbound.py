"""What a Campaign Manager tells the outside world, after the database commit, never in the dial path:

* Event SDK (Kafka): ATTEMPT events (DIALED when the attempt rows are committed and the DIALs leave,
  RESULT when the outcome is recorded) and JOB events (state changes this CM made), stamped with the job's
  assignment epoch. ``publish(..., wait_for_room=False)`` only queues in librdkafka; a full queue or a
  failed delivery is counted (``events_failed``), never waited for. The publisher is created only when the
  topology has Kafka brokers and one of them answers a TCP connect (probed every 5 s until one does), so a
  CM without Kafka dials as usual.
* ActiveMQ "publish" result processor: one message per recorded batch of outcomes to
  :data:`~pom_ha.messaging.runtime.RESULTS_TOPIC`, sent with a receipt by one background task. During a
  broker failover the messages are held (bounded queue, oldest kept) and sent once a broker accepts them;
  a message that does not fit is counted ``results_dropped`` and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

from pom_ha.config import Topology
from pom_ha.events import AttemptEvent, AttemptPhase, EventPublisher, EventPublishError, JobEvent, PomEvent
from pom_ha.events.daemon_publisher import open_event_publisher
from pom_ha.messaging.runtime import RESULTS_TOPIC, result_message
from pom_ha.messaging.stomp import StompClient, StompError, StompUnavailable

RESULTS_QUEUE_MAX = 10_000
EVENTS_STOP_TIMEOUT_S = 3.0


class Outbound:
    def __init__(self, *, topology: Topology, server: str, instance: str, pool: Any, log: Any,
                 stomp: StompClient | None, results_destination: str = RESULTS_TOPIC) -> None:
        self.topology = topology
        self.server, self.instance = server, instance
        self.pool = pool
        self.log = log
        self.stomp = stomp
        self.results_destination = results_destination
        self.publisher: EventPublisher | None = None
        self.counts: Counter[str] = Counter()
        self._results: asyncio.Queue[str] = asyncio.Queue(RESULTS_QUEUE_MAX)
        self._tasks: list[asyncio.Task[None]] = []

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.stomp is not None:
            self._tasks.append(asyncio.create_task(self._send_results(), name="cm-results-publisher"))
        if self.topology.servers_running("kafka"):
            self._tasks.append(asyncio.create_task(self._start_events(), name="cm-events-publisher"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.publisher is not None:
            with contextlib.suppress(Exception):
                await self.publisher.stop(EVENTS_STOP_TIMEOUT_S)
        if self._results.qsize():
            self.counts["results_unsent_at_stop"] += self._results.qsize()
            self.log.warning("attempt results not published at stop", count=self._results.qsize())

    async def _start_events(self) -> None:
        self.publisher = await open_event_publisher(self.topology, self.pool, service="campaign_manager",
                                                    server=self.server, instance=self.instance, log=self.log)

    # ---- Event SDK ----------------------------------------------------------------------------------------
    async def _publish(self, events: Sequence[PomEvent], epoch: int) -> None:
        publisher = self.publisher
        if publisher is None:
            self.counts["events_not_published"] += len(events)
            return
        for event in events:
            try:
                await publisher.publish(event, epoch=epoch, wait_for_room=False)
                self.counts["events_queued"] += 1
            except EventPublishError as exc:
                self.counts["events_failed"] += 1
                if self.counts["events_failed"] <= 5 or self.counts["events_failed"] % 1000 == 0:
                    self.log.warning("event not published", error=str(exc), failed=self.counts["events_failed"])

    async def job_state(self, job_id: int, epoch: int, org: str, *, campaign_id: int | None,
                        campaign_name: str | None, previous: str, state: str, reason: str | None) -> None:
        await self._publish([JobEvent(org=org, job_id=job_id, campaign_id=campaign_id, campaign_name=campaign_name,
                                      state=state, previous_state=previous, reason=reason)], epoch)

    async def dialed(self, job_id: int, epoch: int, org: str, attempts: Sequence[tuple[str, int, str]]) -> None:
        """Attempts (contact, attempt_no, call_id) whose rows are committed and whose DIALs leave now."""
        await self._publish([AttemptEvent(org=org, phase=AttemptPhase.DIALED, job_id=job_id, contact_id=c,
                                          attempt_no=n, call_id=call) for c, n, call in attempts], epoch)

    async def recorded(self, job_id: int, epoch: int, org: str,
                       done: Sequence[tuple[str, int, str, int | None]]) -> None:
        """Outcomes (contact, attempt_no, code, duration_ms) committed in one batch."""
        if not done:
            return
        await self._publish([AttemptEvent(org=org, phase=AttemptPhase.RESULT, job_id=job_id, contact_id=c,
                                          attempt_no=n, code=code, duration_ms=ms) for c, n, code, ms in done], epoch)
        if self.stomp is None:
            return
        body = result_message(job_id, epoch, self.server, [
            {"contact_id": c, "attempt_no": n, "code": code, "duration_ms": ms} for c, n, code, ms in done])
        try:
            self._results.put_nowait(body)
        except asyncio.QueueFull:
            self.counts["results_dropped"] += len(done)
            if self.counts["results_dropped"] <= 5 or self.counts["results_dropped"] % 1000 == 0:
                self.log.warning("attempt results not published: ActiveMQ queue full",
                                 dropped=self.counts["results_dropped"])

    # ---- ActiveMQ results ---------------------------------------------------------------------------------
    async def _send_results(self) -> None:
        assert self.stomp is not None
        while True:
            body = await self._results.get()
            delay = 0.05
            while True:  # held until a broker confirms it (receipt)
                try:
                    await self.stomp.connected.wait()
                    await self.stomp.send(self.results_destination, body, timeout_s=5.0)
                    self.counts["results_sent"] += 1
                    break
                except (StompUnavailable, StompError) as exc:
                    self.counts["results_send_retries"] += 1
                    self.log.debug("attempt results not confirmed, sending again", error=str(exc))
                    await asyncio.sleep(delay)
                    delay = min(1.0, delay * 2)

    def info(self) -> dict[str, Any]:
        pub = self.publisher
        return {
            "events": None if pub is None else {"queued": pub.counts.queued, "acked": pub.counts.acked,
                                                "failed": pub.counts.failed, "last_error": pub.last_error},
            "activemq": None if self.stomp is None else self.stomp.info(),
            "results_pending": self._results.qsize(),
            "counters": dict(self.counts),
        }
