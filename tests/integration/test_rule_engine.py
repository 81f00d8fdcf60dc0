"""Rule Engine on real PostgreSQL with three real rule-engine processes (pom1..pom3) and the CM's client.

Conditions are polled with deadlines, never slept for; timing figures are measured by the benchmarks, so
the bounds here are loose ("within a few seconds").
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from pom_ha.clients.rule_engine import RuleEngineClient, RuleEngineUnavailable, Verdict
from pom_ha.domain.attempts import ContactHistory
from pom_ha.infra.process import ProcessRecord, kill_process, stop_process
from pom_ha.infra.stack import Stack
from pom_ha.lab.daemons import start_daemon

pytestmark = pytest.mark.integration
SERVERS = ["pom1", "pom2", "pom3"]
PARIS = {"id": "c-paris", "phone": "+33123456789", "timezone": "Europe/Paris"}


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_dsn)
    yield conn
    await conn.close()


@pytest.fixture
async def engines(stack: Stack, topology_file: Path) -> AsyncIterator[dict[str, ProcessRecord]]:
    recs: dict[str, ProcessRecord] = {}
    try:
        for server in SERVERS:
            recs[server] = start_daemon(stack.topo, topology_file, server, "rule-engine")
        yield recs
    finally:
        run_dir = stack.topo.lab_dir() / "run"
        await asyncio.gather(*(asyncio.to_thread(stop_process, rec, run_dir) for rec in recs.values()))


@pytest.fixture
async def client(stack: Stack, pg_dsn: str, engines: dict[str, ProcessRecord]) -> AsyncIterator[RuleEngineClient]:
    async with RuleEngineClient(pg_dsn, stack.topo, timeout_s=1.0) as c:
        assert await c.wait_connected(20), "the client never reached a Rule Engine master"
        yield c


async def master(db: asyncpg.Connection, newer_than: int = 0, timeout_s: float = 20.0) -> tuple[str, int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = await db.fetchrow(
            "SELECT holder_server, epoch FROM ha_lease WHERE service = 'rule_engine' AND scope = ''"
            " AND holder_server IS NOT NULL AND expires_at > now() AND epoch > $1", newer_than)
        if row is not None:
            return str(row["holder_server"]), int(row["epoch"])
        await asyncio.sleep(0.02)
    raise AssertionError(f"no rule_engine master with an epoch above {newer_than} within {timeout_s} s")


async def refuses(host: str, port: int) -> bool:
    try:
        _reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return True
    writer.close()
    return False


async def test_exactly_one_master_answers(
    stack: Stack, db: asyncpg.Connection, client: RuleEngineClient
) -> None:
    server, epoch = await master(db)
    assert await client.ping() == epoch and client.master is not None and client.master.server == server
    port = stack.topo.ports.rule_engine
    for s in SERVERS:
        assert await refuses(stack.topo.server(s).address, port) == (s != server), s
    deadline = time.monotonic() + 10
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        rows = await db.fetch("SELECT server, state FROM ha_member WHERE service = 'rule_engine'")
        states = {r["server"]: r["state"] for r in rows if r["server"] in SERVERS}
        if sorted(states.values()) == ["DORMANT", "DORMANT", "MASTER"]:
            break
        await asyncio.sleep(0.05)
    assert states.get(server) == "MASTER" and sorted(states.values()) == ["DORMANT", "DORMANT", "MASTER"], states


async def test_dnc_calling_window_and_bad_zone(db: asyncpg.Connection, client: RuleEngineClient) -> None:
    phone = "+1415" + str(uuid.uuid4().int)[:7]
    contact = {"id": "c-dnc", "phone": phone, "timezone": "America/New_York"}
    noon_ny = datetime(2024, 1, 10, 17, 0, tzinfo=UTC)
    assert (await client.evaluate(contact, now=noon_ny)).allowed
    await db.execute("INSERT INTO dnc_list (phone) VALUES ($1)", phone)
    try:
        deadline = time.monotonic() + 10
        verdict = await client.evaluate(contact, now=noon_ny)
        while verdict.code != "DNC_BLOCKED" and time.monotonic() < deadline:  # reloaded on NOTIFY rule_config
            await asyncio.sleep(0.02)
            verdict = await client.evaluate(contact, now=noon_ny)
        assert (verdict.allowed, verdict.code, verdict.retry_at) == (False, "DNC_BLOCKED", None)
    finally:
        await db.execute("DELETE FROM dnc_list WHERE phone = $1", phone)

    # 03:00 in New York (EST, UTC-5): retry at 08:00 local, 13:00 UTC
    night = await client.evaluate(contact | {"phone": "+14155550123"}, now=datetime(2024, 1, 10, 8, 0, tzinfo=UTC))
    assert (night.allowed, night.code) == (False, "OUTSIDE_CALLING_WINDOW")
    assert night.retry_at == datetime(2024, 1, 10, 13, 0, tzinfo=UTC)
    # the same on the Rule Engine's own clock, in a fixed-offset zone where it is 03:xx now
    offset = (3 - datetime.now(UTC).hour) % 24
    offset = offset - 24 if offset > 14 else offset
    zone = f"Etc/GMT{-offset:+d}"  # POSIX sign: Etc/GMT-3 is UTC+3
    verdict = await client.evaluate({"id": "c-3am", "phone": "+14155550124", "timezone": zone})
    assert (verdict.allowed, verdict.code) == (False, "OUTSIDE_CALLING_WINDOW")
    assert verdict.retry_at is not None
    local = verdict.retry_at.astimezone(ZoneInfo(zone))
    assert (local.hour, local.minute) == (8, 0)
    assert verdict.retry_at - datetime.now(UTC) < timedelta(hours=5, minutes=1)

    history = ContactHistory(1, datetime(2024, 1, 10, 16, 59, 30, tzinfo=UTC))
    gap = await client.evaluate(PARIS, history, now=datetime(2024, 1, 10, 17, 0, tzinfo=UTC))
    assert not gap.allowed and gap.retry_at == datetime(2024, 1, 10, 17, 0, 30, tzinfo=UTC)  # 60 s minimum gap
    maxed = await client.evaluate(PARIS, ContactHistory(3, None), now=datetime(2024, 1, 10, 12, 0, tzinfo=UTC))
    assert maxed.code == "MAX_ATTEMPTS_REACHED"
    bad = await client.evaluate({"id": "c-bad", "phone": "+14155550125", "timezone": "Atlantis/Capital"})
    assert (bad.allowed, bad.code, bad.retry_at) == (False, None, None) and "unknown time zone" in bad.reason


async def test_sigkill_of_the_master_pauses_then_resumes_by_push(
    db: asyncpg.Connection, engines: dict[str, ProcessRecord], client: RuleEngineClient
) -> None:
    old_server, old_epoch = await master(db)
    results: list[tuple[float, float, Verdict | None]] = []  # (started, took, verdict or None if unavailable)
    warmed, resumed = asyncio.Event(), asyncio.Event()

    async def evaluate_forever() -> None:
        while True:
            t0 = time.monotonic()
            try:
                verdict: Verdict | None = await client.evaluate(PARIS, now=datetime(2024, 1, 10, 12, 0, tzinfo=UTC))
            except RuleEngineUnavailable:
                verdict = None
            results.append((t0, time.monotonic() - t0, verdict))
            if len(results) >= 20:
                warmed.set()
            if verdict is not None and verdict.epoch > old_epoch:
                resumed.set()

    loop = asyncio.create_task(evaluate_forever())
    try:
        await asyncio.wait_for(warmed.wait(), 10)
        assert {v.epoch for _t, _d, v in results if v} == {old_epoch}
        killed_at = time.monotonic()
        await asyncio.to_thread(kill_process, engines[old_server])
        dead_at = time.monotonic()  # replies the old master sent while the kill was being delivered are fine
        await asyncio.wait_for(resumed.wait(), 20)
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)

    new_server, new_epoch = await master(db, newer_than=old_epoch, timeout_s=1)
    assert new_server != old_server
    after = [(t, d, v) for t, d, v in results if t + d > killed_at]
    resumed_at = next(t + d for t, d, v in after if v is not None and v.epoch > old_epoch)
    assert all(v is None or v.epoch == new_epoch for t, _d, v in after if t > dead_at), "a reply of the dead master"
    paused = [d for _t, d, v in after if v is None or v.epoch != old_epoch]
    assert any(v is None for _t, _d, v in after) or max(paused) > 0.1, "evaluations did not pause"
    assert resumed_at - killed_at < 10, "dialing did not resume within a few seconds"
    assert client.reconnects == 1 and client.reconnect_causes["lease-notify"] == 1, client.reconnect_causes
    assert client.master is not None and client.master.server == new_server and client.stale_replies == 0
    assert client.last_outage_s is not None and client.last_outage_s < 10


async def test_graceful_stop_of_the_master_hands_over(
    stack: Stack, db: asyncpg.Connection, engines: dict[str, ProcessRecord], client: RuleEngineClient
) -> None:
    old_server, old_epoch = await master(db)
    await asyncio.to_thread(stop_process, engines.pop(old_server), stack.topo.lab_dir() / "run")
    verdict = await client.evaluate(PARIS, timeout_s=10)
    assert verdict.epoch > old_epoch and client.master is not None and client.master.server != old_server
    assert client.reconnects == 1
