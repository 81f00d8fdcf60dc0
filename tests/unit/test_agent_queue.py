"""Calls queued for agents when an Agent Manager failed (services/agent_manager/queue.py): each pending offer
is kept (its agent is free), re-offered in place to another free agent of the same job, or closed
AGENT_UNAVAILABLE; never left pending, never two offers for one agent."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from pom_ha.domain.agents import AgentJobState, AgentSnapshot, CallRole, CallState
from services.agent_manager.queue import W_CLOSE, W_RETARGET, requeue_offers
from services.agent_manager.zone import AgentRecord

ZONE = "Z1"


def agent(agent_id: str, *, state: CallState = CallState.IDLE, job: str | None = "7", ready: bool = True,
          logged_in: bool = True) -> AgentRecord:
    return AgentRecord(AgentSnapshot(
        agent_id, ZONE, logged_in=logged_in, ready=ready and logged_in, call_state=state,
        job_state=AgentJobState.JOB_ATTACHED if job and logged_in else None, job_id=job if logged_in else None,
        call_id="x" if state is not CallState.IDLE else None,
        role=CallRole.OWNER if state is not CallState.IDLE else None))


class FakePool:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        assert args[0] == ZONE
        return self.rows


class FakeZone:
    def __init__(self, agents: dict[str, AgentRecord], rows: list[dict[str, Any]], *, master: bool = True) -> None:
        self.zone = ZONE
        self.agents = agents
        self.lock = asyncio.Lock()
        self.writes: list[tuple[str, tuple[object, ...]]] = []
        self.master = master
        self.log = structlog.get_logger("test")
        pool = FakePool(rows)

        class Ports:
            async def pool(self) -> FakePool:
                return pool

        self.ports = Ports()

    async def fenced(self, sql: str, *args: object) -> bool:
        self.writes.append((sql, args))
        return self.master


def row(i: int, agent_id: str, job: str = "7", event: str = "offered") -> dict[str, Any]:
    return {"id": i, "agent_id": agent_id, "event": event, "call_id": f"7:1:c{i}", "job_id": job}


async def test_kept_reoffered_or_closed() -> None:
    agents = {
        "a1": agent("a1"),  # free: keeps its offer
        "a2": agent("a2", state=CallState.TALKING),  # busy: its offer moves to a free agent
        "a3": agent("a3", job=None),  # detached by the takeover (desktop did not return)
        "a4": agent("a4"),  # free: takes a2's offer
        "a5": agent("a5", job="8"),  # free, but on another job
        "a6": agent("a6", ready=False),  # not ready
    }
    zone = FakeZone(agents, [row(1, "a1"), row(2, "a2"), row(3, "a3"), row(4, "a1"), row(5, "ghost", job="8"),
                             row(6, "a6", job="9")])
    counts = await requeue_offers(zone)  # type: ignore[arg-type]
    assert counts == {"kept": 1, "reoffered": 2, "closed": 3}
    retargets = [(a[0], a[1]) for sql, a in zone.writes if sql is W_RETARGET]
    closes = {a[0]: a[1] for sql, a in zone.writes if sql is W_CLOSE}
    # 1 kept for a1; 2 -> a4 (a2 busy); 3: a3 detached and nobody of job 7 free any more -> closed;
    # 4: a1 is promised offer 1 already, nobody else free -> closed; 5: an unknown agent -> a5 of job 8;
    # 6: a6 is not ready and nobody of job 9 is free -> closed
    assert retargets == [(2, "a4"), (5, "a5")]
    assert set(closes) == {3, 4, 6}
    assert all(str(r).startswith("closed: AGENT_UNAVAILABLE: no free agent of job") for r in closes.values())
    assert "job 7" in str(closes[3]) and "a3" in str(closes[3])


async def test_no_longer_master_stops_at_once() -> None:
    zone = FakeZone({"a2": agent("a2", state=CallState.TALKING)}, [row(1, "a2"), row(2, "a2")], master=False)
    counts = await requeue_offers(zone)  # type: ignore[arg-type]
    assert len(zone.writes) == 1 and not counts
