"""The Event SDK producer: ``await publisher.publish(event)`` from any service, never blocking the loop.

librdkafka's ``produce`` only queues a record; delivery reports are served by ``poll``, which this module
runs in one daemon thread. Each report resolves the asyncio future :meth:`EventPublisher.publish` returned
(``call_soon_threadsafe``) and updates :class:`DeliveryCounts`: ``acked`` counts records the cluster
acknowledged with ``acks=all`` (every in-sync replica has them, at least ``min.insync.replicas=2``),
``failed`` counts records that will never be delivered (after the retries and the delivery deadline of
the producer settings). :meth:`EventPublisher.stop` flushes what is queued, in a thread, then ends the
poll thread; whatever is still undelivered then is failed, never silently dropped.

Errors are translated at this boundary into :class:`EventPublishError` with a ``retriable`` flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from pom_ha.events.config import ProducerSettings
from pom_ha.events.kafka_log import KafkaLogBridge
from pom_ha.events.models import PomEvent, ProducerRef

log = structlog.get_logger("pom_ha.events.publisher")
POLL_INTERVAL_S = 0.1
_RESEND_SAFE = {KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT, KafkaError._MSG_TIMED_OUT,
                KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN}


class EventPublishError(Exception):
    """An event was not (or could not be) delivered. ``retriable``: publishing it again may succeed."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


def translate(err: KafkaError | KafkaException | BaseException, what: str) -> EventPublishError:
    kerr = err.args[0] if isinstance(err, KafkaException) and err.args else err
    if isinstance(kerr, KafkaError):
        # a record purged at stop or timed out was not written: publishing it again is safe
        retriable = bool(kerr.retriable()) or kerr.code() in _RESEND_SAFE
        return EventPublishError(f"{what}: {kerr.name()} ({kerr.str()})", retriable=retriable and not kerr.fatal())
    return EventPublishError(f"{what}: {err}", retriable=False)


@dataclass(frozen=True)
class Delivery:
    """Where an acknowledged event landed."""

    topic: str
    partition: int
    offset: int
    event_id: str


@dataclass
class DeliveryCounts:
    queued: int = 0
    acked: int = 0
    failed: int = 0

    @property
    def pending(self) -> int:
        return self.queued - self.acked - self.failed


