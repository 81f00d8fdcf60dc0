"""The PostgreSQL status store: each operation is ONE statement, evaluated on the database clock.

Connections come from a small asyncpg pool created lazily (``min_size=0``), so the store can be built
while PostgreSQL is down and every call then fails with a retriable :class:`StatusStoreError`. A call
is bounded twice: the client abandons it at ``timeout_s`` (and terminates that connection, so a hung
socket is never reused) and the server cancels it at ``statement_timeout``. Lease changes (acquire,
take-over, release) are announced by the ``ha_lease_notify`` trigger of migration 0002 and received on
a dedicated LISTEN connection (:mod:`pom_ha.ha.pg_listen`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import asyncpg

from pom_ha.ha.pg_listen import LeaseListener
from pom_ha.ha.retry import Backoff
from pom_ha.ha.settings import HATimings
from pom_ha.ha.store import HAEvent, Holder, Lease, Member, MemberState, StatusStore, StatusStoreError

T = TypeVar("T")

_LEASE_COLS = (
    "service, scope, holder_server, holder_instance, holder_endpoint, epoch, acquired_at, renewed_at, "
    "expires_at, released_at"
)
_TTL = "($6::float8 * interval '1 millisecond')"

SQL_ACQUIRE = f"""
INSERT INTO ha_lease AS l ({_LEASE_COLS})
VALUES ($1, $2, $3, $4, $5, 1, now(), now(), now() + {_TTL}, NULL)
ON CONFLICT (service, scope) DO UPDATE
   SET holder_server = EXCLUDED.holder_server, holder_instance = EXCLUDED.holder_instance,
       holder_endpoint = EXCLUDED.holder_endpoint, epoch = l.epoch + 1, acquired_at = now(),
       renewed_at = now(), expires_at = EXCLUDED.expires_at, released_at = NULL
 WHERE l.expires_at <= now()
RETURNING {_LEASE_COLS}, now() AS observed_at
"""

SQL_TAKE_OVER = f"""
UPDATE ha_lease
   SET holder_server = $3, holder_instance = $4, holder_endpoint = $5, epoch = epoch + 1,
       acquired_at = now(), renewed_at = now(), expires_at = now() + {_TTL}, released_at = NULL
 WHERE service = $1 AND scope = $2 AND epoch = $7 AND renewed_at = $8
   AND renewed_at <= now() - ($9::float8 * interval '1 millisecond')
RETURNING {_LEASE_COLS}, now() AS observed_at
"""

SQL_RENEW = f"""
UPDATE ha_lease SET renewed_at = now(), expires_at = now() + ($5::float8 * interval '1 millisecond')
 WHERE service = $1 AND scope = $2 AND holder_instance = $3 AND epoch = $4 AND expires_at > now()
RETURNING {_LEASE_COLS}, now() AS observed_at
"""

SQL_RELEASE = """
UPDATE ha_lease SET expires_at = now(), released_at = now()
 WHERE service = $1 AND scope = $2 AND holder_instance = $3 AND epoch = $4 AND expires_at > now()
RETURNING epoch
"""

SQL_READ = f"SELECT {_LEASE_COLS}, now() AS observed_at FROM ha_lease WHERE service = $1 AND scope = $2"
SQL_LEASES = f"SELECT {_LEASE_COLS}, now() AS observed_at FROM ha_lease WHERE service = $1 ORDER BY scope"

SQL_UPSERT_MEMBER = """
INSERT INTO ha_member AS m (service, server, instance_id, state, scopes, endpoint, load, started_at, seen_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, now(), now())
ON CONFLICT (service, server) DO UPDATE
   SET instance_id = EXCLUDED.instance_id, state = EXCLUDED.state, scopes = EXCLUDED.scopes,
       endpoint = EXCLUDED.endpoint, load = EXCLUDED.load, seen_at = now(),
       started_at = CASE WHEN m.instance_id = EXCLUDED.instance_id THEN m.started_at ELSE now() END
"""

SQL_MEMBERS = """
SELECT service, server, instance_id, state, scopes, endpoint, load, started_at, seen_at
  FROM ha_member WHERE service = $1 ORDER BY server
