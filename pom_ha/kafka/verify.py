"""``kafka verify``: the guide's Kafka HA verification steps, run against a live cluster.

Checks, in order (each one row of the pass/fail table):

1. every broker id of the topology is registered under ``<chroot>/brokers/ids`` in ZooKeeper;
2. each Event SDK topic (``POM.<org>.JOB`` ...) exists with the expected replication factor
   (``create_topics`` creates missing ones with RF 3, one partition as the vendor does);
3. the replicas of every partition are distinct brokers and together cover every broker;
4. every partition's ISR holds all its replicas (the cluster is healthy before it is disturbed);
5. disruptive (skipped with ``disruptive=False``, or when 1-4 did not all pass): the leader of the first
   topic's partition 0 is stopped through the lab launcher (by PID; only a lab-managed broker), its
   partitions get another leader and it leaves every ISR; it is started again and must rejoin every ISR.
   The broker is always started again, also when a check fails.

The cluster is reached with the topology's client settings, so an SSL-mode lab is verified over mutual TLS.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError

from pom_ha.config import Topology
from pom_ha.config.addresses import bootstrap_servers
from pom_ha.infra.kafka import KafkaLauncher, broker_ids
from pom_ha.infra.zookeeper import KAFKA_CHROOT, zookeeper_connect
from pom_ha.kafka.tls import KafkaTlsError, security_config

EVENT_KINDS = ("JOB", "JOBSTATISTICS", "AGENT", "AGENTSTATISTICS", "ATTEMPT", "ENRICHEDATTEMPTRESULT")
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
REPLICATION_FACTOR = 3
ZK_TIMEOUT_S = 10.0
METADATA_TIMEOUT_S = 10.0
POLL_S = 0.25
DISRUPTIVE_ROWS = ("leader stop moves leadership", "stopped broker leaves every ISR",
                   "restarted broker rejoins every ISR")


def event_topics(org: str = "Default") -> list[str]:
    """The Event SDK topics of one organization ("Default", or the organization id)."""
    return [f"POM.{org}.{kind}" for kind in EVENT_KINDS]


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str


class VerifyError(Exception):
    """The cluster could not be reached at all; the message says which part."""


def _zk_client(topo: Topology, timeout_s: float) -> KazooClient:
    hosts = zookeeper_connect(topo, chroot=False)
    zk = KazooClient(hosts=hosts, timeout=timeout_s)
    try:
        zk.start(timeout=timeout_s)
    except KazooTimeoutError:
        zk.close()
        raise VerifyError(f"ZooKeeper ({hosts}) not reachable with quorum within {timeout_s:.0f} s") from None
    return zk


def _zk_read(zk: KazooClient, path: str, timeout_s: float, children: bool = False) -> Any:
    """One bounded read: kazoo's synchronous calls block forever without quorum."""
    try:
        if children:
            return zk.get_children_async(path).get(timeout=timeout_s)
        data, _stat = zk.get_async(path).get(timeout=timeout_s)
        return json.loads(data)
    except NoNodeError:
        return None
    except (KazooException, KazooTimeoutError, ValueError) as exc:
        raise VerifyError(f"ZooKeeper: cannot read {path} ({exc.__class__.__name__})") from None


def registered_broker_ids(topo: Topology, timeout_s: float = ZK_TIMEOUT_S) -> set[int]:
    """The broker ids under the Kafka chroot's ``/brokers/ids``."""
    zk = _zk_client(topo, timeout_s)
    try:
        return {int(c) for c in _zk_read(zk, f"{KAFKA_CHROOT}/brokers/ids", timeout_s, children=True) or []}
    finally:
        zk.stop()
        zk.close()


def _fmt(ids: set[int] | list[int]) -> str:
    return ",".join(str(i) for i in sorted(ids)) or "none"


#: (topic, partition) -> (leader, replicas, isr)
Partitions = dict[tuple[str, int], tuple[int, list[int], list[int]]]


