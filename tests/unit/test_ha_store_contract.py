"""The status-store contract (pom_ha.ha.store), run against the fake store and real PostgreSQL alike."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest

from pom_ha.ha.store import HAEvent, Holder, Member, StatusStoreError
from tests.unit.conftest import StoreHarness, poll_until

A = Holder("pom1", "inst-a", "127.0.1.1:7001")
B = Holder("pom2", "inst-b", "127.0.1.2:7002")
C = Holder("pom3", "inst-c", "127.0.1.3:7003")


async def test_acquire_free_lease(harness: StoreHarness) -> None:
    svc = harness.service()
    lease = await harness.store.try_acquire(svc, "", A)
    assert lease is not None
    assert (lease.service, lease.scope, lease.epoch) == (svc, "", 1)
    assert (lease.holder_server, lease.holder_instance, lease.holder_endpoint) == (A.server, A.instance, A.endpoint)
    assert lease.renewed_at == lease.acquired_at == lease.observed_at
    assert lease.expires_at - lease.renewed_at == timedelta(milliseconds=harness.timings.lease_ttl_ms)
    assert not lease.expired and not lease.released
    read = await harness.store.read(svc, "")
    assert read is not None and read.epoch == 1 and read.held_by(A.instance)
    assert read.valid_until_mono is None
    assert await harness.store.read(svc, "other-scope") is None


async def test_held_lease_refused_to_others_and_to_the_holder(harness: StoreHarness) -> None:
    svc = harness.service()
    assert await harness.store.try_acquire(svc, "Zone1", A) is not None
    assert await harness.store.try_acquire(svc, "Zone1", B) is None
    assert await harness.store.try_acquire(svc, "Zone1", A) is None
    other_zone = await harness.store.try_acquire(svc, "Zone2", B)
    assert other_zone is not None and other_zone.epoch == 1
    assert [lease.scope for lease in await harness.store.leases(svc)] == ["Zone1", "Zone2"]


async def test_concurrent_acquires_elect_exactly_one(harness: StoreHarness) -> None:
    svc = harness.service()
    holders = [Holder(f"pom{i}", f"inst-{i}") for i in range(6)]
    won = await asyncio.gather(*(harness.store.try_acquire(svc, "", h) for h in holders))
    assert sum(1 for lease in won if lease is not None) == 1


async def test_renew_keeps_epoch_and_extends_on_store_clock(harness: StoreHarness) -> None:
    svc = harness.service()
    lease = await harness.store.try_acquire(svc, "", A)
    assert lease is not None
    await harness.elapse_ms(50)
    renewed = await harness.store.renew(lease)
    assert renewed is not None
    assert renewed.epoch == lease.epoch
    assert renewed.renewed_at is not None and lease.renewed_at is not None
    assert renewed.renewed_at > lease.renewed_at
    assert renewed.expires_at > lease.expires_at
    assert renewed.expires_at - renewed.renewed_at == timedelta(milliseconds=harness.timings.lease_ttl_ms)
    assert renewed.acquired_at == lease.acquired_at


async def test_renew_refused_for_other_instance_or_epoch(harness: StoreHarness) -> None:
    svc = harness.service()
    lease = await harness.store.try_acquire(svc, "", A)
    assert lease is not None
    from dataclasses import replace

    assert await harness.store.renew(replace(lease, holder_instance=B.instance)) is None
    assert await harness.store.renew(replace(lease, epoch=lease.epoch + 1)) is None
    assert await harness.store.renew(replace(lease, epoch=lease.epoch - 1)) is None
    assert await harness.store.renew(lease) is not None


async def test_expiry_ends_renewals_and_every_acquire_bumps_epoch(harness: StoreHarness) -> None:
    svc = harness.service()
    first = await harness.store.try_acquire(svc, "", A)
    assert first is not None
    await harness.elapse_ms(harness.timings.lease_ttl_ms + 20)
    read = await harness.store.read(svc, "")
    assert read is not None and read.expired and not read.released
    assert await harness.store.renew(first) is None, "an expired lease must not be renewable"
    again = await harness.store.try_acquire(svc, "", A)
    assert again is not None and again.epoch == first.epoch + 1, "re-acquire by the same holder bumps the epoch"
    await harness.elapse_ms(harness.timings.lease_ttl_ms + 20)
    other = await harness.store.try_acquire(svc, "", B)
    assert other is not None and other.epoch == again.epoch + 1
    assert await harness.store.renew(again) is None


async def test_release_expires_now_only_for_the_holding_epoch(harness: StoreHarness) -> None:
    svc = harness.service()
    lease = await harness.store.try_acquire(svc, "", A)
    assert lease is not None
    from dataclasses import replace

    assert await harness.store.release(replace(lease, epoch=lease.epoch + 1)) is False
    assert await harness.store.release(replace(lease, holder_instance=B.instance)) is False
    assert await harness.store.release(lease) is True
    read = await harness.store.read(svc, "")
    assert read is not None and read.expired and read.released
    assert await harness.store.release(lease) is False, "a released lease is not held any more"
    assert await harness.store.renew(lease) is None
    taken = await harness.store.try_acquire(svc, "", B)
    assert taken is not None and taken.epoch == lease.epoch + 1 and not taken.released
    assert await harness.store.release(lease) is False, "the old epoch cannot release the new holder's lease"


async def test_early_takeover_is_a_cas_on_the_observed_renewal(harness: StoreHarness) -> None:
    svc = harness.service()
    stale_ms = harness.timings.takeover_stale_ms
    lease = await harness.store.try_acquire(svc, "", A)
    assert lease is not None
    observed = await harness.store.read(svc, "")
    assert observed is not None
    assert await harness.store.try_take_over(observed, B, stale_ms) is None, "renewals have not stopped yet"

    await harness.elapse_ms(stale_ms + 30)
    renewed = await harness.store.renew(lease)
    assert renewed is not None
    assert await harness.store.try_take_over(observed, B, stale_ms) is None, "a master that renewed in between wins"

    observed = await harness.store.read(svc, "")
    assert observed is not None
    await harness.elapse_ms(stale_ms + 30)
    assert observed.epoch == lease.epoch
    taken = await harness.store.try_take_over(observed, B, stale_ms)
    assert taken is not None, "stale renewals + unchanged observation: take-over allowed before expiry"
    assert taken.epoch == lease.epoch + 1 and taken.held_by(B.instance)
    assert await harness.store.renew(renewed) is None, "the old master lost its lease"
    assert await harness.store.try_take_over(observed, C, stale_ms) is None, "the observation is outdated now"


async def test_lease_changes_are_announced(harness: StoreHarness) -> None:
    svc = harness.service()
    seen: list[tuple[str, str]] = []
    unsubscribe = harness.store.subscribe(lambda s, sc: seen.append((s, sc)) if s == svc else None)
    try:
        lease = await harness.store.try_acquire(svc, "Zone1", A)
        assert lease is not None
        await poll_until(lambda: seen == [(svc, "Zone1")])
        assert await harness.store.renew(lease) is not None
        assert await harness.store.release(lease)
        await poll_until(lambda: len(seen) == 2)
        assert seen == [(svc, "Zone1"), (svc, "Zone1")], "renewals are not announced; acquire and release are"
    finally:
        unsubscribe()


async def test_members_upsert_and_list(harness: StoreHarness) -> None:
    svc = harness.service()
    await harness.store.upsert_member(Member(svc, "pom2", "i2", "DORMANT", (), "127.0.1.2:1", 0))
    await harness.store.upsert_member(Member(svc, "pom1", "i1", "MASTER", ("Zone1", "Zone2"), "127.0.1.1:1", 3))
    first = await harness.store.members(svc)
    assert [(m.server, m.state, m.scopes, m.load) for m in first] == [
        ("pom1", "MASTER", ("Zone1", "Zone2"), 3), ("pom2", "DORMANT", (), 0),
    ]
    await harness.elapse_ms(20)
    await harness.store.upsert_member(Member(svc, "pom1", "i1", "DORMANT", (), "127.0.1.1:1", 0))
    await harness.store.upsert_member(Member(svc, "pom2", "i2-restarted", "DORMANT", (), "127.0.1.2:2", 0))
    second = {m.server: m for m in await harness.store.members(svc)}
    before = {m.server: m for m in first}
    assert second["pom1"].state == "DORMANT" and second["pom1"].scopes == ()
    assert second["pom1"].started_at == before["pom1"].started_at, "same instance keeps its start time"
    assert second["pom1"].seen_at is not None and before["pom1"].seen_at is not None
    assert second["pom1"].seen_at > before["pom1"].seen_at
    assert second["pom2"].instance_id == "i2-restarted"
    assert second["pom2"].started_at is not None and before["pom2"].started_at is not None
    assert second["pom2"].started_at > before["pom2"].started_at, "a new instance restarts the clock"


async def test_events_are_recorded(harness: StoreHarness) -> None:
    svc = harness.service()
    await harness.store.record_event(
        HAEvent(svc, "", "pom1", "i1", "acquired", 4, "acquired lease as master (epoch 4)", {"gap_ms": 12})
    )
    await harness.store.record_event(HAEvent(svc, "", "pom1", "i1", "released", 4, "released lease (epoch 4)"))
    events = await harness.events(svc)
    assert [(e["kind"], e["epoch"]) for e in events] == [("acquired", 4), ("released", 4)]
    assert events[0]["detail"] == {"gap_ms": 12} and events[0]["decision"].startswith("acquired lease")


async def test_backend_failure_raises_retriable_store_error(harness: StoreHarness) -> None:
    broken = harness.unreachable()
    try:
        for call in (broken.try_acquire("svc", "", A), broken.read("svc", ""), broken.members("svc")):
            with pytest.raises(StatusStoreError) as info:
                await call
            assert info.value.retriable
    finally:
        await broken.close()


async def test_a_call_that_cannot_finish_fails_at_its_timeout(harness: StoreHarness) -> None:
    svc = harness.service()
    lease = await harness.store.try_acquire(svc, "", A)
    assert lease is not None
    async with harness.stall(svc, ""):
        t0 = time.monotonic()
        with pytest.raises(StatusStoreError) as info:
            await harness.store.renew(lease, timeout_s=0.15)
        elapsed = time.monotonic() - t0
    assert info.value.retriable
    assert 0.1 <= elapsed < 0.6, f"the call must be abandoned at its timeout, took {elapsed:.3f} s"
    assert await harness.store.renew(lease) is not None, "the store works again after an abandoned call"


async def test_pg_bad_credentials_are_not_retriable(pg_dsn_or_skip: str) -> None:
    from urllib.parse import urlsplit, urlunsplit

    from pom_ha.ha.pg_store import PgStatusStore
    from tests.unit.conftest import CONTRACT_TIMINGS

    parts = urlsplit(pg_dsn_or_skip)
    bad = urlunsplit(parts._replace(netloc=f"{parts.username}:wrong-password@{parts.hostname}:{parts.port}"))
    store = PgStatusStore(bad, CONTRACT_TIMINGS, listen=False)
    try:
        with pytest.raises(StatusStoreError) as info:
            await store.read("svc", "")
        assert not info.value.retriable
        assert "wrong-password" not in str(info.value)
    finally:
        await store.close()
