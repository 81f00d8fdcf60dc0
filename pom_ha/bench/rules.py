"""Rule-check throughput with a large DNC list: the Rule Engine's own code on one core.

A private PostgreSQL (isolated topology, ``POM_BENCH_BLOCK``, default 14) gets ``dnc`` numbers in a global
DNC list (COPY), a campaign DNC list, a contact strategy with weekly windows and a region override, and
campaigns with active jobs. The Rule Engine's rule source loads them (timed: ``load_s``); then one loop on
one core judges ``checks`` EVALUATE requests (parsed from frames, as the server does) against the job's
campaign rules: a mix of DNC hits, window refusals and allowed contacts in several zones.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from pom_ha.bench.campaigns import BLOCK, bench_lab
from pom_ha.config import Topology

ZONES = ["America/New_York", "America/Chicago", "America/Los_Angeles", "Europe/Paris", "Asia/Tokyo"]


def bench_block() -> int:
    return int(os.environ.get("POM_BENCH_BLOCK", BLOCK))


async def run_rules(base: Topology, *, dnc: int = 1_000_000, checks: int = 200_000,
                    echo: Callable[[str], None] = print) -> dict[str, Any]:
    from pom_ha.campaign import admin
    from pom_ha.campaign import service as svc
    from pom_ha.clients.rule_engine import evaluate_body
    from pom_ha.domain.attempts import ContactHistory
    from services.rule_engine.protocol import EvaluateRequest, judge, parse_request
    from services.rule_engine.rules_source import RuleConfigSource

    async with bench_lab(base, block=bench_block()) as bench:
        conn = bench.conn
        await svc.create_list(conn, svc.ListCreate(name="bench-rules"))
        await svc.create_dnc(conn, svc.DncCreate(name="national", is_global=True))
        await svc.create_dnc(conn, svc.DncCreate(name="optout"))
        gid = await conn.fetchval("SELECT id FROM dnc_lists WHERE name = 'national'")
        started = time.perf_counter()
        await conn.copy_records_to_table("dnc_numbers", columns=["list_id", "phone"],
                                         records=((gid, f"+1212{2_000_000 + i:07d}") for i in range(dnc)))
        echo(f"  {dnc} DNC numbers stored in {time.perf_counter() - started:.1f} s")
        await svc.add_dnc_numbers(conn, "optout", svc.DncNumbers(numbers=[f"+1312{2_000_000 + i:07d}"
                                                                          for i in range(1000)]))
        await svc.create_strategy(conn, svc.StrategyCreate(name="weekdays", spec={
            "windows": {d: [{"start": "09:00", "end": "12:00"}, {"start": "13:00", "end": "20:00"}]
                        for d in ("mon", "tue", "wed", "thu", "fri")},
            "region_overrides": {"FR": {"sat": [{"start": "10:00", "end": "12:00"}]}}, "min_gap_s": 300}))
        jobs = []
        for n in range(5):
            made = await svc.create_campaign(conn, svc.CampaignCreate(definition={
                "name": f"bench-{n}", "contact_list": "bench-rules", "pacing": {"calls_per_second": 10}},
                strategy="weekdays" if n % 2 == 0 else None, dnc_lists=["optout"]))
            jobs.append(await admin.create_job(conn, made.id))
        source = RuleConfigSource(bench.topo.postgres.dsn(), load_timeout_s=300)
        raw: Any = await asyncpg.connect(bench.topo.postgres.dsn())
        try:
            started = time.perf_counter()
            await source._reload(raw)
            load_s = time.perf_counter() - started
        finally:
            await raw.close()
        assert source.book is not None
        echo(f"  rules loaded in {load_s:.1f} s (version {source.book.version}, problems {source.book.problems})")

    rng = random.Random(19)
    now = datetime(2026, 12, 8, 16, 0, tzinfo=UTC)
    frames = []
    for i in range(2000):
        kind = rng.random()
        if kind < 0.2:
            phone = f"+1212{2_000_000 + rng.randrange(dnc):07d}"  # in the global DNC list
        elif kind < 0.3:
            phone = f"+1312{2_000_000 + rng.randrange(1000):07d}"  # in the campaign list
        elif kind < 0.4:
            phone = f"+3361234{rng.randrange(10_000):04d}"  # France: region override
        else:
            phone = f"+1415{3_000_000 + rng.randrange(1_000_000):07d}"
        history = ContactHistory(rng.randrange(3), now - timedelta(seconds=rng.randrange(3600)))
        body = evaluate_body({"id": f"c{i}", "phone": phone, "timezone": rng.choice(ZONES)}, history,
                             now + timedelta(minutes=rng.randrange(0, 7 * 24 * 60)), str(rng.choice(jobs)))
        frames.append({**body, "req": i})
    verdicts: dict[str, int] = {}
    started = time.process_time()
    wall = time.perf_counter()
    for i in range(checks):
        request = parse_request(frames[i % len(frames)])
        assert isinstance(request, EvaluateRequest)
        verdict = judge(source.rules_for(request.job), request, now)
        key = "ALLOWED" if verdict.allowed else (verdict.code.name if verdict.code else "WAIT")
        verdicts[key] = verdicts.get(key, 0) + 1
    cpu = time.process_time() - started
    wall_s = time.perf_counter() - wall
    return {"checks_per_second": round(checks / cpu), "checks": checks, "cpu_seconds": round(cpu, 2),
            "wall_seconds": round(wall_s, 2), "dnc_numbers": dnc, "load_seconds": round(load_s, 2),
            "verdicts": verdicts}