class _Cluster:
    """The cluster as its controller recorded it in ZooKeeper (what ``kafka-topics --describe`` shows: brokers'
    metadata caches may lag behind it), plus a client that reaches the brokers with the topology's settings."""

    def __init__(self, topo: Topology) -> None:
        self.zk = _zk_client(topo, ZK_TIMEOUT_S)
        self.admin = AdminClient(
            {**security_config(topo), "bootstrap.servers": bootstrap_servers(topo), "log_level": 0},
            error_cb=lambda _err: None,  # brokers stopped on purpose are expected to be unreachable
        )

    def close(self) -> None:
        self.zk.stop()
        self.zk.close()

    def broker_ids(self) -> set[int]:
        return {int(c) for c in _zk_read(self.zk, f"{KAFKA_CHROOT}/brokers/ids", ZK_TIMEOUT_S, children=True) or []}

    def partitions(self, topics: list[str]) -> Partitions:
        """Leader, replicas and ISR of every partition of the topics that exist."""
        out: Partitions = {}
        for t in topics:
            assignment = _zk_read(self.zk, f"{KAFKA_CHROOT}/brokers/topics/{t}", ZK_TIMEOUT_S)
            if not assignment:
                continue
            for pid, replicas in assignment.get("partitions", {}).items():
                state = _zk_read(self.zk, f"{KAFKA_CHROOT}/brokers/topics/{t}/partitions/{pid}/state", ZK_TIMEOUT_S)
                leader, isr = (state["leader"], state["isr"]) if state else (-1, [])
                out[(t, int(pid))] = (int(leader), [int(r) for r in replicas], [int(i) for i in isr])
        return out

    def client_brokers(self) -> set[int]:
        """Brokers a client is told about (through TLS in SSL mode)."""
        return set(self.admin.list_topics(timeout=METADATA_TIMEOUT_S).brokers)

    def create(self, topics: list[str], replication: int, timeout_s: float) -> list[str]:
        existing = set(self.admin.list_topics(timeout=METADATA_TIMEOUT_S).topics)
        missing = [t for t in topics if t not in existing]
        if missing:
            futures = self.admin.create_topics([NewTopic(t, num_partitions=1, replication_factor=replication)
                                                for t in missing])
            for fut in futures.values():
                try:
                    fut.result(timeout_s)
                except KafkaException as exc:
                    if "TOPIC_ALREADY_EXISTS" not in str(exc):
                        raise
        return missing


