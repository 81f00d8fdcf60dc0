"""One master term's Kafka side: a transactional producer and a read_committed consumer, consume ->
transform -> produce with the consumed offsets committed in the same transaction.

Exactly-once across a takeover rests on three things (docs/events.md, "Aggregator"):

1. Every instance uses the same ``transactional.id``. :meth:`KafkaSession.open` calls
   ``init_transactions`` first: the transaction coordinator bumps the producer epoch, aborts whatever
   transaction the previous holder left open (a SIGKILLed master's half-written batch) and fences that
   producer, so a zombie's later ``commit_transaction`` fails.
2. Only then are the group's committed offsets read (``isolation.level=read_committed`` makes librdkafka
   ask for stable offsets, so no half-committed transactional offset is seen) and the input partitions
   assigned at them. Partitions are assigned, not subscribed: the lease already says who is active, and
   no consumer-group rebalance has to wait for a dead member's session to time out.
3. Outputs and the input offsets go into one transaction: both become visible, or neither.

Every librdkafka call runs in the session's own single worker thread (in order, never on the event loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from pom_ha.events.kafka_log import KafkaLogBridge

log = structlog.get_logger("services.event_aggregator.session")
T = TypeVar("T")

TRANSACTIONAL_ID = "pom-ha.event_aggregator"
GROUP_ID = "pom-ha.event_aggregator"
TXN_RETRY_BACKOFF_MS = 20  # the Java producer's own backoff for CONCURRENT_TRANSACTIONS


class AggregatorKafkaError(Exception):
    """A Kafka call of the session failed. ``fenced``: a newer instance took the transactional id."""

    def __init__(self, message: str, *, fenced: bool = False, retriable: bool = True) -> None:
        super().__init__(message)
        self.fenced = fenced
        self.retriable = retriable


def _translate(exc: KafkaException, what: str) -> AggregatorKafkaError:
    err = exc.args[0] if exc.args else None
    if isinstance(err, KafkaError):
        fenced = err.code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH)
        return AggregatorKafkaError(f"{what}: {err.name()} ({err.str()})", fenced=fenced,
                                    retriable=bool(err.retriable()) and not err.fatal())
    return AggregatorKafkaError(f"{what}: {exc}")


@dataclass(frozen=True)
class OutRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, str | bytes | None]]


class KafkaSession:
    def __init__(
        self,
        *,
        bootstrap: str,
        security: dict[str, str],
        input_topics: Sequence[str],
        producer_conf: dict[str, Any],
        transactional_id: str = TRANSACTIONAL_ID,
        group_id: str = GROUP_ID,
        transaction_timeout_ms: int = 30_000,
        call_timeout_s: float = 30.0,
    ) -> None:
        self.input_topics = list(input_topics)
        self.call_timeout_s = call_timeout_s
        self._producer_conf = {
            **producer_conf, **security, "bootstrap.servers": bootstrap, "transactional.id": transactional_id,
            "transaction.timeout.ms": transaction_timeout_ms, "enable.idempotence": True, "acks": "all",
            "logger": KafkaLogBridge("aggregator-producer"),
            # librdkafka: a record's delivery deadline may not outlive the transaction holding it
            # the transaction protocol retries CONCURRENT_TRANSACTIONS after every commit: with the table's
            # 10 s backoff each transaction stalled 10 s (measured), so it is capped for this producer
            "retry.backoff.ms": min(int(producer_conf.get("retry.backoff.ms", 100)), TXN_RETRY_BACKOFF_MS),
            "retry.backoff.max.ms": max(TXN_RETRY_BACKOFF_MS, 1000),
            "message.timeout.ms": min(int(producer_conf.get("message.timeout.ms", 300_000)), transaction_timeout_ms),
        }
        self._consumer_conf = {
            **security, "bootstrap.servers": bootstrap, "group.id": group_id,
            "isolation.level": "read_committed", "enable.auto.commit": False, "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest", "enable.partition.eof": False,
            "logger": KafkaLogBridge("aggregator-consumer"),
        }
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="aggregator-kafka")
        self.producer: Producer | None = None
        self.consumer: Consumer | None = None
        self.assigned: list[TopicPartition] = []

    async def _call(self, fn: Callable[..., T], *args: Any, what: str) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args))
        except KafkaException as exc:
            raise _translate(exc, what) from None

    async def open(self) -> list[TopicPartition]:
        """init_transactions (fences the previous holder), then assign the input at the committed offsets."""
        self.producer = Producer(self._producer_conf)
        await self._call(self.producer.init_transactions, self.call_timeout_s, what="init_transactions")
        self.consumer = Consumer(self._consumer_conf)
        self.assigned = await self._call(self._assign, what="assign the input partitions")
        return self.assigned

    def _assign(self) -> list[TopicPartition]:
        assert self.consumer is not None
        md = self.consumer.list_topics(timeout=self.call_timeout_s)
        tps: list[TopicPartition] = []
        for topic in self.input_topics:
            tmeta = md.topics.get(topic)
            if tmeta is None or tmeta.error is not None or not tmeta.partitions:
                raise AggregatorKafkaError(f"input topic {topic} not available"
                                           + (f" ({tmeta.error})" if tmeta is not None and tmeta.error else ""))
            tps += [TopicPartition(topic, p) for p in sorted(tmeta.partitions)]
        committed = self.consumer.committed(tps, timeout=self.call_timeout_s)
        start = [TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
                 for tp in committed]
        self.consumer.assign(start)
        return start

    async def fetch(self, max_records: int, timeout_s: float) -> list[Message]:
        assert self.consumer is not None
        msgs = await self._call(self.consumer.consume, max_records, timeout_s, what="consume")
        good = []
        for m in msgs:
            err = m.error()
            if err is None:
                good.append(m)
            elif err.fatal():
                raise AggregatorKafkaError(f"consume: {err.name()} ({err.str()})", retriable=False)
            else:
                log.warning("consumer error", error=f"{err.name()}: {err.str()}")
        return good

    async def commit(self, outputs: Sequence[OutRecord], offsets: dict[tuple[str, int], int]) -> None:
        """One transaction: ``outputs`` and the next offsets to read. Raises AggregatorKafkaError (after
        aborting when the transaction can be aborted)."""
        await self._call(self._transaction, list(outputs), dict(offsets), what="transaction")

    def _transaction(self, outputs: list[OutRecord], offsets: dict[tuple[str, int], int]) -> None:
        producer, consumer = self.producer, self.consumer
        assert producer is not None and consumer is not None
        producer.begin_transaction()
        try:
            for rec in outputs:
                while True:
                    try:
                        producer.produce(rec.topic, value=rec.value, key=rec.key, headers=rec.headers)
                        break
                    except BufferError:
                        producer.poll(0.1)  # queue full: serve delivery reports until there is room
            producer.poll(0)
            tps = [TopicPartition(t, p, o) for (t, p), o in sorted(offsets.items())]
            producer.send_offsets_to_transaction(tps, consumer.consumer_group_metadata(), self.call_timeout_s)
            producer.commit_transaction(self.call_timeout_s)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.txn_requires_abort():
                try:
                    producer.abort_transaction(self.call_timeout_s)
                except KafkaException:
                    pass  # the session is discarded anyway; a new init_transactions cleans up
            raise

    async def close(self) -> None:
        """Close the clients in the worker thread (after any call still running there) without waiting."""
        producer, consumer = self.producer, self.consumer
        self.producer = self.consumer = None

        def close_all() -> None:
            if consumer is not None:
                try:
                    consumer.close()
                except (KafkaException, RuntimeError):
                    pass
            if producer is not None:
                producer.flush(0)

        self._executor.submit(close_all)
        self._executor.shutdown(wait=False)
