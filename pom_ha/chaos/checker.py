"""The independent history checker: judges a chaos run only by what the system left behind.

Witnesses (read by :func:`collect`, judged by :func:`judge`, which is pure):

* the fenced tables, one *side effect* per row, each with the epoch it was accepted under: ``attempts``
  (the job's assignment epoch), ``agent_failover_log`` (the zone's Agent Manager lease), ``cd_job_trends``
  and ``cd_alarms`` (the Campaign Director lease), ``ha_probe_write`` (the probe's leases), plus every
  call the media platform placed (its call log: the DIAL's scope and epoch) — and ``ha_event`` / ``ha_lease``
  for the epochs' holders, printed with a violation;
* the media simulators' call logs (``<lab>/calls/<server>.jsonl``), the only witness that a dial went out;
* every record of the six ``POM.<org>.*`` topics of every organization of the topology, read by the
  checker's own consumer (a fresh group, from the beginning to the high watermark);
* ``jobs``, ``job_contacts``, ``attempts`` of the run's jobs and the Agent Manager's ``agents`` rows.

Assertions, one violation kind each:

``split_brain``       two epochs of one role (or one job) had side effects accepted in overlapping intervals
``duplicate_dial``    one (job, contact, attempt number) placed twice at the media platform
``stuck_contact``     a contact (or attempt) of a run's job left in a non-final state
``missing_event``     a completed attempt without its RESULT event, or a job's end without its JOB event
``duplicate_event``   a completed attempt with more than one RESULT event
``campaign_not_ended`` a run's job that is not Completed or Stopped
``agent_state``       a takeover left an agent in a state Table 9 does not allow, or an agent ended in a
                      state the agent model does not know
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

VIOLATION_KINDS = ("split_brain", "duplicate_dial", "stuck_contact", "missing_event", "duplicate_event",
                   "campaign_not_ended", "agent_state")
FINAL_JOB_STATES = ("Completed", "Stopped")


@dataclass(frozen=True)
class Write:
    """One side effect accepted under ``epoch`` of ``role`` at ``at`` (``source`` names its table/log)."""

    source: str
    role: str
    epoch: int
    at: datetime
    row: dict[str, Any]


@dataclass
class Evidence:
    writes: list[Write] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)  # call-log entries (+ "log": file:line)
    jobs: list[dict[str, Any]] = field(default_factory=list)  # id, name, state
    open_contacts: list[dict[str, Any]] = field(default_factory=list)  # job_contacts not final
    open_attempts: list[dict[str, Any]] = field(default_factory=list)  # attempts still 'dialing'
    completed: list[dict[str, Any]] = field(default_factory=list)  # attempts completed: job_id, contact_id, attempt_no
    events: list[dict[str, Any]] = field(default_factory=list)  # Kafka records, parsed: type, keys, where
    failover_rows: list[dict[str, Any]] = field(default_factory=list)
    agents: list[dict[str, Any]] = field(default_factory=list)
    epochs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # role -> ha_event rows (printed)


@dataclass(frozen=True)
class Violation:
    kind: str
    message: str
    rows: list[dict[str, Any]]

    def render(self) -> str:
        lines = [f"VIOLATION {self.kind}: {self.message}"]
        lines += [f"    {json.dumps(r, default=str, sort_keys=True)}" for r in self.rows]
        return "\n".join(lines)


# ---- judging (pure) -----------------------------------------------------------------------------------------
def judge(ev: Evidence) -> list[Violation]:
    out: list[Violation] = []
    out += check_split_brain(ev.writes, ev.epochs)
    out += check_duplicate_dials(ev.calls)
    out += check_stuck(ev.open_contacts, ev.open_attempts)
    out += check_events(ev.completed, ev.events, ev.jobs)
    out += check_campaigns(ev.jobs)
    out += check_agents(ev.failover_rows, ev.agents)
    return out


def _w(w: Write) -> dict[str, Any]:
    return {"source": w.source, "role": w.role, "epoch": w.epoch, "at": w.at.isoformat(), **w.row}


def check_split_brain(writes: Iterable[Write], epochs: dict[str, list[dict[str, Any]]] | None = None
                      ) -> list[Violation]:
    """Per role: epoch e's side effects span [first, last]; a later epoch e' > e must start after e's last."""
    spans: dict[str, dict[int, list[Write]]] = defaultdict(lambda: defaultdict(list))
    for w in writes:
        spans[w.role][w.epoch].append(w)
    out: list[Violation] = []
    for role, by_epoch in sorted(spans.items()):
        bounds = {e: (min(ws, key=lambda w: w.at), max(ws, key=lambda w: w.at)) for e, ws in by_epoch.items()}
        order = sorted(bounds)
        for i, e in enumerate(order):
            last_e = bounds[e][1]
            for later in order[i + 1:]:
                first_later = bounds[later][0]
                if last_e.at > first_later.at:
                    rows = [_w(first_later), _w(last_e)]
                    rows += [{"ha_event": r} for r in (epochs or {}).get(role, [])
                             if r.get("epoch") in (e, later)][:6]
                    out.append(Violation(
                        "split_brain",
                        f"{role}: epoch {e} had a side effect accepted at {last_e.at.isoformat()} ({last_e.source}),"
                        f" after epoch {later}'s first at {first_later.at.isoformat()} ({first_later.source})",
                        rows))
                    break  # one violation per stale epoch is enough to prove it
    return out


