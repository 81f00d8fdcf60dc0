"""PostgreSQL of the lab: reachable with the application role, migrations idempotent."""

from __future__ import annotations

import asyncpg
import pytest

from pom_ha.db.migrate import discover, migrate
from pom_ha.infra.stack import Stack

pytestmark = pytest.mark.integration


async def test_migrations_apply_twice_without_error(stack: Stack, pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        # the stack applied them at start; running again applies nothing and raises nothing
        assert await migrate(conn) == []
        assert await migrate(conn) == []
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")]
        assert versions == [m.version for m in discover()]
        timeout = await conn.fetchval("SELECT value FROM pim_config WHERE key = 'AppServerWaitTimeOut'")
        assert timeout == "30000"
        producer = dict(await conn.fetch("SELECT property, value FROM pim_kafka_producer_config"))
        assert producer["acks"] == "all"
        assert producer["retries"] == "2"
        assert producer["request.timeout.ms"] == "120000"
        assert producer["max.block.ms"] == "50000"
        assert producer["retry.backoff.ms"] == "10000"
        for table in ("servers", "zones", "ha_member", "ha_lease", "ha_event"):
            assert await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table), table
    finally:
        await conn.close()


async def test_postgres_listens_only_on_its_address(stack: Stack) -> None:
    pg = stack.launcher("postgres", "")
    assert await pg.role() == "primary"
    host, port = pg.listen_ports()[0]
    assert host.startswith("127.")
    with pytest.raises((OSError, asyncpg.PostgresError)):
        await asyncpg.connect(host="127.0.0.1", port=port, user="x", password="y", timeout=2)
