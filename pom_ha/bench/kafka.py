"""`pom-ha bench kafka-bytes`: bytes on the brokers' disks per dialing attempt over the six Event SDK topics.

Self-contained: an isolated copy of the topology running PostgreSQL (for the ``pim_kafka_producer_config``
table, seeded by migration 0001 with the guide's defaults), the ZooKeeper ensemble and the three Kafka
brokers. The guide's sample run (20 jobs, 1,000 agents, 67,000 attempts per hour; 859 MB/hour with the
ZooKeeper folder, 707 MB/hour in the six topics) is replayed in real time at its attempt rate, so each
producer's batches hold what they would hold in production (records per batch = rate x linger).

Event mix per attempt (``MIX``), each event built with the real models (``pom_ha.events.models``) and
published by one producer per service, as in a deployment:

* Campaign Manager (``EventPublisher``): ATTEMPT DIALED and RESULT (2 per attempt), JOBSTATISTICS every 5 s
  per running job, JOB state changes (4 per job and hour: Queued, Filter in Progress, Running, Completed);
* Agent Manager (``EventPublisher``): AGENT on every agent state change of an answered call (Talking,
  Wrapup, Ready: 3 per answered attempt, 60 % of attempts answered), AGENTSTATISTICS every 30 s per agent;
* the aggregator (a transactional producer with the settings ``services/event_aggregator/session.py``
  builds): one ENRICHEDATTEMPTRESULT per attempt, one transaction every 250 ms (its fetch loop), so the
  transaction markers are counted too.

Two runs go side by side on two organizations' topics: ``Default`` with the producer settings pom-ha
derives from the table (``map_producer_config``), and ``GuideBaseline`` with the guide's settings taken
literally (no compression, librdkafka's 5 ms linger), for comparison. Bytes are the sizes of the ``.log``
segment files of each partition's leader replica (one copy; the cluster holds replication factor 3 of
them), read after every record is acknowledged, divided by the attempts.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from pom_ha.bench.isolated import isolated_topology
from pom_ha.config import Topology
from pom_ha.config.addresses import bootstrap_servers
from pom_ha.events.config import ProducerSettings, load_producer_settings, map_producer_config
from pom_ha.events.kafka_log import KafkaLogBridge
from pom_ha.events.models import (
    AgentEvent,
    AgentStatisticsEvent,
    AttemptEvent,
    AttemptPhase,
    ContactData,
    EnrichedAttemptResultEvent,
    EventKind,
    JobEvent,
    JobStatisticsEvent,
    PomEvent,
    ProducerRef,
    derived_event_id,
    topic_name,
)
from pom_ha.events.publisher import EventPublisher
from pom_ha.events.topics import ensure_topics
from pom_ha.infra.kafka import KafkaLauncher
from pom_ha.infra.process import InfraError
from pom_ha.infra.stack import Stack
from pom_ha.kafka.tls import security_config

#: 127.0.66.N / PostgreSQL 127.0.67.1: beside the test sessions and the ActiveMQ bench (64)
BLOCK = 66
ORG = "Default"
BASELINE_ORG = "GuideBaseline"
#: the guide's sample run
GUIDE_ATTEMPTS_PER_HOUR = 67_000
GUIDE_JOBS = 20
GUIDE_AGENTS = 1_000
GUIDE_MB_PER_HOUR = {"AGENT": 255, "AGENTSTATISTICS": 255, "ATTEMPT": 132, "ENRICHEDATTEMPTRESULT": 12, "JOB": 40,
                     "JOBSTATISTICS": 13}
GUIDE_ZOOKEEPER_MB = 204
#: the guide's total row, 859 MB/hour (it includes the ZooKeeper folder), / 67,000 attempts/hour = 12.8 kB;
#: its six topic rows alone add up to 707 MB/hour = 10.6 kB per attempt
GUIDE_TOTAL_MB_PER_HOUR = 859
GUIDE_BYTES_PER_ATTEMPT = round(GUIDE_TOTAL_MB_PER_HOUR * 1_000_000 / GUIDE_ATTEMPTS_PER_HOUR)
GUIDE_TOPICS_BYTES_PER_ATTEMPT = round(sum(GUIDE_MB_PER_HOUR.values()) * 1_000_000 / GUIDE_ATTEMPTS_PER_HOUR)
ANSWER_RATE = 0.6
JOBSTATISTICS_PERIOD_S = 5.0
AGENTSTATISTICS_PERIOD_S = 30.0
JOB_EVENTS_PER_JOB_HOUR = 4
AGGREGATOR_TXN_PERIOD_S = 0.25
#: events per attempt at the guide's rates (documented in docs/events.md)
MIX = {
    "ATTEMPT": 2.0,
    "ENRICHEDATTEMPTRESULT": 1.0,
    "AGENT": 3 * ANSWER_RATE,
    "AGENTSTATISTICS": GUIDE_AGENTS * 3600 / AGENTSTATISTICS_PERIOD_S / GUIDE_ATTEMPTS_PER_HOUR,
    "JOBSTATISTICS": GUIDE_JOBS * 3600 / JOBSTATISTICS_PERIOD_S / GUIDE_ATTEMPTS_PER_HOUR,
    "JOB": GUIDE_JOBS * JOB_EVENTS_PER_JOB_HOUR / GUIDE_ATTEMPTS_PER_HOUR,
}
CODES_ANSWERED = ["ANSWER_HUMAN", "ANSWER_MACHINE"]
CODES_OTHER = ["NO_ANSWER", "BUSY", "RING_NO_ANSWER", "FAX", "INVALID_NUMBER"]


@dataclass(frozen=True)
class Planned:
    at_s: float  # offset from the start of the replay
    service: str  # campaign_manager | agent_manager | event_aggregator
    event: PomEvent


def _ref(service: str, server: str, instance: str, epoch: int) -> ProducerRef:
    return ProducerRef(service=service, server=server, instance=instance, epoch=epoch)


def plan_events(attempts: int, attempts_per_hour: float, org: str, seed: int = 7) -> list[Planned]:
    """The guide's event mix for ``attempts`` attempts at ``attempts_per_hour``, in time order."""
    rng = random.Random(seed)
    start = datetime.now(UTC)
    gap = 3600.0 / attempts_per_hour
    duration = attempts * gap
    cm = _ref("campaign_manager", "pom1", uuid.uuid4().hex[:12], 3)
    am = _ref("agent_manager", "pom2", uuid.uuid4().hex[:12], 5)
    agg = _ref("event_aggregator", "pom3", uuid.uuid4().hex[:12], 2)
    zones = ["Default", "Zone1"]
    out: list[Planned] = []

    def at(t: float) -> datetime:
        return start + timedelta(seconds=t)

    def add(t: float, service: str, event: PomEvent, ref: ProducerRef) -> None:
        out.append(Planned(t, service, event.model_copy(update={"producer": ref, "occurred_at": at(t)})))

    jobs = [1000 + j for j in range(GUIDE_JOBS)]
    counters = {job: [0, 0, 0] for job in jobs}  # attempts, answered, nuisance
    for i in range(attempts):
        t = i * gap
        job = jobs[i % GUIDE_JOBS]
        contact = f"C{rng.randrange(10**9):09d}"
        call = uuid.uuid4().hex
        answered = rng.random() < ANSWER_RATE
        ring = rng.uniform(4, 12)
        talk = rng.uniform(20, 90) if answered else 0.0
        wrap = rng.uniform(3, 15) if answered else 0.0
        code = rng.choice(CODES_ANSWERED) if answered else rng.choice(CODES_OTHER)
        duration_ms = int((ring + talk) * 1000)
        counters[job][0] += 1
        counters[job][1] += int(answered)
        dialed = AttemptEvent(org=org, phase=AttemptPhase.DIALED, job_id=job, contact_id=contact, attempt_no=1,
                              call_id=call)
        add(t, "campaign_manager", dialed, cm)
        done = t + ring + talk
        result = AttemptEvent(org=org, phase=AttemptPhase.RESULT, job_id=job, contact_id=contact, attempt_no=1,
                              call_id=call, code=code, duration_ms=duration_ms)
        add(done, "campaign_manager", result, cm)
        enriched = EnrichedAttemptResultEvent(
            org=org, event_id=derived_event_id(EventKind.ENRICHEDATTEMPTRESULT, f"{job}:{contact}:1"),
            job_id=job, contact_id=contact, attempt_no=1, attempt=f"{job}:{contact}:1", code=code, call_id=call,
            dialed_at=at(t), completed_at=at(done), duration_ms=duration_ms, dialed_source="event",
            campaign_id=job - 900, zone=zones[job % 2],
            contact=ContactData(list_id=job - 800, phone=f"+1{rng.randrange(2_000_000_000, 9_999_999_999)}",
                                timezone="America/New_York", custom={"account": f"A{rng.randrange(10**7):07d}"}),
            source_event_ids=[dialed.event_id, result.event_id])
        add(done + 0.2, "event_aggregator", enriched, agg)
        if answered:
            agent = f"agent{rng.randrange(GUIDE_AGENTS):04d}"
            zone = zones[int(agent[5:]) % 2]
            for dt, state, prev in ((ring, "Talking", "Idle"), (ring + talk, "Wrapup", "Talking"),
                                    (ring + talk + wrap, "Idle", "Wrapup")):
                add(t + dt, "agent_manager",
                    AgentEvent(org=org, agent_id=agent, zone=zone, state=state, previous_state=prev, job_id=job),
                    am)
    # periodic and rare events, spread evenly over the replay as the guide's run spreads them
    n_agent_stats = round(MIX["AGENTSTATISTICS"] * attempts)
    for k in range(n_agent_stats):
        agent = f"agent{k % GUIDE_AGENTS:04d}"
        calls = rng.randrange(0, 200)
        add(k * duration / max(1, n_agent_stats), "agent_manager",
            AgentStatisticsEvent(org=org, agent_id=agent, zone=zones[k % 2], calls=calls,
                                 talk_ms=calls * rng.randrange(20_000, 90_000), wrapup_ms=calls * 8000,
                                 idle_ms=rng.randrange(0, 3_600_000), total_ha_ms=0), am)
    n_job_stats = round(MIX["JOBSTATISTICS"] * attempts)
    for k in range(n_job_stats):
        job = jobs[k % GUIDE_JOBS]
        a, ans, _ = counters[job]
        add(k * duration / max(1, n_job_stats), "campaign_manager",
            JobStatisticsEvent(org=org, job_id=job, contacts_total=50_000, contacts_done=a, contacts_pending=50_000 - a,
                               attempts=a, attempts_in_flight=rng.randrange(0, 40), answered=ans, nuisance=0,
                               nuisance_rate=0.0), cm)
    n_job = max(1, round(MIX["JOB"] * attempts))
    states: list[tuple[str, str | None]] = [("Queued", None), ("Filter in Progress", "Queued"),
                                            ("Running", "Filter in Progress"), ("Completed", "Running")]
    for k in range(n_job):
        job = jobs[k % GUIDE_JOBS]
        job_state, job_prev = states[k % len(states)]
        add(k * duration / n_job, "campaign_manager",
            JobEvent(org=org, job_id=job, campaign_id=job - 900, campaign_name=f"Outbound campaign {job - 900}",
                     zone=zones[job % 2], state=job_state, previous_state=job_prev, reason=None), cm)
    out.sort(key=lambda p: p.at_s)
    return out


