"""Zone leases spread over daemons: a daemon that already holds zones leaves free ones to idle peers."""

from __future__ import annotations

from pom_ha.ha.election import ClaimSpread, Elector
from pom_ha.ha.fake_store import FakeClock, FakeStatusStore
from pom_ha.ha.roles import ZoneRole
from pom_ha.ha.settings import HATimings
from pom_ha.ha.store import Holder

TIMINGS = HATimings()
ZONES = ["Z1", "Z2", "Z3"]


def daemon(store: FakeStatusStore, clock: FakeClock, n: int) -> list[Elector]:
    spread = ClaimSpread(TIMINGS.claim_spread_ms / 1000)
    holder = Holder(f"pom{n}", f"inst-{n}", f"127.0.1.{n}:7000")
    return [
        Elector(store, ZoneRole("zone_director", z), holder, TIMINGS, clock=clock, call_later=clock.call_later,
                spread=spread)
        for z in ZONES
    ]


async def test_three_daemons_starting_together_take_one_zone_each() -> None:
    clock = FakeClock()
    store = FakeStatusStore(TIMINGS.lease_ttl_ms, clock)
    daemons = [daemon(store, clock, n) for n in (1, 2, 3)]
    for _ in range(3):
        for electors in daemons:
            for e in electors:
                await e.run_cycle()
        clock.advance(0.1)
    held = [sorted(e.scope for e in electors if e.is_master) for electors in daemons]
    assert sorted(len(h) for h in held) == [1, 1, 1], held
    assert sorted(z for h in held for z in h) == ZONES


async def test_a_lone_daemon_still_takes_every_zone_after_the_spread_delay() -> None:
    clock = FakeClock()
    store = FakeStatusStore(TIMINGS.lease_ttl_ms, clock)
    electors = daemon(store, clock, 1)
    for e in electors:
        await e.run_cycle()
    assert sum(e.is_master for e in electors) == 1
    assert any("less busy" in e.decision for e in electors)
    for _ in range(30):
        clock.advance(TIMINGS.renew_interval_s)
        for e in electors:
            await e.run_cycle()
        if all(e.is_master for e in electors):
            break
    assert all(e.is_master for e in electors), [e.decision for e in electors]
    assert clock() - 1_000.0 <= 2 * TIMINGS.claim_spread_ms / 1000 + 1
