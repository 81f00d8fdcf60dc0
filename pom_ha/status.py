"""The guide-style component table: one row per component, one column per POM server, from ``ha_member``.

A cell is the member's state — ``MASTER`` (with the zones it leads for per-zone roles), ``DORMANT``,
``RUNNING`` (pool members such as Campaign Managers) or ``STOPPED`` — or ``-`` when the component never
ran there.

For an elected role the cell says what the **leases** say, not what the member last wrote about itself:
a server is MASTER of exactly the scopes whose live lease (``ha_lease``, not expired, not released) it
holds, so the table can never show two masters of one role and scope, even in the seconds after a
master died and before its own row is refreshed. A member whose heartbeat stopped (its row not refreshed
for ``stale_after_s``: killed, host down, cut from the database) is shown as
``UNREACHABLE (was <state>, Ns)``: the operator sees both what it last was and that it is gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# display order and names of the components (services) the product runs; others follow alphabetically
COMPONENTS: dict[str, str] = {
    "campaign_director": "Campaign Director",
    "zone_director": "Zone Director",
    "campaign_manager": "Campaign Manager",
    "rule_engine": "Rule Engine",
    "agent_manager": "Agent Manager",
    "cache_service": "Cache Service",
    "event_aggregator": "Enriched Attempt Aggregator",
    "media_simulator": "Media Simulator",
}

SQL_MEMBERS = """
SELECT service, server, state, scopes, load, EXTRACT(EPOCH FROM (now() - seen_at)) AS age_s
  FROM ha_member ORDER BY service, server
"""
# every lease; ``live``: held now (the holder is the one master of service/scope)
SQL_LEASES = """
SELECT service, scope, holder_server, epoch, acquired_at, expires_at,
       (holder_server IS NOT NULL AND expires_at > now() AND released_at IS NULL) AS live
  FROM ha_lease ORDER BY service, scope
"""


@dataclass(frozen=True)
class Cell:
    state: str
    scopes: tuple[str, ...]
    load: int
    age_s: float

    # the scopes whose live lease this server holds, for a role that has leases (None: not elected)
    leased: tuple[str, ...] | None = None

    def stale(self, stale_after_s: float) -> bool:
        return self.state != "STOPPED" and self.age_s > stale_after_s

    def render(self, stale_after_s: float) -> str:
        state, scopes = self.state, self.scopes
        if self.leased is not None and state in ("MASTER", "DORMANT"):
            state, scopes = ("MASTER", self.leased) if self.leased else ("DORMANT", ())
        text = state
        if state == "MASTER" and any(scopes):
            text += f" ({', '.join(s for s in scopes if s)})"
        elif state == "RUNNING" and self.load:
            text += f" (load {self.load})"
        if self.stale(stale_after_s):
            text = f"UNREACHABLE (was {text}, {self.age_s:.0f} s)"
        return text


@dataclass(frozen=True)
class ComponentTable:
    servers: list[str]
    rows: dict[str, dict[str, Cell]]  # service -> server -> cell
    leases: tuple[dict[str, Any], ...] = ()

    def header(self) -> list[str]:
        return ["COMPONENT", *self.servers]

    def lines(self, stale_after_s: float) -> list[list[str]]:
        def order(service: str) -> tuple[int, str]:
            names = list(COMPONENTS)
            return (names.index(service) if service in names else len(names), service)

        out = []
        for service in sorted(self.rows, key=order):
            cells = self.rows[service]
            name = COMPONENTS.get(service, service)
            out.append([name, *[cells[s].render(stale_after_s) if s in cells else "-" for s in self.servers]])
        return out

    def as_json(self, stale_after_s: float) -> dict[str, Any]:
        return {
            "servers": self.servers,
            "components": {
                service: {
                    server: {
                        "state": c.state, "scopes": [s for s in c.scopes if s], "load": c.load,
                        "seen_s_ago": round(c.age_s, 1), "stale": c.stale(stale_after_s),
                        "shown": c.render(stale_after_s),
                    }
                    for server, c in cells.items()
                }
                for service, cells in self.rows.items()
            },
            "leases": [{k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in x.items()}
                       for x in self.leases],
        }

    def masters(self, stale_after_s: float) -> dict[str, list[str]]:
        """service/scope -> the servers the table shows as its master (never more than one)."""
        out: dict[str, list[str]] = {}
        for service, cells in self.rows.items():
            for server, c in cells.items():
                if c.leased and not c.stale(stale_after_s):
                    for scope in c.leased:
                        out.setdefault(f"{service}/{scope}", []).append(server)
        return out


def build_table(records: list[Any], servers: list[str], leases: list[Any] | None = None) -> ComponentTable:
    """Rows of :data:`SQL_MEMBERS` (and of :data:`SQL_LEASES`) -> table; servers of the topology first, any
    others after them. Without ``leases`` the members' own states are shown."""
    leased_services = {r["service"] for r in leases or ()}
    held: dict[tuple[str, str], list[str]] = {}
    for r in leases or ():
        if r["live"]:
            held.setdefault((r["service"], r["holder_server"]), []).append(r["scope"])
    rows: dict[str, dict[str, Cell]] = {}
    extra: list[str] = []
    for r in records:
        service, server = r["service"], r["server"]
        leased = tuple(sorted(held.get((service, server), ()))) if service in leased_services else None
        rows.setdefault(service, {})[server] = Cell(
            r["state"], tuple(r["scopes"] or ()), int(r["load"] or 0), float(r["age_s"] or 0.0), leased
        )
        if server not in servers and server not in extra:
            extra.append(server)
    lease_rows = tuple(
        {"service": r["service"], "scope": r["scope"], "holder_server": r["holder_server"], "epoch": int(r["epoch"]),
         "live": bool(r["live"]), "acquired_at": r["acquired_at"], "expires_at": r["expires_at"]}
        for r in leases or ())
    return ComponentTable([*servers, *sorted(extra)], rows, lease_rows)


async def read_table_conn(conn: Any, servers: list[str]) -> ComponentTable:
    return build_table(list(await conn.fetch(SQL_MEMBERS)), servers, list(await conn.fetch(SQL_LEASES)))


async def read_table(dsn: str, servers: list[str], *, timeout_s: float = 10.0) -> ComponentTable:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=timeout_s)
    try:
        return await read_table_conn(conn, servers)
    finally:
        await conn.close()