def _aggregator_conf(settings: ProducerSettings, bootstrap: str, security: dict[str, str], tid: str) -> dict[str, Any]:
    """The aggregator's transactional producer settings (services/event_aggregator/session.py)."""
    conf = settings.librdkafka
    return {
        **conf, **security, "bootstrap.servers": bootstrap, "transactional.id": tid,
        "logger": KafkaLogBridge("bench-aggregator"),
        "transaction.timeout.ms": 30_000, "enable.idempotence": True, "acks": "all",
        "retry.backoff.ms": min(int(conf.get("retry.backoff.ms", 100)), 100),
        "retry.backoff.max.ms": 1000,
        "message.timeout.ms": min(int(conf.get("message.timeout.ms", 300_000)), 30_000),
    }


class _Aggregator:
    """A transactional producer committing what arrived every AGGREGATOR_TXN_PERIOD_S."""

    def __init__(self, conf: dict[str, Any]) -> None:
        self.producer = Producer(conf)
        self.queue: list[PomEvent] = []
        self.transactions = 0

    def init(self) -> None:
        self.producer.init_transactions(30)

    def commit(self, events: list[PomEvent]) -> None:
        if not events:
            return
        self.producer.begin_transaction()
        for e in events:
            self.producer.produce(e.topic(), value=e.to_json(), key=e.key().encode(), headers=e.headers())
        self.producer.commit_transaction(30)
        self.transactions += 1