def check_duplicate_dials(calls: Iterable[dict[str, Any]]) -> list[Violation]:
    seen: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for c in calls:
        seen[(str(c["job"]), str(c["contact"]), int(c["attempt_no"]))].append(c)
    return [Violation("duplicate_dial", f"job {k[0]} contact {k[1]} attempt {k[2]} placed {len(v)} times", v)
            for k, v in sorted(seen.items()) if len(v) > 1]


def check_stuck(open_contacts: Iterable[dict[str, Any]], open_attempts: Iterable[dict[str, Any]]
                ) -> list[Violation]:
    out = [Violation("stuck_contact", f"job {r['job_id']} contact {r['contact_id']} left {r['state']!r}", [r])
           for r in open_contacts]
    out += [Violation("stuck_contact", f"job {r['job_id']} contact {r['contact_id']} attempt {r['attempt_no']}"
                      " still 'dialing'", [r]) for r in open_attempts]
    return out


def check_events(completed: Iterable[dict[str, Any]], events: Sequence[dict[str, Any]],
                 jobs: Iterable[dict[str, Any]]) -> list[Violation]:
    results: dict[tuple[int, str, int], dict[str, dict[str, Any]]] = defaultdict(dict)
    job_states: dict[int, set[str]] = defaultdict(set)
    for e in events:
        if e.get("event_type") == "ATTEMPT" and e.get("phase") == "RESULT":
            results[(int(e["job_id"]), str(e["contact_id"]), int(e["attempt_no"]))][str(e["event_id"])] = e
        elif e.get("event_type") == "JOB":
            job_states[int(e["job_id"])].add(str(e["state"]))
    out: list[Violation] = []
    for a in completed:
        key = (int(a["job_id"]), str(a["contact_id"]), int(a["attempt_no"]))
        found = results.get(key, {})
        if not found:
            out.append(Violation("missing_event", f"completed attempt {key[0]}:{key[1]}:{key[2]} has no RESULT "
                                 "event on Kafka", [a]))
        elif len(found) > 1:
            out.append(Violation("duplicate_event", f"attempt {key[0]}:{key[1]}:{key[2]} has {len(found)} RESULT "
                                 "events", [a, *found.values()]))
    for j in jobs:
        if j["state"] in FINAL_JOB_STATES and j["state"] not in job_states.get(int(j["id"]), set()):
            out.append(Violation("missing_event", f"job {j['id']} ended {j['state']} but no JOB event says so", [j]))
    return out


def check_campaigns(jobs: Iterable[dict[str, Any]]) -> list[Violation]:
    return [Violation("campaign_not_ended", f"job {j['id']} ({j.get('name')}) is {j['state']!r}, not ended", [j])
            for j in jobs if j["state"] not in FINAL_JOB_STATES]


def table9_allowed(before: str, column: str | None) -> set[str] | None:
    """The states Table 9 allows after a takeover for ``before`` (in ``column`` when known); None when the
    state is not one the agent model knows."""
    from pom_ha.domain.agents import TABLE_9, ByDialResult, ByRole, CallState, Column

    try:
        state = CallState(before)
    except ValueError:
        return None
    row = TABLE_9.get(state)
    if row is None:
        return {before}
    cols = [c for c in Column if column in (c.name, c.value)] or list(Column)
    allowed: set[str] = set()
    for c in cols:
        cell = row[c]
        if isinstance(cell, ByRole):
            allowed |= {cell.owner.value, cell.passive.value}
        elif isinstance(cell, ByDialResult):
            allowed |= {cell.answered.value, cell.unanswered.value}
        else:
            allowed.add(cell.value)
    return allowed


