"""What the deployment can survive: which faults may be active together, and the random draw of the next one.

Limits, counted over every active fault's :meth:`~pom_ha.chaos.faults.Fault.down`:

* ZooKeeper and Kafka: never a majority down (``(n - 1) // 2`` nodes at most; one of three);
* Ignite and ActiveMQ: one node stays (``n - 1``);
* every daemon kind: one instance stays (``n - 1``: never both Agent Managers of a zone, never every
  Campaign Director ...);
* PostgreSQL restarts alone, and a server carries at most one fault at a time (so heals never interleave).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from pom_ha.chaos.faults import (
    DAEMON_OF,
    FAULT_KINDS,
    INFRA_KINDS,
    DaemonKill,
    Fault,
    FaultImpossible,
    InfraKill,
    LabControl,
    MasterPause,
    Partition,
    PostgresRestart,
    ServerKill,
)

#: relative weight of each kind in the draw
WEIGHTS = {"daemon-kill": 4.0, "master-pause": 2.0, "partition": 2.0, "infra-kill": 2.0, "server-kill": 1.0,
           "postgres-restart": 0.5}


def limits(lab: LabControl) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in INFRA_KINDS:
        n = len(lab.infra_on(k))
        out[k] = (n - 1) // 2 if k in ("zookeeper", "kafka") else max(n - 1, 0)
    counts: dict[str, int] = {}
    for s in lab.servers:
        for d in lab.daemons_on(s):
            counts[d] = counts.get(d, 0) + 1
    for d, n in counts.items():
        out[f"daemon:{d}"] = n - 1
    out["postgres"] = 1
    return out


def servers_of(fault: Fault) -> set[str]:
    server = getattr(fault, "server", None)
    return {server} if server else set()


def fits(lab: LabControl, active: Iterable[Fault], candidate: Fault, lim: dict[str, int] | None = None) -> bool:
    """True when ``candidate`` may be injected while ``active`` are."""
    active = list(active)
    lim = lim if lim is not None else limits(lab)
    if isinstance(candidate, PostgresRestart) and active:
        return False
    if any(isinstance(f, PostgresRestart) for f in active):
        return False
    busy = set().union(*(servers_of(f) for f in active)) if active else set()
    if servers_of(candidate) & busy:
        return False
    down: dict[str, set[str]] = {}
    for f in [*active, candidate]:
        for res, servers in f.down(lab).items():
            down.setdefault(res, set()).update(servers)
    return all(len(servers) <= lim.get(res, 0) for res, servers in down.items())


def candidates(lab: LabControl, kind: str, masters: Sequence[tuple[str, str]] = ()) -> list[Fault]:
    """Every fault of ``kind`` this lab could have; ``masters`` are (service, server) of current lease holders
    (the targets of ``master-pause``)."""
    out: list[Fault] = []
    if kind == "daemon-kill":
        out = [DaemonKill(daemon=d, server=s) for s in lab.servers for d in lab.daemons_on(s)]
    elif kind == "master-pause":
        out = [MasterPause(daemon=DAEMON_OF[svc], server=s) for svc, s in masters
               if svc in DAEMON_OF and DAEMON_OF[svc] in lab.daemons_on(s)]
    elif kind == "server-kill":
        out = [ServerKill(server=s) for s in lab.servers]
    elif kind == "partition":
        out = [Partition(server=s, scope=scope) for s in lab.servers for scope in ("postgres", "peers", "both")]
    elif kind == "infra-kill":
        out = [InfraKill(infra=k, server=s) for k in INFRA_KINDS for s in lab.infra_on(k)]
    elif kind == "postgres-restart":
        out = [PostgresRestart()]
    else:
        raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
    return out


def refuse_impossible(lab: LabControl, kinds: Sequence[str]) -> list[str]:
    """Reasons the lab cannot run a campaign of ``kinds`` (empty: it can)."""
    reasons: list[str] = []
    if len(lab.servers) < 2:
        reasons.append(f"the topology has one POM server ({lab.servers[0]}): no second master to take over, "
                       "every fault would stop the service")
        return reasons
    lim = limits(lab)
    for kind in kinds:
        cands = candidates(lab, kind, masters=[(svc, s) for s in lab.servers for svc in DAEMON_OF])
        possible = []
        for c in cands:
            try:
                c.check(lab)
            except FaultImpossible:
                continue
            if fits(lab, [], c, lim):
                possible.append(c)
        if not possible:
            why = {"infra-kill": "no ZooKeeper/Kafka node whose loss leaves a majority, and no second Ignite "
                                 "or ActiveMQ node",
                   "server-kill": "losing any one server takes a majority or the last instance of something",
                   "partition": "cutting any one server takes a majority or the last instance of something"}
            reasons.append(f"{kind}: impossible on this topology ({why.get(kind, 'no second instance to take over')})")
    return reasons


def draw(rng: random.Random, lab: LabControl, kinds: Sequence[str], active: Sequence[Fault],
         masters: Sequence[tuple[str, str]]) -> Fault | None:
    """A random fault of ``kinds`` that fits beside ``active``; None when none fits now."""
    lim = limits(lab)
    left = list(kinds)
    while left:
        kind = rng.choices(left, [WEIGHTS.get(k, 1.0) for k in left])[0]
        left.remove(kind)
        cands = [c for c in candidates(lab, kind, masters) if fits(lab, active, c, lim)]
        rng.shuffle(cands)
        for c in cands:
            try:
                c.check(lab)
            except FaultImpossible:
                continue
            return c
    return None
