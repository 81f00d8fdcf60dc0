"""The Kafka cluster: an RF-3 topic with min.insync.replicas=2 keeps every acknowledged (acks=all,
idempotent) write while one broker is down, and the broker rejoins every ISR after its restart."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic  # where the type stubs declare it (admin re-exports it untyped)

from pom_ha.infra.kafka import bootstrap_servers, broker_ids
from pom_ha.infra.stack import Stack

pytestmark = pytest.mark.integration

MESSAGES = 200
PARTITIONS = 3
RECOVERY_S = 120.0


def _produce(bootstrap: str, topic: str, keys: range) -> set[str]:
    """Produce one message per key with acks=all; the keys whose delivery the cluster acknowledged."""
    acked: set[str] = set()

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is None:
            acked.add((msg.key() or b"").decode())

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            # bounded so a lost cluster fails the test instead of hanging it
            "message.timeout.ms": 90_000,
        }
    )
    for k in keys:
        producer.produce(topic, key=str(k).encode(), value=f"event {k}".encode(), on_delivery=on_delivery)
        producer.poll(0)
    producer.flush(100.0)
    return acked


def _consume(bootstrap: str, topic: str, expected: set[str], timeout_s: float) -> set[str]:
    """Read the topic from the beginning until every expected key was seen or time runs out."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"pomha-it-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    try:
        consumer.subscribe([topic])
        while not expected <= seen and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                seen.add((msg.key() or b"").decode())
    finally:
        consumer.close()
    return seen


def _isrs(admin: AdminClient, topic: str) -> dict[int, set[int]]:
    md = admin.list_topics(topic, timeout=5)
    return {p.id: set(p.isrs) for p in md.topics[topic].partitions.values()}


async def _wait_full_isr(admin: AdminClient, topic: str, brokers: set[int], seconds: float) -> dict[int, set[int]]:
    deadline = time.monotonic() + seconds
    while True:
        try:
            isrs = await asyncio.to_thread(_isrs, admin, topic)
        except (KafkaException, KeyError):  # metadata may be unavailable while brokers move: retry
            isrs = {}
        if (len(isrs) == PARTITIONS and all(isr == brokers for isr in isrs.values())) or time.monotonic() > deadline:
            return isrs
        await asyncio.sleep(0.5)


async def test_acked_writes_survive_a_broker_loss_and_the_broker_rejoins_every_isr(stack: Stack) -> None:
    bootstrap = bootstrap_servers(stack.topo)
    brokers = broker_ids(stack.topo)
    assert len(brokers) == 3, "this test is written for the three-broker lab"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = f"pomha-it-{uuid.uuid4().hex[:8]}"
    spec = NewTopic(topic, num_partitions=PARTITIONS, replication_factor=3, config={"min.insync.replicas": "2"})
    await asyncio.to_thread(admin.create_topics([spec])[topic].result, 30)
    try:
        assert await _wait_full_isr(admin, topic, brokers, 60.0) == dict.fromkeys(range(PARTITIONS), brokers)
        first = await asyncio.to_thread(_produce, bootstrap, topic, range(MESSAGES))
        assert len(first) == MESSAGES
        assert await asyncio.to_thread(_consume, bootstrap, topic, first, 60.0) == first

        # the leader of partition 0 goes: its partitions need a new leader as well as a smaller ISR
        md = await asyncio.to_thread(admin.list_topics, topic, timeout=10)
        leader = md.topics[topic].partitions[0].leader
        victim = next(k for k in stack.launchers("kafka") if stack.topo.server_index(k.server.name) == leader)
        try:
            victim.kill()
            second = await asyncio.to_thread(_produce, bootstrap, topic, range(MESSAGES, 2 * MESSAGES))
            assert len(second) == MESSAGES, "acks=all writes must succeed with 2 of 3 replicas in sync"
        finally:
            victim.start()
            await victim.wait_ready()

        isrs = await _wait_full_isr(admin, topic, brokers, RECOVERY_S)
        assert isrs == dict.fromkeys(range(PARTITIONS), brokers), f"broker {leader} did not rejoin: {isrs}"
        every = first | second
        assert await asyncio.to_thread(_consume, bootstrap, topic, every, 60.0) == every
    finally:
        with contextlib.suppress(KafkaException):
            await asyncio.to_thread(admin.delete_topics([topic])[topic].result, 30)
