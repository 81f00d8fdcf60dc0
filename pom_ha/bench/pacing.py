"""Predictive pacing benchmark: agent occupancy and abandon rate at N simulated agents.

This drives the real pacer (``pom_ha.domain.pacing``, the object the Campaign Manager's dial loop uses)
through a **seeded discrete-event call model**, not through processes: dials ring and end as the media
simulator's outcome table says, live answers take a free agent (talk, then wrap-up) or are abandoned
(NUISANCE) when none is free. The pacer is asked every ``tick_s`` of simulated time, like the CM's dial
loop, with the free agents, busy agents and dials in flight, and is told every outcome. A simulated
working day of 500 agents runs in seconds of wall time.

Measured: occupancy (the share of logged-in agent time spent talking or wrapping up), the abandon rate
(NUISANCE / live answers, over the day), dials, live answers; the same model with progressive pacing
for comparison.
"""

from __future__ import annotations

import heapq
import random
import time
from dataclasses import asdict, dataclass

from pom_ha.domain.pacing import (
    DEFAULT_ABANDON_CAP,
    DEFAULT_MAX_RATIO,
    AgentView,
    PacingKind,
    PredictivePacer,
    ProgressivePacer,
)
from pom_ha.domain.stats import JobStats

# (code, weight, ring seconds low, high, live): the media simulator's default table, with ring times
# (how long until the line is answered or the dial ends) instead of whole-call durations
OUTCOMES: tuple[tuple[str, float, float, float, bool], ...] = (
    ("ANSWER_HUMAN", 0.35, 4.0, 15.0, True),
    ("ANSWER_MACHINE", 0.15, 8.0, 20.0, False),
    ("BUSY", 0.10, 1.0, 4.0, False),
    ("NO_ANSWER", 0.30, 20.0, 30.0, False),
    ("NETWORK_FAILURE", 0.05, 0.2, 3.0, False),
    ("INVALID_NUMBER", 0.05, 0.5, 2.0, False),
)
MODEL = "seeded discrete-event call model driving the real PredictivePacer (no processes)"


@dataclass(frozen=True)
class PacingModel:
    agents: int = 50
    seconds: float = 8 * 3600.0  # simulated
    seed: int = 1
    talk_s: tuple[float, float] = (60.0, 180.0)
    wrap_s: tuple[float, float] = (10.0, 30.0)
    tick_s: float = 0.5
    abandon_cap: float = DEFAULT_ABANDON_CAP
    max_ratio: float = DEFAULT_MAX_RATIO


@dataclass(frozen=True)
class PacingResult:
    kind: str
    dials: int
    live_answers: int
    abandons: int
    abandon_rate: float
    occupancy: float
    max_abandon_rate_after_100_answers: float


def simulate(model: PacingModel, kind: PacingKind = PacingKind.PREDICTIVE) -> PacingResult:
    rng = random.Random(model.seed)
    pacer: PredictivePacer | ProgressivePacer
    if kind is PacingKind.PREDICTIVE:
        pacer = PredictivePacer(abandon_cap=model.abandon_cap, max_ratio=model.max_ratio)
    elif kind is PacingKind.PROGRESSIVE:
        pacer = ProgressivePacer()
    else:
        raise ValueError(f"the pacing model runs predictive or progressive pacing, not {kind.value}")
    weights = [o[1] for o in OUTCOMES]
    events: list[tuple[float, int, str]] = []  # (time, seq, kind): "end" of a dial, "free" of an agent
    seq = 0
    free = model.agents
    in_flight = dials = live = abandons = 0
    busy_time = 0.0
    worst = 0.0
    stats = JobStats()
    now = 0.0
    pending_outcomes: dict[int, tuple[bool, float]] = {}
    while now < model.seconds:
        while events and events[0][0] <= now:
            at, n, what = heapq.heappop(events)
            if what == "free":
                free += 1
                continue
            in_flight -= 1
            is_live, ring = pending_outcomes.pop(n)
            if not is_live:
                if isinstance(pacer, PredictivePacer):
                    pacer.record(live=False)
                continue
            live += 1
            if free > 0:
                free -= 1
                handle = rng.uniform(*model.talk_s) + rng.uniform(*model.wrap_s)
                busy_time += min(handle, model.seconds - at)
                seq += 1
                heapq.heappush(events, (at + handle, seq, "free"))
                if isinstance(pacer, PredictivePacer):
                    pacer.record(live=True, ring_s=ring)
                    pacer.record_handle_time(handle)
            else:
                abandons += 1
                if isinstance(pacer, PredictivePacer):
                    pacer.record(live=True, abandoned=True, ring_s=ring)
            if live >= 100:
                worst = max(worst, abandons / live)
        busy = model.agents - free
        grant = pacer.permits(now, in_flight, stats, AgentView(free=free, busy=busy))
        for _ in range(grant):
            code = rng.choices(OUTCOMES, weights)[0]
            ring = rng.uniform(code[2], code[3])
            seq += 1
            pending_outcomes[seq] = (code[4], ring)
            heapq.heappush(events, (now + ring, seq, "end"))
            in_flight += 1
            dials += 1
        now += model.tick_s
    return PacingResult(kind.value, dials, live, abandons, abandons / live if live else 0.0,
                        busy_time / (model.agents * model.seconds), worst)


def run_bench(agents: int, seconds: float, seed: int = 1,
              abandon_cap: float = DEFAULT_ABANDON_CAP) -> dict[str, object]:
    model = PacingModel(agents=agents, seconds=seconds, seed=seed, abandon_cap=abandon_cap)
    t0 = time.monotonic()
    pred = simulate(model, PacingKind.PREDICTIVE)
    prog = simulate(model, PacingKind.PROGRESSIVE)
    return {
        "bench": "pacing", "model": MODEL, "pacing": "predictive", "agents": agents,
        "simulated_seconds": seconds, "seed": seed,
        "occupancy": round(pred.occupancy, 4), "abandon_rate": round(pred.abandon_rate, 5),
        "abandon_cap": abandon_cap, "within_cap": pred.abandon_rate <= abandon_cap,
        "calls": pred.dials, "answers": pred.live_answers, "abandons": pred.abandons,
        "max_abandon_rate_after_100_answers": round(pred.max_abandon_rate_after_100_answers, 5),
        "progressive": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(prog).items()},
        "talk_s": list(model.talk_s), "wrap_s": list(model.wrap_s),
        "outcomes": {o[0]: {"weight": o[1], "ring_s": [o[2], o[3]]} for o in OUTCOMES},
        "wall_s": round(time.monotonic() - t0, 2),
    }