def check_agents(failover_rows: Iterable[dict[str, Any]], agents: Iterable[dict[str, Any]]) -> list[Violation]:
    from pom_ha.domain.agents import CallState

    out: list[Violation] = []
    for r in failover_rows:
        allowed = table9_allowed(str(r["before_state"]), r.get("table_column"))
        if allowed is None:
            out.append(Violation("agent_state", f"agent {r['agent_id']} was in unknown state {r['before_state']!r}"
                                 " at a takeover", [r]))
        elif r.get("force_logout") and r["after_state"] == "Idle":
            pass  # the desktop check disagreed with the stored state: the agent was logged out (DESKTOP_ERROR)
        elif r["after_state"] not in allowed:
            out.append(Violation(
                "agent_state", f"takeover of zone {r['zone']} (epoch {r['epoch']}) put agent {r['agent_id']} from "
                f"{r['before_state']} into {r['after_state']}; Table 9 allows {sorted(allowed)}", [r]))
    known = {s.value for s in CallState}
    for a in agents:
        if a["call_state"] not in known:
            out.append(Violation("agent_state", f"agent {a['agent_id']} of zone {a['zone']} ended in unknown state "
                                 f"{a['call_state']!r}", [a]))
    return out


def by_kind(violations: Iterable[Violation]) -> dict[str, int]:
    counts = dict.fromkeys(VIOLATION_KINDS, 0)
    for v in violations:
        counts[v.kind] = counts.get(v.kind, 0) + 1
    return counts


# ---- collecting (I/O) ---------------------------------------------------------------------------------------
def read_call_logs(folder: Path, jobs: set[str] | None = None) -> list[dict[str, Any]]:
    """Every call the media simulators logged (optionally of ``jobs`` only), each with ``log`` = file:line. A
    line cut by a kill mid-write (the last line of a file) is skipped; any other bad line is an error."""
    out: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.jsonl")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines):
                    continue
                raise ValueError(f"{path}:{i}: not a call-log line") from None
            if jobs is None or str(entry.get("job")) in jobs:
                out.append({**entry, "log": f"{path.name}:{i}"})
    return out


SQL_WRITES = {
    "attempts": ("SELECT 'job:' || job_id AS role, assignment_epoch AS epoch, created_at AS at, job_id, contact_id,"
                 " attempt_no, cm_server FROM attempts WHERE created_at BETWEEN $1 AND $2"),
    "agent_failover_log": ("SELECT 'agent_manager/' || zone AS role, epoch, at, zone, agent_id"
                           " FROM agent_failover_log WHERE at BETWEEN $1 AND $2"),
    "cd_job_trends": ("SELECT 'campaign_director/' AS role, epoch, at, job_id FROM cd_job_trends"
                      " WHERE at BETWEEN $1 AND $2"),
    "cd_alarms": ("SELECT 'campaign_director/' AS role, epoch, raised_at AS at, kind, job_id FROM cd_alarms"
                  " WHERE raised_at BETWEEN $1 AND $2"),
    "ha_probe_write": ("SELECT service || '/' || scope AS role, epoch, written_at AS at, server FROM ha_probe_write"
                       " WHERE written_at BETWEEN $1 AND $2"),
}


