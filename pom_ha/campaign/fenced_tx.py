"""A transaction fenced for its whole duration: several statements accepted only under one epoch.

:func:`pom_ha.ha.fencing.execute_fenced` fences ONE statement. An import batch (contacts, rejected lines
and the checkpoint) must commit together or not at all, so this opens a transaction whose first
statement takes the fence row ``FOR SHARE``: a takeover (an UPDATE of that ``ha_lease`` row) waits until
the transaction ends, and a transaction that starts after a takeover finds no row at the old epoch and is
rolled back without writing anything::

    async with fenced_transaction(conn, LeaseFence("campaign_director", "", term.epoch)):
        await conn.copy_records_to_table(...)
        await conn.execute("UPDATE data_imports SET checkpoint = $1 WHERE id = $2", ...)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pom_ha.ha.fencing import Fence


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
