"""Event SDK on real ZooKeeper + Kafka + PostgreSQL.

1. The publisher (settings from ``pim_kafka_producer_config``, idempotent, acks=all) keeps every event the
   cluster acknowledged when the partition leader is SIGKILLed mid-stream: acks counted vs events consumed.
2. The aggregator on three servers: the active instance is SIGKILLed mid-stream; the output topic read with
   ``isolation.level=read_committed`` holds exactly one enriched result per attempt, and a malformed record
   is moved to the dead-letter topic without stopping the aggregator.

Conditions are polled with deadlines, never slept for. Figures are printed (``pytest -s``) for the report.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from pom_ha.events.config import load_producer_settings
from pom_ha.events.models import AttemptEvent, AttemptPhase, EventKind, dead_letter_topic, topic_name
from pom_ha.events.publisher import Delivery, EventPublisher, EventPublishError
from pom_ha.events.topics import ensure_topics, org_topics
from pom_ha.infra.base import Launcher
from pom_ha.infra.kafka import bootstrap_servers
from pom_ha.infra.process import ProcessRecord, kill_process, signal_process, stop_process
from pom_ha.infra.stack import Stack
from pom_ha.lab.daemons import start_daemon
from services.event_aggregator.session import AggregatorKafkaError, KafkaSession, OutRecord

pytestmark = pytest.mark.integration
SERVERS = ["pom1", "pom2", "pom3"]
PUBLISH_EVENTS = 3000
ATTEMPTS = 1500


def _org() -> str:
    return f"it{uuid.uuid4().hex[:8]}"


def read_topic(bootstrap: str, topic: str, done: Callable[[list[Message]], bool], timeout_s: float,
               *, read_committed: bool = True) -> list[Message]:
    """Every record of ``topic`` from the beginning, until ``done(records)`` and the end of every partition
    is reached (so nothing after the point ``done`` became true is missed), or the deadline."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"pomha-it-{uuid.uuid4().hex[:8]}",
        "isolation.level": "read_committed" if read_committed else "read_uncommitted",
        "enable.auto.commit": False, "enable.partition.eof": True,
    })
    out: list[Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        md = consumer.list_topics(topic, timeout=10)
        parts = sorted(md.topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        at_end: set[int] = set()
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition() or 0)
                    if at_end >= set(parts) and done(out):
                        break
                continue
            at_end.discard(msg.partition() or 0)
            out.append(msg)
    finally:
        consumer.close()
    return out


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_dsn)
    yield conn
    await conn.close()


async def _leader_launcher(stack: Stack, bootstrap: str, topic: str) -> Launcher:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    md = await asyncio.to_thread(admin.list_topics, topic, timeout=10)
    leader = md.topics[topic].partitions[0].leader
    return next(k for k in stack.launchers("kafka") if stack.topo.server_index(k.server.name) == leader)


async def _wait_full_isr(bootstrap: str, topic: str, replicas: int, timeout_s: float) -> bool:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            md = await asyncio.to_thread(admin.list_topics, topic, timeout=5)
            if all(len(p.isrs) == replicas for p in md.topics[topic].partitions.values()):
                return True
        except (KafkaException, KeyError):
            pass
        await asyncio.sleep(0.5)
    return False


def _attempt(org: str, job_id: int, i: int, phase: AttemptPhase) -> AttemptEvent:
    return AttemptEvent(org=org, phase=phase, job_id=job_id, contact_id=f"c{i}", attempt_no=1,
                        call_id=f"call-{i}", code="ANSWER_HUMAN" if phase is AttemptPhase.RESULT else None,
                        duration_ms=1000 + i if phase is AttemptPhase.RESULT else None)