async def _replay(plan: list[Planned], publishers: dict[str, EventPublisher], aggregator: _Aggregator,
                  echo: Callable[[str], None]) -> int:
    """Publish every planned event at its time; returns the events published."""
    t0 = time.monotonic()
    futures: list[asyncio.Future[Any]] = []
    pending_agg: list[PomEvent] = []
    next_txn = AGGREGATOR_TXN_PERIOD_S
    next_report = 30.0
    txn_task: asyncio.Future[None] | None = None
    for p in plan:
        wait = p.at_s - (time.monotonic() - t0)
        if wait > 0:
            await asyncio.sleep(wait)
        now = time.monotonic() - t0
        if now >= next_txn and (txn_task is None or txn_task.done()):
            if txn_task is not None:
                await txn_task
            batch, pending_agg = pending_agg, []
            txn_task = asyncio.ensure_future(asyncio.to_thread(aggregator.commit, batch))
            next_txn = now + AGGREGATOR_TXN_PERIOD_S
        if now >= next_report:
            echo(f"  {now:.0f} s: {len(futures)} events published")
            next_report += 30.0
        if p.service == "event_aggregator":
            pending_agg.append(p.event)
        else:
            futures.append(await publishers[p.service].publish(p.event))
    if txn_task is not None:
        await txn_task
    await asyncio.to_thread(aggregator.commit, pending_agg)
    await asyncio.gather(*futures)
    return len(futures) + sum(1 for p in plan if p.service == "event_aggregator")