"""

SQL_EVENT = """
INSERT INTO ha_event (at, service, scope, server, instance_id, kind, epoch, decision, detail)
VALUES (clock_timestamp() - ($9::float8 * interval '1 second'), $1, $2, $3, $4, $5, $6, $7, $8::jsonb)
"""

# SQLSTATE classes worth retrying: connection exception, insufficient resources, operator intervention
# (admin shutdown, query canceled by statement_timeout), transaction rollback (serialization, deadlock).
_RETRIABLE_CLASSES = ("08", "53", "57", "40")


def lease_from_row(row: Any) -> Lease:
    return Lease(
        service=row["service"], scope=row["scope"], holder_server=row["holder_server"],
        holder_instance=row["holder_instance"], holder_endpoint=row["holder_endpoint"], epoch=int(row["epoch"]),
        acquired_at=row["acquired_at"], renewed_at=row["renewed_at"], expires_at=row["expires_at"],
        released_at=row["released_at"], observed_at=row["observed_at"],
    )


def translate_error(exc: BaseException) -> StatusStoreError:
    """asyncpg/OS errors -> StatusStoreError with ``retriable`` set (Patroni translates kazoo's the same way)."""
    if isinstance(exc, TimeoutError):
        return StatusStoreError("status store call timed out", retriable=True)
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        retriable = state[:2] in _RETRIABLE_CLASSES
        return StatusStoreError(f"{type(exc).__name__} ({state}): {exc}", retriable=retriable)
    if isinstance(exc, OSError | asyncpg.InterfaceError | ConnectionError):
        return StatusStoreError(f"status store unreachable: {type(exc).__name__}: {exc}", retriable=True)
    return StatusStoreError(f"status store failure: {type(exc).__name__}: {exc}", retriable=False)


class PgStatusStore(StatusStore):
    """asyncpg implementation of :class:`StatusStore`.

    ``dsn`` is never logged (it holds the password). ``listen=True`` keeps a LISTEN connection open from
    :meth:`start` on and forwards ``ha_lease`` notifications to :meth:`subscribe` watchers.
    """

    def __init__(
        self, dsn: str, timings: HATimings, *, listen: bool = True, max_connections: int = 4,
        application_name: str = "pom-ha",
    ) -> None:
        self.ttl_ms = timings.lease_ttl_ms
        self._dsn = dsn
        self._timings = timings
        self._listen = listen
        self._max = max_connections
        self._app = application_name
        self._pool: Any = None
        self._pool_lock = asyncio.Lock()
        self.listener: LeaseListener | None = None
        self._closed = False

    # ---- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._listen and self.listener is None:
            self.listener = LeaseListener(
                self._dsn, self._notify, timeout_s=self._timings.store_timeout_s,
                backoff=Backoff(initial_s=0.05, max_s=self._timings.db_retry_max_backoff_s),
                application_name=f"{self._app}-listen",
            )
            self.listener.start()
            # give LISTEN a moment so changes right after start are not missed; a database that is down
            # is not waited for (the listener keeps retrying and announces "*" when it connects)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._timings.store_timeout_s):
                    await self.listener.connected.wait()

    async def close(self) -> None:
        self._closed = True
        if self.listener is not None:
            await self.listener.close()
            self.listener = None
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()

    async def _get_pool(self) -> Any:
        if self._closed:
            raise StatusStoreError("status store closed", retriable=False)
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    statement_ms = max(1, self._timings.store_timeout_ms)
                    self._pool = await asyncpg.create_pool(
                        self._dsn, min_size=0, max_size=self._max, timeout=self._timings.store_timeout_s,
                        max_inactive_connection_lifetime=60.0,
                        # store connections keep no session state (no LISTEN, locks or cursors; transactions
                        # end in their block and a failed call terminates its connection), so the default
                        # reset round trip on every release is skipped: it was the slowest part of a renewal
                        # on a loaded machine
                        reset=_no_reset,
                        server_settings={
                            "application_name": self._app,
                            "statement_timeout": str(statement_ms),
                            "lock_timeout": str(statement_ms),
                            "idle_in_transaction_session_timeout": str(10 * statement_ms),
                        },
                    )
        return self._pool

    async def _call(self, timeout_s: float | None, op: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``op(conn)`` on a pooled connection within ``timeout_s``; translate every failure."""
        budget = self._timings.store_timeout_s if timeout_s is None else max(0.001, timeout_s)
        conn: Any = None
        pool: Any = None
        try:
            async with asyncio.timeout(budget):
                pool = await self._get_pool()
                conn = await pool.acquire()
                return await op(conn)
        except StatusStoreError:
            raise
        except asyncio.CancelledError:
            if conn is not None:
                conn.terminate()  # the query may still be in flight: never reuse that socket
            raise
        except Exception as exc:
            err = translate_error(exc)
            if conn is not None and err.retriable:
                conn.terminate()
            raise err from exc
        finally:
            if conn is not None and pool is not None:
                try:
                    await pool.release(conn, timeout=0.1)
                except Exception:
                    # asyncpg terminates the connection itself when its reset fails, and the proxy then refuses
                    # terminate(); that must never escape (it crashed the elector under load)
                    with contextlib.suppress(Exception):
                        conn.terminate()

    # ---- leases ----------------------------------------------------------------------------------------
    async def now(self, *, timeout_s: float | None = None) -> datetime:
        async def op(conn: Any) -> datetime:
            value: datetime = await conn.fetchval("SELECT now()")
            return value

        return await self._call(timeout_s, op)

    async def _lease_row(self, timeout_s: float | None, sql: str, *args: object) -> Lease | None:
        async def op(conn: Any) -> Lease | None:
            row = await conn.fetchrow(sql, *args)
            return None if row is None else lease_from_row(row)

        return await self._call(timeout_s, op)

    async def try_acquire(
        self, service: str, scope: str, holder: Holder, *, timeout_s: float | None = None
    ) -> Lease | None:
        return await self._lease_row(
            timeout_s, SQL_ACQUIRE, service, scope, holder.server, holder.instance, holder.endpoint, self.ttl_ms
        )

    async def try_take_over(
        self, observed: Lease, holder: Holder, stale_ms: int, *, timeout_s: float | None = None
    ) -> Lease | None:
        if observed.renewed_at is None:
            return None
        return await self._lease_row(
            timeout_s, SQL_TAKE_OVER, observed.service, observed.scope, holder.server, holder.instance,
            holder.endpoint, self.ttl_ms, observed.epoch, observed.renewed_at, stale_ms,
        )

    async def renew(self, lease: Lease, *, timeout_s: float | None = None) -> Lease | None:
        return await self._lease_row(
            timeout_s, SQL_RENEW, lease.service, lease.scope, lease.holder_instance, lease.epoch, self.ttl_ms
        )

    async def release(self, lease: Lease, *, timeout_s: float | None = None) -> bool:
        async def op(conn: Any) -> bool:
            epoch = await conn.fetchval(SQL_RELEASE, lease.service, lease.scope, lease.holder_instance, lease.epoch)
            return epoch is not None

        return await self._call(timeout_s, op)

    async def read(self, service: str, scope: str, *, timeout_s: float | None = None) -> Lease | None:
        return await self._lease_row(timeout_s, SQL_READ, service, scope)

    async def leases(self, service: str, *, timeout_s: float | None = None) -> list[Lease]:
        async def op(conn: Any) -> list[Lease]:
            return [lease_from_row(r) for r in await conn.fetch(SQL_LEASES, service)]

        return await self._call(timeout_s, op)

    # ---- members and events ----------------------------------------------------------------------------
    async def upsert_member(self, member: Member, *, timeout_s: float | None = None) -> None:
        async def op(conn: Any) -> None:
            await conn.execute(
                SQL_UPSERT_MEMBER, member.service, member.server, member.instance_id, member.state,
                list(member.scopes), member.endpoint, member.load,
            )

        await self._call(timeout_s, op)

    async def members(self, service: str, *, timeout_s: float | None = None) -> list[Member]:
        async def op(conn: Any) -> list[Member]:
            rows = await conn.fetch(SQL_MEMBERS, service)
            return [
                Member(
                    service=r["service"], server=r["server"], instance_id=r["instance_id"],
                    state=_member_state(r["state"]), scopes=tuple(r["scopes"] or ()), endpoint=r["endpoint"],
                    load=int(r["load"]), started_at=r["started_at"], seen_at=r["seen_at"],
                )
                for r in rows
            ]

        return await self._call(timeout_s, op)

    async def record_event(self, event: HAEvent, *, timeout_s: float | None = None) -> None:
        async def op(conn: Any) -> None:
            await conn.execute(
                SQL_EVENT, event.service, event.scope, event.server, event.instance_id, event.kind, event.epoch,
                event.decision, json.dumps(event.detail, default=str), float(event.age_s),
            )

        await self._call(timeout_s, op)


def _member_state(raw: str) -> MemberState:
    if raw == "MASTER":
        return "MASTER"
    if raw == "DORMANT":
        return "DORMANT"
    if raw == "RUNNING":
        return "RUNNING"
    return "STOPPED"


async def _no_reset(_conn: Any) -> None:
    """Pool reset hook: nothing to reset (see :meth:`PgStatusStore._get_pool`)."""