# ---- 1. acknowledged events survive a broker loss -------------------------------------------------------------
async def test_every_acknowledged_event_is_consumed_after_a_broker_is_killed_mid_stream(
    stack: Stack, pg_dsn: str
) -> None:
    bootstrap = bootstrap_servers(stack.topo)
    org = _org()
    topic = topic_name(EventKind.ATTEMPT, org)
    assert await ensure_topics({"bootstrap.servers": bootstrap}, [topic]) == [topic]
    assert await _wait_full_isr(bootstrap, topic, 3, 60.0)
    settings = await load_producer_settings(pg_dsn)
    assert settings.librdkafka["acks"] == "all" and settings.librdkafka["enable.idempotence"] is True
    assert settings.librdkafka["retries"] == 2 and settings.librdkafka["retry.backoff.ms"] == 10000

    victim = await _leader_launcher(stack, bootstrap, topic)
    publisher = await EventPublisher(bootstrap, settings, service="it", server="pom1", epoch=lambda: 7).start()
    futures: list[asyncio.Future[Delivery]] = []
    t0 = time.monotonic()
    try:
        for i in range(PUBLISH_EVENTS):
            futures.append(await publisher.publish(_attempt(org, 1 + i % 20, i, AttemptPhase.DIALED)))
            if i == PUBLISH_EVENTS // 3:
                await asyncio.to_thread(victim.kill)
                killed_at = time.monotonic() - t0
        results = await asyncio.gather(*futures, return_exceptions=True)
        all_reported_s = time.monotonic() - t0
    finally:
        await publisher.stop()
        await asyncio.to_thread(victim.start)
        await victim.wait_ready()

    acked = {r.event_id for r in results if isinstance(r, Delivery)}
    failed = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, EventPublishError) for r in failed), failed[:3]
    assert publisher.counts.acked == len(acked) and publisher.counts.failed == len(failed)
    assert publisher.counts.acked + publisher.counts.failed == PUBLISH_EVENTS
    assert len(acked) > PUBLISH_EVENTS // 3, "most events must be acknowledged with 2 of 3 replicas left"

    def seen_all(msgs: list[Message]) -> bool:
        return acked <= {json.loads(m.value() or b"{}")["event_id"] for m in msgs}

    msgs = await asyncio.to_thread(read_topic, bootstrap, topic, seen_all, 120.0)
    consumed = Counter(json.loads(m.value() or b"{}")["event_id"] for m in msgs)
    lost = acked - set(consumed)
    duplicated = [e for e, n in consumed.items() if n > 1]
    print(f"\n[events] published={PUBLISH_EVENTS} acked={len(acked)} failed={len(failed)} consumed={len(consumed)}"
          f" lost_acked={len(lost)} duplicated={len(duplicated)} broker_killed_at_s={killed_at:.2f}"
          f" all_reported_s={all_reported_s:.2f}")
    assert not lost, f"{len(lost)} acknowledged events were not consumed"
    assert not duplicated, f"{len(duplicated)} events consumed more than once (idempotence)"
    sample = json.loads(msgs[0].value() or b"{}")
    assert sample["producer"] == {"service": "it", "server": "pom1", "epoch": 7, "instance": None}
    assert sample["schema_version"] == 1 and sample["event_type"] == "ATTEMPT"


# ---- 2. the aggregator: exactly once across a SIGKILL of the active instance -------------------------------
@pytest.fixture
async def aggregators(
    stack: Stack, topology_file: Path, db: asyncpg.Connection
) -> AsyncIterator[tuple[str, dict[str, ProcessRecord], int]]:
    """Three aggregators for a fresh organization; also the role's epoch before they started (a lease
    of an earlier test's instances may still be live for a moment)."""
    org = _org()
    bootstrap = bootstrap_servers(stack.topo)
    await ensure_topics({"bootstrap.servers": bootstrap}, org_topics(org))
    baseline = int(await db.fetchval(
        "SELECT coalesce(max(epoch), 0) FROM ha_lease WHERE service = 'event_aggregator' AND scope = ''"))
    recs: dict[str, ProcessRecord] = {}
    try:
        for server in SERVERS:
            recs[server] = start_daemon(stack.topo, topology_file, server, "event-aggregator", "--org", org,
                                        "--batch", "50")
        yield org, recs, baseline
    finally:
        run_dir = stack.topo.lab_dir() / "run"
        await asyncio.gather(*(asyncio.to_thread(stop_process, rec, run_dir) for rec in recs.values()))


