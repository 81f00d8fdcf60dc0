"""Fencing: a master's side effects are accepted only under its epoch, checked where they land.

Database writes
    :func:`fenced_execute` runs the caller's INSERT/UPDATE/DELETE in ONE statement with the epoch check.
    The caller's SQL must say where the check goes with the marker ``{fence}`` (exactly once), so a write
    without the check cannot be expressed through this API::

        ok = await fenced_execute(
            conn, "rule_engine", "", term.epoch,
            "INSERT INTO decisions (job, verdict) SELECT $1, $2 WHERE {fence}", job_id, verdict,
        )
        # or: "UPDATE jobs SET state = $1 WHERE id = $2 AND {fence}"

    It becomes ``WITH ha_fence AS (SELECT epoch FROM ha_lease WHERE service=.. AND scope=.. AND epoch=..
    AND expires_at > now() FOR SHARE), ha_write AS (<your statement> RETURNING 1) SELECT ...``. ``FOR
    SHARE`` makes the check and the write atomic with respect to lease changes: a take-over waits for an
    in-flight fenced write to commit, and a write that starts after the take-over sees the new epoch and
    is refused. Your parameters keep their numbers ($1..$n); the fence's come after them.

Transactions
    :func:`fenced_transaction` fences several statements that commit together: its first statement takes the
    fence row ``FOR SHARE``; a fence that does not hold raises :class:`FenceLost` and nothing is written.

Messages
    :class:`EpochEnvelope` carries (service, scope, epoch) with a payload; the receiver keeps an
    :class:`EpochGate` that remembers the highest epoch seen per (service, scope) and drops (and counts)
    anything older.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

FENCE_MARK = "{fence}"
_RETURNING = re.compile(r"\bRETURNING\b", re.IGNORECASE)
_DML = re.compile(r"^\s*(INSERT|UPDATE|DELETE)\b", re.IGNORECASE)
P = TypeVar("P")


@dataclass(frozen=True)
class LeaseFence:
    """Valid while ``ha_lease(service, scope)`` has this epoch and has not expired (database clock)."""

    service: str
    scope: str
    epoch: int

    def select(self, first_param: int) -> tuple[str, list[object]]:
        n = first_param
        return (
            f"SELECT epoch FROM ha_lease WHERE service = ${n} AND scope = ${n + 1} AND epoch = ${n + 2}"
            f" AND expires_at > now() FOR SHARE",
            [self.service, self.scope, self.epoch],
        )


@dataclass(frozen=True)
class AssignmentFence:
    """Valid while work item ``ha_assignment(service, item)`` is still owned by this instance at this epoch."""

    service: str
    item: str
    owner_instance: str
    epoch: int

    def select(self, first_param: int) -> tuple[str, list[object]]:
        n = first_param
        return (
            f"SELECT epoch FROM ha_assignment WHERE service = ${n} AND item = ${n + 1}"
            f" AND owner_instance = ${n + 2} AND epoch = ${n + 3} FOR SHARE",
            [self.service, self.item, self.owner_instance, self.epoch],
        )


Fence = LeaseFence | AssignmentFence


@dataclass(frozen=True)
class FencedWrite:
    """Outcome of a fenced write: truthy only when the fence held AND the statement changed rows."""

    fence_held: bool
    rows: int

    def __bool__(self) -> bool:
        return self.fence_held and self.rows > 0


def compose_fenced(fence: Fence, sql: str, n_args: int) -> tuple[str, list[object]]:
    """The single statement that runs ``sql`` only under ``fence``; returns (statement, fence parameters)."""
    body = sql.strip().rstrip(";").strip()
    if body.count(FENCE_MARK) != 1:
        raise ValueError(f"fenced SQL must contain {FENCE_MARK} exactly once, where the write's condition goes")
    if not _DML.match(body):
        raise ValueError("fenced SQL must be one INSERT, UPDATE or DELETE statement")
    if _RETURNING.search(body):
        raise ValueError("fenced SQL must not have a RETURNING clause (the fence adds its own)")
    fence_sql, fence_args = fence.select(n_args + 1)
    body = body.replace(FENCE_MARK, "EXISTS (SELECT 1 FROM ha_fence)")
    statement = (
        f"WITH ha_fence AS ({fence_sql}), ha_write AS ({body} RETURNING 1) "
        f"SELECT EXISTS (SELECT 1 FROM ha_fence) AS fence_held, (SELECT count(*) FROM ha_write) AS n_rows"
    )
    return statement, fence_args


async def execute_fenced(
    conn: Any, fence: Fence, sql: str, *args: object, timeout_s: float | None = None
) -> FencedWrite:
    """Run ``sql`` (with ``{fence}``) on an asyncpg connection only under ``fence``."""
    statement, fence_args = compose_fenced(fence, sql, len(args))
    row = await conn.fetchrow(statement, *args, *fence_args, timeout=timeout_s)
    return FencedWrite(fence_held=bool(row["fence_held"]), rows=int(row["n_rows"]))


async def fenced_execute(
    conn: Any, service: str, scope: str, epoch: int, sql: str, *args: object, timeout_s: float | None = None
) -> FencedWrite:
    """:func:`execute_fenced` under the lease ``(service, scope)`` at ``epoch``."""
    return await execute_fenced(conn, LeaseFence(service, scope, epoch), sql, *args, timeout_s=timeout_s)


# ---- fenced transactions ----------------------------------------------------------------------------------
class FenceLost(Exception):
    """The fence did not hold when the transaction began: nothing was written."""

    def __init__(self, fence: Fence) -> None:
        super().__init__(f"fence {fence} no longer holds; the transaction was rolled back")
        self.fence = fence


@asynccontextmanager
async def fenced_transaction(conn: Any, fence: Fence, *, timeout_s: float | None = None) -> AsyncIterator[Any]:
    """Run the block in a transaction that is committed only if ``fence`` held at its start (it then holds
    until the commit: the fence row stays locked). Raises :class:`FenceLost` otherwise."""
    sql, args = fence.select(1)
    async with conn.transaction():
        held = await conn.fetchval(sql, *args, timeout=timeout_s)
        if held is None:
            raise FenceLost(fence)
        yield conn


# ---- messages ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EpochEnvelope(Generic[P]):
    """A message sent by the master of (service, scope) during ``epoch``."""

    service: str
    scope: str
    epoch: int
    payload: P

    def to_json(self) -> dict[str, Any]:
        return {"service": self.service, "scope": self.scope, "epoch": self.epoch, "payload": self.payload}

    @staticmethod
    def from_json(obj: dict[str, Any]) -> EpochEnvelope[Any]:
        epoch = obj.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise ValueError(f"envelope epoch must be an integer, got {epoch!r}")
        return EpochEnvelope(str(obj["service"]), str(obj.get("scope", "")), epoch, obj.get("payload"))


@dataclass
class EpochGate:
    """Receiver-side fence: admits a message only if its epoch is >= the highest seen for its role."""

    on_drop: Callable[[EpochEnvelope[Any], int], None] | None = None
    highest: dict[tuple[str, str], int] = field(default_factory=dict)
    dropped: dict[tuple[str, str], int] = field(default_factory=dict)

    def admit(self, envelope: EpochEnvelope[Any]) -> bool:
        key = (envelope.service, envelope.scope)
        seen = self.highest.get(key)
        if seen is not None and envelope.epoch < seen:
            self.dropped[key] = self.dropped.get(key, 0) + 1
            if self.on_drop is not None:
                self.on_drop(envelope, seen)
            return False
        self.highest[key] = envelope.epoch
        return True

    def dropped_total(self) -> int:
        return sum(self.dropped.values())
