"""The Enriched Attempt Event Aggregator: an HADaemon holding ``SingletonRole("event_aggregator")``.

Every POM server runs one; while master it joins ``POM.<org>.ATTEMPT`` into ``POM.<org>.ENRICHEDATTEMPTRESULT``
(:mod:`services.event_aggregator.join`) in Kafka transactions (:mod:`services.event_aggregator.session`);
dormant instances hold no Kafka client at all. A Kafka or database failure ends the session (its open
transaction is aborted or fenced, nothing of it is visible) and a new one starts from the committed
offsets after a short backoff, for as long as the term lasts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import asyncpg
from confluent_kafka import KafkaException, Message

from pom_ha.events.config import load_producer_rows, map_producer_config
from pom_ha.events.models import EventKind, ProducerRef, dead_letter_topic, topic_name
from pom_ha.events.topics import ensure_topics, org_topics
from pom_ha.ha.daemon import DaemonConfig, HADaemon
from pom_ha.ha.election import Elector
from pom_ha.ha.term import MasterTerm
from services.event_aggregator.join import AttemptJoiner, InRecord, JobRow
from services.event_aggregator.lookups import fetch_lookups
from services.event_aggregator.session import AggregatorKafkaError, KafkaSession, OutRecord

SERVICE = "event_aggregator"


@dataclass
class AggregatorCounts:
    consumed: int = 0
    enriched: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    transactions: int = 0
    sessions: int = 0
    session_failures: int = 0


@dataclass(frozen=True)
class AggregatorSettings:
    bootstrap: str
    security: dict[str, str]
    orgs: tuple[str, ...]
    replication: int = 3
    batch_max_records: int = 500
    fetch_timeout_s: float = 0.2
    retry_backoff_s: float = 1.0
    transaction_timeout_ms: int = 30_000
    summary_interval_s: float = 10.0


class EventAggregatorDaemon(HADaemon):
    def __init__(self, config: DaemonConfig, settings: AggregatorSettings) -> None:
        super().__init__(config)
        self.settings = settings
        self.counts = AggregatorCounts()
        self._jobs_cache: dict[int, JobRow] = {}

    @property
    def input_topics(self) -> list[str]:
        return [topic_name(EventKind.ATTEMPT, org) for org in self.settings.orgs]

    async def setup(self) -> None:
        self.spawn(self._summaries(), name="aggregator-summaries")

    async def run_master(self, elector: Elector, term: MasterTerm) -> None:
        term_log = self._log.bind(service=term.service, epoch=term.epoch)
        producer = ProducerRef(service=SERVICE, server=self.config.server, instance=self.config.instance_id,
                               epoch=term.epoch)
        joiner = AttemptJoiner(producer)
        while True:  # until the term ends (this task is cancelled then)
            session: KafkaSession | None = None
            try:
                # is_master is False while the store connection is suspended: a deposed master that has not
                # noticed yet must not open a session, its init_transactions would fence the real one
                if elector.is_master:
                    session = await self._open_session(term_log)
                    await self._aggregate(session, joiner, lambda: elector.is_master)
            except (AggregatorKafkaError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
                    TimeoutError) as exc:
                self.counts.session_failures += 1
                fenced = isinstance(exc, AggregatorKafkaError) and exc.fenced
                term_log.warning("aggregation session failed; restarting from the committed offsets",
                                 error=str(exc), fenced=fenced, retry_in_s=self.settings.retry_backoff_s)
            finally:
                if session is not None:
                    await session.close()
            joiner.reset()
            await asyncio.sleep(self.settings.retry_backoff_s)

    async def _open_session(self, term_log: Any) -> KafkaSession:
        pool = await self.app_db()
        async with pool.acquire(timeout=self.timings.store_timeout_s) as conn:
            rows = await load_producer_rows(conn, self.timings.store_timeout_s)
        producer_settings = map_producer_config(rows)
        admin = {**self.settings.security, "bootstrap.servers": self.settings.bootstrap}
        topics = [t for org in self.settings.orgs for t in org_topics(org)]
        try:
            created = await ensure_topics(admin, topics, replication=self.settings.replication,
                                          min_isr=min(2, self.settings.replication))
        except KafkaException as exc:
            raise AggregatorKafkaError(f"cannot create the event topics: {exc}") from None
        if created:
            term_log.info("event topics created", topics=created, replication=self.settings.replication)
        session = KafkaSession(
            bootstrap=self.settings.bootstrap, security=self.settings.security, input_topics=self.input_topics,
            producer_conf=producer_settings.librdkafka, transaction_timeout_ms=self.settings.transaction_timeout_ms,
        )
        t0 = time.monotonic()
        try:
            assigned = await session.open()
        except BaseException:
            await session.close()
            raise
        self.counts.sessions += 1
        term_log.info("aggregating", open_ms=round((time.monotonic() - t0) * 1000, 1),
                      positions={f"{tp.topic}[{tp.partition}]": tp.offset for tp in assigned})
        return session

    async def _aggregate(self, session: KafkaSession, joiner: AttemptJoiner, is_master: Callable[[], bool]) -> None:
        pool = await self.app_db()
        timeout = self.timings.store_timeout_s
        while True:
            msgs = await session.fetch(self.settings.batch_max_records, self.settings.fetch_timeout_s)
            if not msgs:
                continue
            records = [_in_record(m) for m in msgs]
            good, dead = joiner.parse(records)
            events = [e for _r, e in good]
            lookups = await fetch_lookups(pool, joiner.needs(events), timeout, self._jobs_cache)
            outcome = joiner.join(events, lookups)
            outputs = [OutRecord(e.topic(), e.key().encode(), e.to_json(), e.headers()) for e in outcome.enriched]
            for d in dead:
                self._log.warning("malformed event moved to the dead-letter topic", topic=d.record.topic,
                                  partition=d.record.partition, offset=d.record.offset, reason=d.reason)
                outputs.append(OutRecord(dead_letter_topic(d.record.topic), d.record.key, d.record.value, [
                    ("origin_topic", d.record.topic), ("origin_partition", str(d.record.partition)),
                    ("origin_offset", str(d.record.offset)), ("error", d.reason[:500])]))
            offsets: dict[tuple[str, int], int] = {}
            for r in records:
                offsets[(r.topic, r.partition)] = max(offsets.get((r.topic, r.partition), 0), r.offset + 1)
            if not is_master():
                raise AggregatorKafkaError("mastership unconfirmed (status store suspended): batch not committed, "
                                           "it is read again by whoever is master")
            await session.commit(outputs, offsets)
            c = self.counts
            c.consumed += len(records)
            c.enriched += len(outcome.enriched)
            c.dead_lettered += len(dead)
            c.duplicates += outcome.duplicates
            c.transactions += 1

    def member_load(self, service: str) -> int:
        return 0

    def health(self) -> dict[str, Any]:
        out = super().health()
        out["aggregator"] = {f.name: getattr(self.counts, f.name) for f in fields(self.counts)}
        return out

    async def teardown(self) -> None:
        self._log_counts()

    async def _summaries(self) -> None:
        last = AggregatorCounts()
        while True:
            await asyncio.sleep(self.settings.summary_interval_s)
            if self.counts != last:
                self._log_counts()
                last = AggregatorCounts(**vars(self.counts))

    def _log_counts(self) -> None:
        self._log.info("aggregator counts", **vars(self.counts))


def _in_record(m: Message) -> InRecord:
    return InRecord(m.topic() or "", m.partition() or 0, m.offset() or 0, m.value(), m.key())


def orgs_of(zone_orgs: Sequence[str], extra: Sequence[str]) -> tuple[str, ...]:
    """The organizations to aggregate: those given, else every zone's organization (sorted, unique)."""
    return tuple(sorted(set(extra))) if extra else tuple(sorted(set(zone_orgs) or {"Default"}))
