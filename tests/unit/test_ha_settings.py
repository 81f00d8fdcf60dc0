"""HA timing rules are enforced at load, and a refusal names both settings of the broken rule."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pom_ha.config import ConfigError
from pom_ha.ha.settings import HATimings, load_timings


def test_defaults_follow_the_design_with_the_faster_renewal() -> None:
    t = HATimings()
    assert (t.lease_ttl_ms, t.renew_interval_ms, t.heartbeat_interval_ms, t.heartbeat_miss_limit) == (3000, 400, 250, 4)
    assert (t.safety_margin_ms, t.takeover_stale_renewals, t.heartbeat_max_frame_bytes) == (500, 2, 65536)
    assert t.db_retry_max_backoff_ms == 5000
    assert t.valid_for_s == pytest.approx(2.5)
    assert t.takeover_stale_ms == 800
    assert t.heartbeat_dead_after_s == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"renew_interval_ms": 1001}, ("renew_interval_ms", "lease_ttl_ms")),
        ({"lease_ttl_ms": 1400}, ("renew_interval_ms", "lease_ttl_ms")),
        ({"safety_margin_ms": 2500}, ("safety_margin_ms", "lease_ttl_ms")),
        ({"heartbeat_interval_ms": 1000}, ("heartbeat_interval_ms", "heartbeat_miss_limit")),
        ({"heartbeat_miss_limit": 13}, ("heartbeat_interval_ms", "lease_ttl_ms")),
        ({"takeover_stale_renewals": 8}, ("takeover_stale_renewals", "renew_interval_ms")),
        ({"db_retry_max_backoff_ms": 100}, ("db_retry_max_backoff_ms", "renew_interval_ms")),
        ({"store_timeout_ms": 2200}, ("store_timeout_ms", "lease_ttl_ms")),
    ],
)
def test_bad_combinations_are_refused_naming_both_settings(overrides: dict[str, int], names: tuple[str, str]) -> None:
    with pytest.raises(ValidationError) as info:
        HATimings(**overrides)
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} missing from: {message}"


def test_a_legal_tight_combination_is_accepted() -> None:
    t = HATimings(lease_ttl_ms=300, renew_interval_ms=100, heartbeat_interval_ms=50, heartbeat_miss_limit=6,
                  safety_margin_ms=100, store_timeout_ms=100, db_retry_max_backoff_ms=100)
    assert t.valid_for_s == pytest.approx(0.2)


def test_timings_are_frozen() -> None:
    t = HATimings()
    with pytest.raises(ValidationError):
        t.lease_ttl_ms = 10  # type: ignore[misc]


def test_environment_overrides_and_errors_name_the_variable() -> None:
    t = load_timings({"POM_HA_LEASE_TTL_MS": "6000", "POM_HA_RENEW_INTERVAL_MS": "1000", "OTHER": "x"})
    assert (t.lease_ttl_ms, t.renew_interval_ms) == (6000, 1000)
    assert load_timings({}, lease_ttl_ms=4000).lease_ttl_ms == 4000

    with pytest.raises(ConfigError) as info:
        load_timings({"POM_HA_RENEW_INTERVAL_MS": "2000"})
    assert "renew_interval_ms" in str(info.value) and "lease_ttl_ms" in str(info.value)

    with pytest.raises(ConfigError) as info:
        load_timings({"POM_HA_LEASE_TTL_MS": "soon"})
    assert "POM_HA_LEASE_TTL_MS" in str(info.value)


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ValidationError):
        HATimings(lease_ttl=3000)  # type: ignore[call-arg]


async def test_two_concurrent_outbox_flushes_write_each_event_once() -> None:
    import asyncio

    from pom_ha.ha.fake_store import FakeStatusStore
    from pom_ha.ha.outbox import EventOutbox
    from pom_ha.ha.store import HAEvent

    store = FakeStatusStore(3000)
    written: list[str] = []
    gate = asyncio.Event()

    async def slow_record(event: HAEvent, *, timeout_s: float | None = None) -> None:
        await gate.wait()
        written.append(event.decision)

    store.record_event = slow_record  # type: ignore[method-assign]
    outbox = EventOutbox()
    for i in range(3):
        outbox.add(HAEvent("svc", "", "pom1", "i1", "acquired", i, f"e{i}"))
    first = asyncio.create_task(outbox.flush(store, 1.0))
    await asyncio.sleep(0)
    assert await outbox.flush(store, 1.0) == 0, "a second flusher must not run beside the first"
    gate.set()
    assert await first == 3
    assert written == ["e0", "e1", "e2"] and len(outbox) == 0
