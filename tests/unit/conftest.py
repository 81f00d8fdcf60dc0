"""Fixtures of the HA-core unit tests: one status-store harness per backend (fake, PostgreSQL).

The PostgreSQL backend runs only when ``POM_TEST_PG_DSN`` names a database (the integration conftest sets
it; by hand: ``POM_TEST_PG_DSN=postgresql://pomha:pomha-lab@127.0.2.1:5437/pomha``). Migrations are applied
once per session. Time is driven, never slept: the fake store's clock is advanced; on PostgreSQL the harness
polls the database clock until enough of it has passed (with a deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pom_ha.ha.fake_store import FakeClock, FakeStatusStore
from pom_ha.ha.settings import HATimings
from pom_ha.ha.store import StatusStore

PG_DSN_ENV = "POM_TEST_PG_DSN"

# short but legal timings so that PostgreSQL tests wait at most about a second per expiry
CONTRACT_TIMINGS = HATimings(
    lease_ttl_ms=1000, renew_interval_ms=200, heartbeat_interval_ms=100, heartbeat_miss_limit=4,
    safety_margin_ms=200, takeover_stale_renewals=2, store_timeout_ms=500, db_retry_max_backoff_ms=1000,
)


async def poll_until(predicate: Any, timeout_s: float = 5.0, interval_s: float = 0.005) -> None:
    """Await until ``predicate()`` (sync or async) is truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


class StoreHarness:
    """A backend under the contract tests; subclasses say how time passes and how to break the store."""

    name: str
    store: StatusStore
    timings = CONTRACT_TIMINGS

    def service(self) -> str:
        return f"t-{uuid.uuid4().hex[:10]}"

    async def elapse_ms(self, ms: float) -> None:
        raise NotImplementedError

    def unreachable(self) -> StatusStore:
        raise NotImplementedError

    def stall(self, service: str, scope: str) -> contextlib.AbstractAsyncContextManager[None]:
        raise NotImplementedError

    async def events(self, service: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def close(self) -> None:
        await self.store.close()


class FakeHarness(StoreHarness):
    name = "fake"

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.fake = FakeStatusStore(self.timings.lease_ttl_ms, self.clock)
        self.store = self.fake

    async def elapse_ms(self, ms: float) -> None:
        self.clock.advance(ms / 1000)

    def unreachable(self) -> StatusStore:
        broken = FakeStatusStore(self.timings.lease_ttl_ms, self.clock)
        broken.available = False
        return broken

    @contextlib.asynccontextmanager
    async def stall(self, service: str, scope: str) -> AsyncIterator[None]:
        self.fake.stalled = True
        try:
            yield
        finally:
            self.fake.stalled = False

    async def events(self, service: str) -> list[dict[str, Any]]:
        return [
            {"kind": e.kind, "epoch": e.epoch, "decision": e.decision, "detail": e.detail, "server": e.server}
            for e in self.fake.events if e.service == service
        ]


class PgHarness(StoreHarness):
    name = "pg"

    def __init__(self, dsn: str) -> None:
        from pom_ha.ha.pg_store import PgStatusStore

        self.dsn = dsn
        self.store = PgStatusStore(dsn, self.timings, application_name="pom-ha-test")

    async def elapse_ms(self, ms: float) -> None:
        start = await self.store.now()
        deadline = time.monotonic() + ms / 1000 + 5.0
        while (await self.store.now() - start).total_seconds() * 1000 < ms:
            if time.monotonic() > deadline:
                raise AssertionError("database clock did not advance")
            await asyncio.sleep(0.01)

    def unreachable(self) -> StatusStore:
        from pom_ha.ha.pg_store import PgStatusStore

        return PgStatusStore("postgresql://pomha:x@127.0.0.1:1/pomha", self.timings, listen=False)

    @contextlib.asynccontextmanager
    async def stall(self, service: str, scope: str) -> AsyncIterator[None]:
        import asyncpg

        conn = await asyncpg.connect(self.dsn)
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute("SELECT 1 FROM ha_lease WHERE service = $1 AND scope = $2 FOR UPDATE", service, scope)
            yield
        finally:
            await tx.rollback()
            await conn.close()

    async def events(self, service: str) -> list[dict[str, Any]]:
        import asyncpg

        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetch(
                "SELECT kind, epoch, decision, detail, server FROM ha_event WHERE service = $1 ORDER BY id", service
            )
        finally:
            await conn.close()
        return [{**dict(r), "detail": json.loads(r["detail"])} for r in rows]


_migrated: set[str] = set()


async def _migrate_once(dsn: str) -> None:
    if dsn in _migrated:
        return
    import asyncpg

    from pom_ha.db.migrate import migrate

    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    _migrated.add(dsn)


@pytest.fixture
def contract_pg_dsn(request: pytest.FixtureRequest) -> str | None:
    """The real PostgreSQL for the contract's second run, or None for a unit-only session.

    When the session also runs integration tests (the full suite), the session stack is started here
    (a sync fixture, so the async session fixture can be resolved) and the contract always runs against
    the real server.
    """
    dsn = os.environ.get(PG_DSN_ENV)
    if dsn:
        return dsn
    if any("/integration/" in item.nodeid or "/chaos/" in item.nodeid for item in request.session.items):
        value: str = request.getfixturevalue("pg_dsn")
        return value
    return None


@pytest.fixture(params=["fake", "pg"])
async def harness(request: pytest.FixtureRequest, contract_pg_dsn: str | None) -> AsyncIterator[StoreHarness]:
    h: StoreHarness
    if request.param == "fake":
        h = FakeHarness()
    else:
        dsn = contract_pg_dsn
        if not dsn:
            pytest.skip(f"PostgreSQL contract run needs {PG_DSN_ENV} or a session that runs integration tests")
        await _migrate_once(dsn)
        h = PgHarness(dsn)
    await h.store.start()
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
def pg_dsn_or_skip(contract_pg_dsn: str | None) -> str:
    if not contract_pg_dsn:
        pytest.skip(f"needs {PG_DSN_ENV} or a session that runs integration tests")
    return contract_pg_dsn