async def _poll(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if await asyncio.to_thread(predicate):
                return True
        except (KafkaException, VerifyError):
            pass  # metadata may be briefly unavailable while leaders move: ask again
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(POLL_S)


async def verify_cluster(
    topo: Topology,
    *,
    org: str = "Default",
    create_topics: bool = False,
    disruptive: bool = True,
    timeout_s: float = 120.0,
    progress: Callable[[str], None] = lambda _m: None,
) -> list[Check]:
    """Run every check; returns the rows (see the module docstring). Raises nothing for a failed check."""
    try:
        cluster = await asyncio.to_thread(_Cluster, topo)
    except (VerifyError, KafkaTlsError) as exc:
        return [Check("cluster reachable", FAIL, str(exc))]
    try:
        return await _verify(topo, cluster, org, create_topics, disruptive, timeout_s, progress)
    except VerifyError as exc:
        return [Check("cluster reachable", FAIL, str(exc))]
    finally:
        await asyncio.to_thread(cluster.close)


async def _verify(
    topo: Topology,
    cluster: _Cluster,
    org: str,
    create_topics: bool,
    disruptive: bool,
    timeout_s: float,
    progress: Callable[[str], None],
) -> list[Check]:
    checks: list[Check] = []
    expected = broker_ids(topo)
    replication = min(REPLICATION_FACTOR, len(expected))
    topics = event_topics(org)

    # 1. registration in ZooKeeper, and what clients are told
    registered = await asyncio.to_thread(cluster.broker_ids)
    missing, extra = expected - registered, registered - expected
    detail = f"ids {_fmt(registered)} under {KAFKA_CHROOT}/brokers/ids"
    if missing:
        detail = f"broker(s) {_fmt(missing)} not registered (registered: {_fmt(registered)})"
    elif extra:
        detail = f"unexpected broker(s) {_fmt(extra)} registered (topology has {_fmt(expected)})"
    checks.append(Check("brokers registered in ZooKeeper", FAIL if missing or extra else PASS, detail))
    mode = "mutual TLS" if topo.kafka.ssl else "plaintext"
    try:
        listed = await asyncio.to_thread(cluster.client_brokers)
        absent = expected - listed
        checks.append(Check(f"clients reach the brokers ({mode})", FAIL if absent else PASS,
                            f"metadata lists brokers {_fmt(listed)}" + (f", not {_fmt(absent)}" if absent else "")))
    except KafkaException as exc:
        checks.append(Check(f"clients reach the brokers ({mode})", FAIL,
                            f"no metadata from {bootstrap_servers(topo)}: {exc}"))

    # 2. topics
    if create_topics:
        try:
            created = await asyncio.to_thread(cluster.create, topics, replication, timeout_s)
        except KafkaException as exc:
            checks.append(Check("create the Event SDK topics", FAIL, str(exc)))
            created = []
        if created:
            progress(f"created {', '.join(created)} (RF {replication})")
            # a new partition gets its leader and full ISR within seconds: let the rows below see that state
            await _poll(lambda: _settled(cluster.partitions(topics), len(topics)), timeout_s)
    parts = await asyncio.to_thread(cluster.partitions, topics)
    for t in topics:
        tparts = {pid: v for (tn, pid), v in parts.items() if tn == t}
        if not tparts:
            checks.append(Check(f"topic {t} exists", FAIL, "missing (create it with --create-topics)"))
            continue
        short = [f"[{pid}] RF {len(r)}" for pid, (_l, r, _i) in sorted(tparts.items()) if len(r) < replication]
        checks.append(Check(f"topic {t} exists", FAIL if short else PASS,
                            f"replication below {replication}: {', '.join(short)}" if short
                            else f"{len(tparts)} partition(s), RF {replication}"))

    if parts:
        # 3. spread
        bad = [f"{t}[{pid}] replicas {_fmt(r)}" for (t, pid), (_l, r, _i) in sorted(parts.items())
               if len(set(r)) != len(r) or not set(r) <= expected]
        covered = set().union(*(set(r) for _l, r, _i in parts.values()))
        uncovered = expected - covered
        detail = (f"{len(parts)} partition(s) over brokers {_fmt(covered)}" if not bad and not uncovered
                  else "; ".join(bad + ([f"no replica on broker(s) {_fmt(uncovered)}"] if uncovered else [])))
        checks.append(Check("replicas spread over all brokers", FAIL if bad or uncovered else PASS, detail))

        # 4. ISR complete, a live leader everywhere
        short_isr = [f"{t}[{pid}] ISR {_fmt(i)} of {_fmt(r)}" + (" no leader" if ldr < 0 else "")
                     for (t, pid), (ldr, r, i) in sorted(parts.items()) if set(i) != set(r) or ldr < 0]
        checks.append(Check("every ISR complete", FAIL if short_isr else PASS,
                            "; ".join(short_isr) if short_isr else "every replica in sync"))

    # 5. leader stop and restart
    if not disruptive:
        checks += [Check(n, SKIP, "not run (--no-disruptive)") for n in DISRUPTIVE_ROWS]
    elif any(c.status != PASS for c in checks) or not parts:
        checks += [Check(n, SKIP, "not run: the cluster is not healthy (see the rows above)") for n in DISRUPTIVE_ROWS]
    else:
        checks += await _leader_failover(topo, cluster, topics, parts, timeout_s, progress)
    return checks


def _settled(parts: Partitions, topics: int) -> bool:
    return len({t for t, _p in parts}) >= topics and _all_isr_full(parts)


def _all_isr_full(parts: Partitions) -> bool:
    return all(set(i) == set(r) and leader >= 0 for leader, r, i in parts.values())


async def _leader_failover(
    topo: Topology,
    cluster: _Cluster,
    topics: list[str],
    parts: Partitions,
    timeout_s: float,
    progress: Callable[[str], None],
) -> list[Check]:
    names = DISRUPTIVE_ROWS
    probe = (topics[0], 0)
    leader = parts[probe][0]
    launcher = next((KafkaLauncher(topo, s) for s in topo.servers_running("kafka")
                     if topo.server_index(s.name) == leader), None)
    if launcher is None or not launcher.running():
        why = (f"broker {leader} (leader of {probe[0]}[0]) is not lab-managed: no live pid record in "
               f"{topo.lab_dir() / 'run'}; rerun with --no-disruptive")
        return [Check(names[0], FAIL, why)] + [Check(n, SKIP, "not run") for n in names[1:]]
    led = sorted(k for k, (ldr, _r, _i) in parts.items() if ldr == leader)
    checks: list[Check] = []
    progress(f"stopping broker {leader} ({launcher.name}, leader of {len(led)} partition(s))")
    t0 = time.monotonic()
    try:
        await asyncio.to_thread(launcher.stop)
        last: Partitions = {}

        def moved() -> bool:
            nonlocal last
            last = cluster.partitions(topics)
            return all(k in last and last[k][0] not in (leader, -1) for k in led)

        ok = await _poll(moved, timeout_s)
        after = ", ".join(f"{t}[{p}] {leader}->{last[(t, p)][0] if (t, p) in last else '?'}" for t, p in led)
        took = f"{after}, {time.monotonic() - t0:.1f} s after SIGTERM"
        checks.append(Check(names[0], PASS if ok else FAIL, took if ok else f"after {timeout_s:.0f} s: {after}"))

        def dropped() -> bool:
            nonlocal last
            last = cluster.partitions(topics)
            return len(last) == len(parts) and all(leader not in i for _l, _r, i in last.values())

        ok = await _poll(dropped, timeout_s)
        still = [f"{t}[{p}]" for (t, p), (_l, _r, i) in sorted(last.items()) if leader in i]
        checks.append(Check(names[1], PASS if ok else FAIL,
                            f"broker {leader} out of {len(last)} ISR(s)" if ok
                            else f"broker {leader} still in the ISR of {', '.join(still) or '?'}"))
    finally:
        progress(f"starting broker {leader} again")
        t1 = time.monotonic()
        await asyncio.to_thread(launcher.start)
        try:
            await launcher.wait_ready(timeout_s)
            started: str | None = None
        except Exception as exc:  # reported as the failing row, not raised: the table must still print
            started = str(exc).splitlines()[0]
    if started is not None:
        checks.append(Check(names[2], FAIL, f"broker {leader} did not start: {started}"))
        return checks

    def rejoined() -> bool:
        nonlocal last
        last = cluster.partitions(topics)
        return len(last) == len(parts) and all(leader in i for _l, _r, i in last.values())

    ok = await _poll(rejoined, timeout_s)
    missing = [f"{t}[{p}]" for (t, p), (_l, _r, i) in sorted(last.items()) if leader not in i]
    checks.append(Check(names[2], PASS if ok else FAIL,
                        f"broker {leader} back in every ISR {time.monotonic() - t1:.1f} s after its start" if ok
                        else f"broker {leader} missing from the ISR of {', '.join(missing) or '?'}"))
    return checks


def format_checks(checks: list[Check]) -> str:
    header = ["CHECK", "RESULT", "DETAIL"]
    rows = [[c.name, c.status, c.detail] for c in checks]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def all_passed(checks: list[Check]) -> bool:
    """True when no row failed (rows skipped on request do not count)."""
    return bool(checks) and all(c.status != FAIL for c in checks)