def _leader_log_bytes(stack: Stack, admin: AdminClient, topics: list[str]) -> dict[str, int]:
    """Bytes of the ``.log`` segment files of partition 0's leader replica of each topic."""
    md = admin.list_topics(timeout=30)
    by_id = {stack.topo.server_index(launcher.server.name): launcher for launcher in stack.launchers("kafka")}
    out: dict[str, int] = {}
    for topic in topics:
        parts = md.topics[topic].partitions
        total = 0
        for pid, part in parts.items():
            leader = by_id[part.leader]
            assert isinstance(leader, KafkaLauncher)
            folder = Path(leader.data_dir) / f"{topic}-{pid}"
            total += sum(f.stat().st_size for f in folder.glob("*.log"))
        out[topic] = total
    return out


async def _wait_replicas_equal(stack: Stack, topics: list[str], timeout_s: float = 60.0) -> None:
    """Until every replica of every partition has the same log size (followers caught up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        sizes: dict[str, set[int]] = {}
        for launcher in stack.launchers("kafka"):
            assert isinstance(launcher, KafkaLauncher)
            for topic in topics:
                folder = Path(launcher.data_dir) / f"{topic}-0"
                if folder.exists():
                    sizes.setdefault(topic, set()).add(sum(f.stat().st_size for f in folder.glob("*.log")))
        if all(len(s) == 1 for s in sizes.values()):
            return
        if time.monotonic() > deadline:
            raise InfraError(f"replicas did not converge within {timeout_s:.0f} s: {sizes}")
        await asyncio.sleep(0.2)


async def run_bench(base: Topology, attempts: int, echo: Callable[[str], None] = print,
                    attempts_per_hour: float = GUIDE_ATTEMPTS_PER_HOUR,
                    variants: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """``variants``: more organizations, each with table rows replacing the seeded ones (for tuning)."""
    topo = isolated_topology(base, block=BLOCK)
    stack = Stack(topo)
    lab = topo.lab_dir()
    try:
        await stack.up(only=["postgres", "zookeeper", "kafka"], progress=lambda m: echo(f"  {m}"))
        bootstrap = bootstrap_servers(topo)
        security = security_config(topo)
        admin_conf: dict[str, Any] = {**security, "bootstrap.servers": bootstrap}
        tuned = await load_producer_settings(topo.postgres.dsn())
        baseline = map_producer_config({"compression.type": "none", "linger.ms": "5"})
        runs = {ORG: tuned, BASELINE_ORG: baseline}
        for org, rows in (variants or {}).items():
            runs[org] = map_producer_config(rows)
        topics = {org: [topic_name(k, org) for k in EventKind] for org in runs}
        await ensure_topics(admin_conf, [t for ts in topics.values() for t in ts])
        plans = {org: plan_events(attempts, attempts_per_hour, org) for org in runs}
        echo(f"  replaying {attempts} attempts at {attempts_per_hour:,.0f}/hour "
             f"({attempts * 3600 / attempts_per_hour:.0f} s), {len(plans[ORG])} events per organization")
        opened: list[EventPublisher] = []
        aggregators: dict[str, _Aggregator] = {}
        replays: list[Any] = []
        try:
            for org, settings in runs.items():
                pubs = {}
                for service, server in (("campaign_manager", "pom1"), ("agent_manager", "pom2")):
                    pub = EventPublisher(bootstrap, settings, service=service, server=server, security=security)
                    await pub.start()
                    opened.append(pub)
                    pubs[service] = pub
                agg = _Aggregator(_aggregator_conf(settings, bootstrap, security, f"bench-aggregator-{org}"))
                await asyncio.to_thread(agg.init)
                aggregators[org] = agg
                replays.append(_replay(plans[org], pubs, agg, echo if org == ORG else lambda _m: None))
            published = await asyncio.gather(*replays)
        finally:
            for pub in opened:
                await pub.stop()
            for agg in aggregators.values():
                await asyncio.to_thread(agg.producer.flush, 30)
            # librdkafka clients end when collected: before the brokers stop, not after (no reconnect noise)
            opened.clear()
            aggregators.clear()
            replays.clear()
            gc.collect()
        all_topics = [t for ts in topics.values() for t in ts]
        await _wait_replicas_equal(stack, all_topics)
        sizes = await asyncio.to_thread(_leader_log_bytes, stack, AdminClient(admin_conf), all_topics)
    finally:
        await stack.down()
        if not os.environ.get("POM_KEEP_LAB"):
            shutil.rmtree(lab, ignore_errors=True)

    def per_attempt(org: str) -> dict[str, float]:
        return {t.split(".")[-1]: round(sizes[t] / attempts, 1) for t in topics[org]}

    total = sum(sizes[t] for t in topics[ORG])
    base_total = sum(sizes[t] for t in topics[BASELINE_ORG])
    events_per_attempt = {kind: round(v, 3) for kind, v in MIX.items()}
    return {
        "attempts": attempts,
        "attempts_per_hour": attempts_per_hour,
        "events": published[0],
        "events_per_attempt": events_per_attempt,
        "log_bytes": total,
        "bytes_per_attempt": round(total / attempts, 1),
        "bytes_per_attempt_by_topic": per_attempt(ORG),
        "compression": tuned.librdkafka.get("compression.type", "none"),
        "linger_ms": tuned.librdkafka.get("linger.ms"),
        "baseline_bytes_per_attempt": round(base_total / attempts, 1),
        "baseline_by_topic": per_attempt(BASELINE_ORG),
        "guide_bytes_per_attempt": GUIDE_BYTES_PER_ATTEMPT,
        "guide_topics_bytes_per_attempt": GUIDE_TOPICS_BYTES_PER_ATTEMPT,
        "target_bytes_per_attempt": 2000,
        "mb_per_hour_at_guide_rate": round(total / attempts * GUIDE_ATTEMPTS_PER_HOUR / 1e6, 1),
        **({"variants_bytes_per_attempt": {
            org: round(sum(sizes[t] for t in topics[org]) / attempts, 1) for org in variants}} if variants else {}),
    }
