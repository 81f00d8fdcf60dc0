"""Zone Directors: one lease per zone (``zone_director/<zone>``), and zones going back to their home.

Work: the zone's data imports (``data_imports.zone``), resumed from their checkpoint by the next director
of the zone after a failure (the guide's "Impact of the Zone Director failure").

Allocation: free zone leases are spread over the CD daemons by :class:`pom_ha.ha.election.ClaimSpread`
(least busy first); the first director of a zone records itself as the zone's *home* (``cd_zone_home``).
When a director fails, a survivor takes its zones over at once (the guide's rule).

Taking back (the guide: a CD that comes back is DORMANT, "however, it takes back the zone responsibility
allocated to it before the failover"): a director holding a zone whose home is another server watches
that server's ``zone_director`` member row; once a NEW instance there (not the one recorded as leading
the zone at home) is running and fresh, it records the decision (``ha_event`` kind ``zone_handed_back``, fenced
by the zone lease), releases the zone gracefully and stays out of the competition for it until the home
holds it (or ``zone_handback_timeout_ms`` passes, so the zone is never left without a director). The
home daemon claims its home zones without the spread delay, woken by the lease NOTIFY of the release; if
another daemon wins that race it hands the zone back in turn, so the zone reaches its home within a few
rounds (each loser stays out while it waits).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

from services.campaign_director.context import DB_ERRORS, TermContext
from services.campaign_director.schedules import ScheduleDuties

ZONE_SERVICE = "zone_director"

# the first director of a zone becomes its home; the home's later instances refresh home_instance
SQL_CLAIM_HOME = (
    "INSERT INTO cd_zone_home AS h (zone, home_server, home_instance, epoch) SELECT $1, $2, $3, $4 WHERE {fence}"
    " ON CONFLICT (zone) DO UPDATE SET home_instance = EXCLUDED.home_instance, epoch = EXCLUDED.epoch,"
    " since = now() WHERE h.home_server = EXCLUDED.home_server"
)
# a new instance of the home's director (not the one that led the zone there last) is running
SQL_HOME_BACK = """
SELECT instance_id FROM ha_member
 WHERE service = 'zone_director' AND server = $1 AND state <> 'STOPPED'
   AND seen_at > now() - $2::interval AND instance_id IS DISTINCT FROM $3
"""


async def run_zone_director(ctx: TermContext, zone_homes: dict[str, str], hand_back: Callable[[str], object]) -> None:
    """One zone's director for one term; ``zone_homes`` learns the zone's home, ``hand_back(home)`` releases the
    zone to its home (outside the term: releasing ends it)."""
    zone = ctx.term.scope
    while True:
        try:
            await ctx.execute(SQL_CLAIM_HOME, zone, ctx.server, ctx.instance, ctx.epoch)
            rows = await ctx.fetch("SELECT home_server, home_instance FROM cd_zone_home WHERE zone = $1", zone)
            break
        except DB_ERRORS as exc:
            ctx.log.warning("zone director cannot read its zone's home yet", error=f"{type(exc).__name__}")
            await asyncio.sleep(ctx.settings.zone_check_interval_ms / 1000)
    home = rows[0]["home_server"] if rows else ctx.server
    failed_instance = rows[0]["home_instance"] if rows else None
    zone_homes[zone] = home
    ctx.started_db = await ctx.db_now()
    # the zone's data imports: resumed from their checkpoint by whichever director leads the zone now
    duties = ScheduleDuties(ctx)
    ctx.every("zone-imports", ctx.settings.schedule_interval_ms / 1000, lambda: duties.run_imports(zone))
    if home == ctx.server:
        ctx.log.info("zone director active for its home zone", zone=zone)
        await ctx.term.ended.wait()
        return
    ctx.log.info("zone director holding a zone for its home server", zone=zone, home=home)
    dead_after = timedelta(milliseconds=ctx.settings.cm_dead_after_ms * 2)
    while True:
        await asyncio.sleep(ctx.settings.zone_check_interval_ms / 1000)
        try:
            back = await ctx.fetch(SQL_HOME_BACK, home, dead_after, failed_instance)
            if not back:
                continue
            decision = (f"handing zone {zone} back to {home}: its director runs again and the zone was allocated "
                        f"to it before its failure")
            recorded = await ctx.event("zone_handed_back", decision, {"zone": zone, "home": home,
                                                                        "home_instance": back[0]["instance_id"]})
        except DB_ERRORS:
            continue
        if not recorded:  # the zone lease moved on meanwhile: nothing left to hand back
            await ctx.term.ended.wait()
            return
        ctx.log.info(decision, zone=zone, home=home)
        hand_back(home)  # releasing ends this term (and cancels this task): a daemon task outside the term
        await ctx.term.ended.wait()
        return