async def collect(conn: Any, topo: Any, *, jobs: list[int], since: datetime, until: datetime,
                  kafka: bool = True) -> Evidence:
    """Read every witness of the run ``[since, until]`` of ``jobs``."""
    from datetime import UTC

    ev = Evidence()
    for source, sql in SQL_WRITES.items():
        for r in await conn.fetch(sql, since, until):
            d = dict(r)
            ev.writes.append(Write(source, d.pop("role"), int(d.pop("epoch")), d.pop("at"), d))
    job_keys = {str(j) for j in jobs}
    folder = topo.lab_dir() / "calls"
    if jobs and not any(folder.glob("*.jsonl")):
        raise RuntimeError(f"no media call log in {folder}: the media simulators were started without --call-log "
                           "(restart them with the lab's start command), so no dial can be witnessed")
    calls = read_call_logs(folder, job_keys)
    ev.calls = calls
    for c in calls:
        at = datetime.fromtimestamp(float(c["at"]), UTC)
        if since <= at <= until:
            ev.writes.append(Write("media-call-log", f"job:{c['job']}", int(c["epoch"]), at,
                                   {"log": c["log"], "contact": c["contact"], "attempt_no": c["attempt_no"]}))
    for r in await conn.fetch("SELECT service || '/' || scope AS role, id, at, server, kind, epoch, decision"
                              " FROM ha_event WHERE at BETWEEN $1 AND $2 AND epoch IS NOT NULL ORDER BY id",
                              since, until):
        ev.epochs.setdefault(r["role"], []).append(dict(r))
    ev.jobs = [dict(r) for r in await conn.fetch(
        "SELECT j.id, c.name, j.state, j.zone FROM jobs j JOIN campaigns c ON c.id = j.campaign_id"
        " WHERE j.id = ANY($1::bigint[]) ORDER BY j.id", jobs)]
    ev.open_contacts = [dict(r) for r in await conn.fetch(
        "SELECT jc.job_id, jc.contact_id, jc.state, jc.attempts, j.state AS job_state FROM job_contacts jc"
        " JOIN jobs j ON j.id = jc.job_id WHERE jc.job_id = ANY($1::bigint[])"
        " AND (jc.state = 'dialing' OR (jc.state = 'pending' AND j.state IN ('Completed', 'Stopped')"
        "      AND j.ending = 'Completed'))", jobs)]
    ev.open_attempts = [dict(r) for r in await conn.fetch(
        "SELECT job_id, contact_id, attempt_no, cm_server, created_at FROM attempts"
        " WHERE job_id = ANY($1::bigint[]) AND state = 'dialing'", jobs)]
    ev.completed = [dict(r) for r in await conn.fetch(
        "SELECT job_id, contact_id, attempt_no, code, completed_at FROM attempts"
        " WHERE job_id = ANY($1::bigint[]) AND state = 'completed'", jobs)]
    zones = sorted({j["zone"] for j in ev.jobs})
    ev.failover_rows = [dict(r) for r in await conn.fetch(
        "SELECT id, zone, agent_id, epoch, before_state, after_state, table_column, call_effect, nailed,"
        " desktop_state, completion_code, force_logout, at"
        " FROM agent_failover_log WHERE at BETWEEN $1 AND $2 ORDER BY id", since, until)]
    ev.agents = [dict(r) for r in await conn.fetch(
        "SELECT zone, agent_id, logged_in, call_state, job_state, job_id FROM agents WHERE zone = ANY($1::text[])",
        zones)]
    if kafka and topo.servers_running("kafka"):
        orgs = sorted({z.org for z in topo.zones}) or ["Default"]
        ev.events = read_events(topo, orgs, job_keys)
    return ev


def read_events(topo: Any, orgs: list[str], jobs: set[str], timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Every record of the six topics of ``orgs`` (of ``jobs`` when they name a job), read by a consumer of
    its own group from the beginning to each partition's high watermark at the start of the read."""
    import time
    import uuid

    from confluent_kafka import Consumer, KafkaException, TopicPartition

    from pom_ha.config.addresses import bootstrap_servers
    from pom_ha.events import event_topics
    from pom_ha.kafka.tls import security_config

    consumer = Consumer({**security_config(topo), "bootstrap.servers": bootstrap_servers(topo),
                         "group.id": f"pomha-chaos-check-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
                         "auto.offset.reset": "earliest", "log_level": 0})
    out: list[dict[str, Any]] = []
    try:
        md = consumer.list_topics(timeout=15)
        parts: list[TopicPartition] = []
        ends: dict[tuple[str, int], int] = {}
        for org in orgs:
            for topic in event_topics(org):
                if topic not in md.topics:
                    continue
                for p in md.topics[topic].partitions:
                    lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)
                    if hi > lo:
                        parts.append(TopicPartition(topic, p, lo))
                        ends[(topic, p)] = hi
        if not parts:
            return out
        consumer.assign(parts)
        deadline = time.monotonic() + timeout_s
        while ends and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=5000, timeout=1.0):
                if msg.error():
                    continue
                off = msg.offset()
                try:
                    obj = json.loads(msg.value() or b"null")
                except json.JSONDecodeError:
                    continue
                if not isinstance(obj, dict):
                    continue
                job = obj.get("job_id")
                if job is not None and str(job) not in jobs:
                    continue
                obj["where"] = f"{msg.topic()}[{msg.partition()}]@{off}"
                out.append(obj)
            # the position, not the last record, tells the end: transaction markers take offsets too
            for tp in consumer.position([TopicPartition(t, p) for t, p in ends]):
                if tp.offset >= ends[(tp.topic, tp.partition)]:
                    ends.pop((tp.topic, tp.partition), None)
        if ends:
            raise RuntimeError(f"Kafka: could not read to the end of {sorted(ends)} within {timeout_s:.0f} s")
    except KafkaException as exc:
        raise RuntimeError(f"Kafka unreadable: {exc}") from None
    finally:
        consumer.close()
    return out