class EventPublisher:
    """One producer per process. ``service``/``server``/``instance`` stamp each event's ``producer``;
    ``epoch`` gives the default epoch (e.g. the master term's), overridable per call (a CM passes the job's
    assignment epoch)."""

    def __init__(
        self,
        bootstrap_servers: str,
        settings: ProducerSettings,
        *,
        service: str,
        server: str,
        instance: str | None = None,
        epoch: Callable[[], int] = lambda: 0,
        security: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.service, self.server, self.instance = service, server, instance
        self._epoch = epoch
        conf: dict[str, Any] = {
            **settings.librdkafka, **(security or {}), "logger": KafkaLogBridge(f"events-publisher-{service}"),
            **(extra or {}), "bootstrap.servers": bootstrap_servers, "error_cb": self._on_client_error,
        }
        self._producer = Producer(conf)
        self.counts = DeliveryCounts()
        self.last_error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: set[asyncio.Future[Delivery]] = set()
        self._room = asyncio.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = log.bind(service=service, server=server)

    # ---- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> EventPublisher:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._poll_forever, name=f"events-poll-{self.service}", daemon=True)
        self._thread.start()
        if self.settings.overridden:
            self._log.warning("producer settings overridden for the delivery guarantees",
                              overridden=self.settings.overridden)
        return self

    async def __aenter__(self) -> EventPublisher:
        return await self.start()

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    async def stop(self, timeout_s: float = 30.0) -> int:
        """Flush (in a thread) for up to ``timeout_s``; returns the number of records left undelivered,
        which are failed."""
        left = await asyncio.to_thread(self._producer.flush, timeout_s)
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
        if left:
            with contextlib.suppress(KafkaException):
                self._producer.purge()
            await asyncio.to_thread(self._producer.poll, 0)  # purged records report their failure
        for fut in list(self._pending):
            if not fut.done():
                self.counts.failed += 1
                fut.set_exception(EventPublishError("publisher stopped before delivery", retriable=True))
        self._pending.clear()
        self._log.info("event publisher stopped", queued=self.counts.queued, acked=self.counts.acked,
                       failed=self.counts.failed, undelivered_at_stop=left)
        return int(left)

    def _poll_forever(self) -> None:
        while not self._stopping.is_set():
            self._producer.poll(POLL_INTERVAL_S)

    # ---- publishing ---------------------------------------------------------------------------------------
    def stamp(self, event: PomEvent, epoch: int | None = None) -> PomEvent:
        """The event with this publisher's ``producer`` (unless it already carries one)."""
        if event.producer is not None:
            return event
        ref = ProducerRef(service=self.service, server=self.server, instance=self.instance,
                          epoch=self._epoch() if epoch is None else epoch)
        return event.model_copy(update={"producer": ref})

    async def publish(self, event: PomEvent, *, epoch: int | None = None,
                      wait_for_room: bool = True) -> asyncio.Future[Delivery]:
        """Queue ``event``; the returned future resolves when the cluster acknowledged it (``acks=all``) or
        fails with EventPublishError. When the local queue is full it waits at most ``max.block.ms`` (the
        table's) for room, or fails at once with ``wait_for_room=False`` (for a dialing hot path)."""
        loop = self._loop
        if loop is None or self._stopping.is_set():
            raise EventPublishError("publisher is not running", retriable=False)
        event = self.stamp(event, epoch)
        fut: asyncio.Future[Delivery] = loop.create_future()
        event_id = str(event.event_id)

        def on_delivery(err: KafkaError | None, msg: Message) -> None:  # poll thread
            loop.call_soon_threadsafe(self._delivered, fut, err, msg.topic(), msg.partition(), msg.offset(),
                                      event_id)

        deadline = time.monotonic() + self.settings.max_block_ms / 1000
        value, key, headers = event.to_json(), event.key().encode(), event.headers()
        while True:
            try:
                self._producer.produce(event.topic(), value=value, key=key, headers=headers, on_delivery=on_delivery)
                break
            except BufferError:
                left = deadline - time.monotonic() if wait_for_room else 0.0
                if left <= 0:
                    raise EventPublishError(f"local queue full for {self.settings.max_block_ms} ms (max.block.ms)",
                                            retriable=True) from None
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, 1.0)):
                        await self._room.wait()
            except KafkaException as exc:
                raise translate(exc, f"cannot queue {event.kind.value} event") from None
        self.counts.queued += 1
        self._pending.add(fut)
        return fut

    async def publish_and_wait(self, event: PomEvent, *, epoch: int | None = None) -> Delivery:
        """Publish and wait for the acknowledgement."""
        return await (await self.publish(event, epoch=epoch))

    def _delivered(self, fut: asyncio.Future[Delivery], err: KafkaError | None, topic: str | None,
                   partition: int | None, offset: int | None, event_id: str) -> None:
        self._pending.discard(fut)
        self._room.set()
        if fut.done():  # failed at stop already
            return
        if err is None:
            self.counts.acked += 1
            fut.set_result(Delivery(topic or "", partition or 0, offset if offset is not None else -1, event_id))
        else:
            self.counts.failed += 1
            self.last_error = f"{err.name()}: {err.str()}"
            fut.set_exception(translate(err, f"event {event_id} not delivered"))
        # nobody may await a fire-and-forget publish: mark its exception as retrieved
        fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)

    def _on_client_error(self, err: KafkaError) -> None:  # poll thread; a broker down is logged, not raised
        self.last_error = f"{err.name()}: {err.str()}"
        if err.fatal():
            self._log.error("kafka producer fatal error", error=self.last_error)
