"""The guide-style component table: one row per component, one column per POM server, from ``ha_member``.

A cell is the member's state — ``MASTER`` (with the zones it leads for per-zone roles), ``DORMANT``,
``RUNNING`` (pool members such as Campaign Managers) or ``STOPPED`` — or ``-`` when the component never
ran there. A row whose daemon stopped refreshing it (killed, host down, cut from the database) would
otherwise keep its last state forever, so a member not seen for ``stale_after_s`` is shown as
``GONE? <state> (Ns)``: the operator sees both what it last was and that it is no longer confirmed.
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


@dataclass(frozen=True)
class Cell:
    state: str
    scopes: tuple[str, ...]
    load: int
    age_s: float

    def render(self, stale_after_s: float) -> str:
        text = self.state
        if self.state == "MASTER" and any(self.scopes):
            text += f" ({', '.join(s for s in self.scopes if s)})"
        elif self.state == "RUNNING" and self.load:
            text += f" (load {self.load})"
        if self.state != "STOPPED" and self.age_s > stale_after_s:
            text = f"GONE? {text} ({self.age_s:.0f} s)"
        return text


@dataclass(frozen=True)
class ComponentTable:
    servers: list[str]
    rows: dict[str, dict[str, Cell]]  # service -> server -> cell

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
                        "seen_s_ago": round(c.age_s, 1), "stale": c.state != "STOPPED" and c.age_s > stale_after_s,
                    }
                    for server, c in cells.items()
                }
                for service, cells in self.rows.items()
            },
        }


def build_table(records: list[Any], servers: list[str]) -> ComponentTable:
    """Rows of :data:`SQL_MEMBERS` -> table; servers of the topology first, any others after them."""
    rows: dict[str, dict[str, Cell]] = {}
    extra: list[str] = []
    for r in records:
        rows.setdefault(r["service"], {})[r["server"]] = Cell(
            r["state"], tuple(r["scopes"] or ()), int(r["load"] or 0), float(r["age_s"] or 0.0)
        )
        if r["server"] not in servers and r["server"] not in extra:
            extra.append(r["server"])
    return ComponentTable([*servers, *sorted(extra)], rows)


async def read_table(dsn: str, servers: list[str], *, timeout_s: float = 5.0) -> ComponentTable:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=timeout_s)
    try:
        return build_table(list(await conn.fetch(SQL_MEMBERS)), servers)
    finally:
        await conn.close()
