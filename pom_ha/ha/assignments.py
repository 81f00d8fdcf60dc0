"""Work assignment for pool services (Campaign Manager jobs): one owner per item, an epoch per assignment.

The allocator (e.g. the Common CD master) assigns under its OWN lease fence, so a deposed allocator
cannot assign; every (re)assignment bumps the item's epoch, so the previous owner's writes — fenced with
:meth:`Assignment.fence` — are refused from the moment the item moves::

    # allocator, while master of campaign_director
    a = await assign(conn, LeaseFence("campaign_director", "", cd_term.epoch),
                     "campaign_manager", f"job:{job_id}", Holder(member.server, member.instance_id))
    # worker (a RUNNING campaign_manager), for each side effect of that job
    ok = await execute_fenced(conn, a.fence(), "UPDATE attempts SET ... WHERE id = $1 AND {fence}", attempt_id)

``ha_assignment`` (migration 0002) is generic; a domain table such as ``job_assignment`` can reference it
or copy its epoch. Items of a member that left (``ha_member`` STOPPED or not seen) are the allocator's to
move with :func:`assign` again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pom_ha.ha.fencing import AssignmentFence, LeaseFence
from pom_ha.ha.store import Holder

_COLS = "service, item, owner_server, owner_instance, epoch, assigned_at"

SQL_ASSIGN = f"""
WITH ha_fence AS (
    SELECT epoch FROM ha_lease WHERE service = $6 AND scope = $7 AND epoch = $8 AND expires_at > now() FOR SHARE
)
INSERT INTO ha_assignment AS a (service, item, owner_server, owner_instance, epoch, assigned_at,
                                assigner_service, assigner_scope, assigner_epoch)
SELECT $1, $2, $3, $4, 1, now(), $6, $7, $8 WHERE EXISTS (SELECT 1 FROM ha_fence)
ON CONFLICT (service, item) DO UPDATE
   SET owner_server = EXCLUDED.owner_server, owner_instance = EXCLUDED.owner_instance, epoch = a.epoch + 1,
       assigned_at = now(), assigner_service = EXCLUDED.assigner_service,
       assigner_scope = EXCLUDED.assigner_scope, assigner_epoch = EXCLUDED.assigner_epoch
 WHERE $5::bool OR a.owner_instance IS DISTINCT FROM EXCLUDED.owner_instance
RETURNING {_COLS}
"""

SQL_UNASSIGN = """
WITH ha_fence AS (
    SELECT epoch FROM ha_lease WHERE service = $3 AND scope = $4 AND epoch = $5 AND expires_at > now() FOR SHARE
)
DELETE FROM ha_assignment WHERE service = $1 AND item = $2 AND EXISTS (SELECT 1 FROM ha_fence)
RETURNING epoch
"""


@dataclass(frozen=True)
class Assignment:
    service: str
    item: str
    owner_server: str
    owner_instance: str
    epoch: int
    assigned_at: datetime

    def fence(self) -> AssignmentFence:
        return AssignmentFence(self.service, self.item, self.owner_instance, self.epoch)


def _row(r: Any) -> Assignment:
    return Assignment(r["service"], r["item"], r["owner_server"], r["owner_instance"], int(r["epoch"]),
                      r["assigned_at"])


async def assign(
    conn: Any, allocator: LeaseFence, service: str, item: str, owner: Holder, *, bump_same_owner: bool = False
) -> Assignment | None:
    """Give ``item`` to ``owner`` (new epoch). ``None`` when the allocator's fence failed, or when the item
    already belongs to ``owner`` and ``bump_same_owner`` is False (read it with :func:`assignments`)."""
    row = await conn.fetchrow(
        SQL_ASSIGN, service, item, owner.server, owner.instance, bump_same_owner,
        allocator.service, allocator.scope, allocator.epoch,
    )
    return None if row is None else _row(row)


async def unassign(conn: Any, allocator: LeaseFence, service: str, item: str) -> bool:
    """Remove the item (finished); True when removed under the allocator's fence."""
    return await conn.fetchval(SQL_UNASSIGN, service, item, allocator.service, allocator.scope,
                               allocator.epoch) is not None


async def assignments(conn: Any, service: str, owner_instance: str | None = None) -> list[Assignment]:
    """Items of a service, optionally only one owner's, ordered by item."""
    rows = await conn.fetch(
        f"SELECT {_COLS} FROM ha_assignment WHERE service = $1 AND ($2::text IS NULL OR owner_instance = $2) "
        "ORDER BY item",
        service, owner_instance,
    )
    return [_row(r) for r in rows]