async def _master(db: asyncpg.Connection, newer_than: int = 0, timeout_s: float = 30.0) -> tuple[str, int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = await db.fetchrow(
            "SELECT holder_server, epoch FROM ha_lease WHERE service = 'event_aggregator' AND scope = ''"
            " AND holder_server IS NOT NULL AND expires_at > now() AND epoch > $1", newer_than)
        if row is not None:
            return str(row["holder_server"]), int(row["epoch"])
        await asyncio.sleep(0.05)
    raise AssertionError(f"no event_aggregator master above epoch {newer_than} within {timeout_s} s")


async def _seed_job(db: asyncpg.Connection, org: str, contacts: int) -> tuple[int, int]:
    list_id = await db.fetchval("INSERT INTO contact_lists (name) VALUES ($1) RETURNING id", f"list-{org}")
    campaign_id = await db.fetchval("INSERT INTO campaigns (name, definition) VALUES ($1, '{}') RETURNING id",
                                    f"camp-{org}")
    await db.executemany(
        "INSERT INTO contacts (list_id, contact_id, phone, timezone, custom) VALUES ($1, $2, $3, 'Europe/Paris', $4)",
        [(list_id, f"c{i}", f"+3312345{i:04d}", json.dumps({"n": i})) for i in range(contacts)])
    job_id = await db.fetchval("INSERT INTO jobs (campaign_id, list_id, zone) VALUES ($1, $2, 'Zone1') RETURNING id",
                               campaign_id, list_id)
    # the Campaign Manager writes the attempt row before the dial: the aggregator's fallback for a DIALED
    # event consumed by the instance that was killed
    await db.executemany(
        "INSERT INTO attempts (job_id, contact_id, attempt_no, state, cm_server, cm_instance, assignment_epoch,"
        " call_id) VALUES ($1, $2, 1, 'dialing', 'pom2', 'cm-it', 1, $3)",
        [(job_id, f"c{i}", f"call-{i}") for i in range(contacts)])
    return int(job_id), int(list_id)


@pytest.mark.parametrize("fault", ["sigkill", "sigstop"])
async def test_aggregator_failover_mid_stream_emits_exactly_one_result_per_attempt(
    stack: Stack, db: asyncpg.Connection, pg_dsn: str, aggregators: tuple[str, dict[str, ProcessRecord], int],
    fault: str,
) -> None:
    """``sigkill``: the active instance dies with a transaction open. ``sigstop``: it freezes (a zombie),
    another takes over, then it resumes believing it is master — its transaction is fenced."""
    org, recs, baseline = aggregators
    bootstrap = bootstrap_servers(stack.topo)
    out_topic = topic_name(EventKind.ENRICHEDATTEMPTRESULT, org)
    in_topic = topic_name(EventKind.ATTEMPT, org)
    job_id, list_id = await _seed_job(db, org, ATTEMPTS)
    first, epoch1 = await _master(db, newer_than=baseline)
    settings = await load_producer_settings(pg_dsn)
    publisher = await EventPublisher(bootstrap, settings, service="campaign_manager", server="pom2").start()
    waves = [range(0, ATTEMPTS // 3), range(ATTEMPTS // 3, 2 * ATTEMPTS // 3), range(2 * ATTEMPTS // 3, ATTEMPTS)]
    futures: list[asyncio.Future[Delivery]] = []

    async def publish(wave: range) -> None:
        for i in wave:
            futures.append(await publisher.publish(_attempt(org, job_id, i, AttemptPhase.DIALED)))
        for i in wave:
            futures.append(await publisher.publish(_attempt(org, job_id, i, AttemptPhase.RESULT)))

    def enriched_attempts(msgs: list[Message]) -> set[str]:
        return {json.loads(m.value() or b"{}")["attempt"] for m in msgs}

    stopped = False
    try:
        await publish(waves[0])
        # a malformed record on the input: dead-lettered, the aggregator goes on
        bad = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
        bad.produce(in_topic, key=b"job:x", value=b'{"event_type": "ATTEMPT", "phase": "DIALED"')
        await asyncio.to_thread(bad.flush, 30)

        def some_output(msgs: list[Message]) -> bool:
            return len(msgs) >= len(waves[0]) // 4

        progressed = await asyncio.to_thread(read_topic, bootstrap, out_topic, some_output, 60.0)
        assert some_output(progressed), "the aggregator produced nothing"
        await publish(waves[1])  # queued, not yet acknowledged: the fault lands in the middle of the stream
        t_fault = time.monotonic()
        if fault == "sigkill":
            await asyncio.to_thread(kill_process, recs[first])
        else:
            stopped = signal_process(recs[first], signal.SIGSTOP)
        second, epoch2 = await _master(db, newer_than=epoch1)
        takeover_s = time.monotonic() - t_fault
        if fault == "sigstop":
            # let the new master commit part of wave 1, then wake the zombie in the middle of it
            def new_output(msgs: list[Message]) -> bool:
                return len(enriched_attempts(msgs) & {f"{job_id}:c{i}:1" for i in waves[1]}) >= 10

            assert new_output(await asyncio.to_thread(read_topic, bootstrap, out_topic, new_output, 60.0))
            signal_process(recs[first], signal.SIGCONT)
            stopped = False
        await publish(waves[2])
        delivered = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        if stopped:
            signal_process(recs[first], signal.SIGCONT)
        await publisher.stop()
    assert all(isinstance(d, Delivery) for d in delivered), [d for d in delivered if not isinstance(d, Delivery)][:3]
    assert second != first and epoch2 > epoch1

    def complete(msgs: list[Message]) -> bool:
        return len(enriched_attempts(msgs)) >= ATTEMPTS

    t_read = time.monotonic()
    msgs = await asyncio.to_thread(read_topic, bootstrap, out_topic, complete, 120.0)
    drained_s = time.monotonic() - t_fault
    events = [json.loads(m.value() or b"{}") for m in msgs]
    per_attempt = Counter(e["attempt"] for e in events)
    missing = {f"{job_id}:c{i}:1" for i in range(ATTEMPTS)} - set(per_attempt)
    duplicated = {a: n for a, n in per_attempt.items() if n > 1}
    sources = Counter(e["dialed_source"] for e in events)
    raw = await asyncio.to_thread(read_topic, bootstrap, out_topic, lambda _m: True, 60.0, read_committed=False)
    print(f"\n[aggregator {fault}] attempts={ATTEMPTS} enriched={len(events)} distinct={len(per_attempt)}"
          f" missing={len(missing)} duplicated={len(duplicated)} faulted={first} new_master={second}"
          f" takeover_s={takeover_s:.2f} all_output_after_fault_s={drained_s:.2f}"
          f" read_s={time.monotonic() - t_read:.2f} dialed_source={dict(sources)}"
          f" aborted_records_visible_to_read_uncommitted={len(raw) - len(msgs)}")
    assert not missing, f"{len(missing)} attempts without an enriched result, e.g. {sorted(missing)[:3]}"
    assert not duplicated, f"{len(duplicated)} attempts with more than one result, e.g. {list(duplicated.items())[:3]}"
    sample = next(e for e in events if e["attempt"] == f"{job_id}:c5:1")
    assert sample["contact"] == {"list_id": list_id, "phone": "+33123450005", "timezone": "Europe/Paris",
                                 "custom": {"n": 5}}
    assert sample["zone"] == "Zone1" and sample["code"] == "ANSWER_HUMAN" and sample["duration_ms"] == 1005
    assert {e["producer"]["epoch"] for e in events} <= {epoch1, epoch2}
    assert set(sources) <= {"event", "database"}, "every result is joined with its dial (event or attempts row)"

    dead = await asyncio.to_thread(read_topic, bootstrap, dead_letter_topic(in_topic), lambda m: len(m) >= 1, 30.0)
    assert len(dead) == 1 and dict(dead[0].headers() or [])["origin_topic"] == in_topic.encode()
    holder, _epoch = await _master(db, newer_than=baseline)
    assert holder == second, "the resumed zombie must not take the role back"
    for server, rec in recs.items():
        if server != first or fault == "sigstop":
            assert rec.alive(), f"aggregator on {server} exited"


async def test_a_new_session_fences_the_previous_holder_of_the_transactional_id(stack: Stack, pg_dsn: str) -> None:
    """The zombie case without timing luck: session A has read a batch, session B opens with the same
    transactional id; A's commit is refused as fenced, B re-reads the batch from the committed offsets."""
    org = _org()
    bootstrap = bootstrap_servers(stack.topo)
    in_topic, out_topic = topic_name(EventKind.ATTEMPT, org), topic_name(EventKind.ENRICHEDATTEMPTRESULT, org)
    await ensure_topics({"bootstrap.servers": bootstrap}, org_topics(org))
    settings = await load_producer_settings(pg_dsn)
    async with EventPublisher(bootstrap, settings, service="it", server="pom1") as publisher:
        for i in range(10):
            await publisher.publish_and_wait(_attempt(org, 1, i, AttemptPhase.DIALED))

    def session() -> KafkaSession:
        return KafkaSession(bootstrap=bootstrap, security={}, input_topics=[in_topic],
                            producer_conf=settings.librdkafka, transactional_id=f"it-{org}", group_id=f"it-{org}")

    async def fetch_all(s: KafkaSession, n: int) -> list[Message]:
        got: list[Message] = []
        deadline = time.monotonic() + 30
        while len(got) < n and time.monotonic() < deadline:
            got += await s.fetch(n - len(got), 0.5)
        return got

    zombie, successor = session(), session()
    try:
        await zombie.open()
        batch = await fetch_all(zombie, 10)
        assert len(batch) == 10
        await successor.open()  # init_transactions: the zombie's producer epoch is now stale
        offsets = {(in_topic, 0): (batch[-1].offset() or 0) + 1}
        with pytest.raises(AggregatorKafkaError) as info:
            await zombie.commit([OutRecord(out_topic, b"job:1", b"zombie", [])], offsets)
        assert info.value.fenced, str(info.value)
        again = await fetch_all(successor, 10)
        assert [m.offset() for m in again] == [m.offset() for m in batch], "the fenced batch is read again"
        await successor.commit([OutRecord(out_topic, b"job:1", b"successor", [])], offsets)
    finally:
        await zombie.close()
        await successor.close()
    out = await asyncio.to_thread(read_topic, bootstrap, out_topic, lambda m: len(m) >= 1, 30.0)
    assert [m.value() for m in out] == [b"successor"]
