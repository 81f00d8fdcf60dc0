"""Create the Event SDK topics: replication factor 3 and ``min.insync.replicas=2``, so an ``acks=all``
write is on two brokers at least and survives the loss of any one.

The vendor uses one partition per topic. More partitions are allowed (``partitions=N``): every event is
keyed by its job (or agent), so one job's events keep their order within one partition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from pom_ha.events.models import EventKind, dead_letter_topic, event_topics, topic_name

REPLICATION_FACTOR = 3
MIN_INSYNC_REPLICAS = 2


def topic_specs(topics: Iterable[str], *, partitions: int = 1, replication: int = REPLICATION_FACTOR,
                min_isr: int = MIN_INSYNC_REPLICAS) -> list[NewTopic]:
    if replication < 1 or not 1 <= min_isr <= replication:
        raise ValueError(f"min.insync.replicas {min_isr} must be between 1 and the replication factor {replication}")
    return [NewTopic(t, num_partitions=partitions, replication_factor=replication,
                     config={"min.insync.replicas": str(min_isr)}) for t in topics]


def org_topics(org: str = "Default", *, with_dead_letter: bool = True) -> list[str]:
    """The six topics of ``org`` plus the aggregator's dead-letter topic for ATTEMPT records."""
    topics = event_topics(org)
    if with_dead_letter:
        topics.append(dead_letter_topic(topic_name(EventKind.ATTEMPT, org)))
    return topics


def ensure_topics_sync(admin_config: dict[str, Any], topics: Iterable[str], *, partitions: int = 1,
                       replication: int = REPLICATION_FACTOR, min_isr: int = MIN_INSYNC_REPLICAS,
                       timeout_s: float = 30.0) -> list[str]:
    """Create the missing topics; returns those created (an existing topic is left as it is)."""
    admin = AdminClient(admin_config)
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    missing = [t for t in topics if t not in existing]
    if not missing:
        return []
    futures = admin.create_topics(topic_specs(missing, partitions=partitions, replication=replication,
                                              min_isr=min_isr), request_timeout=timeout_s)
    created = []
    for name, fut in futures.items():
        try:
            fut.result(timeout_s)
            created.append(name)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    return created


async def ensure_topics(admin_config: dict[str, Any], topics: Iterable[str], **kwargs: Any) -> list[str]:
    return await asyncio.to_thread(ensure_topics_sync, admin_config, list(topics), **kwargs)
