"""The Agent Manager's cache link without servers: agent states coalesced per agent and kept while the cache
is down, a callback refused by the cache comes back to the desktop as ERROR callback_refused."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from pom_ha.cache import AgentEntry, AgentStateUnavailable, Callback, CallbackRefused
from pom_ha.desktop.protocol import CallbackRequest, ErrorFrame, WrapUp
from pom_ha.domain.agents import AgentJobState, AgentSnapshot, CallRole, CallState
from services.agent_manager.cache_link import AgentCacheLink, agent_entry, callback_of


class FakeCache:
    def __init__(self) -> None:
        self.agents: dict[str, AgentEntry] = {}
        self.writes = 0
        self.down = False
        self.callbacks: dict[str, Callback] = {}

    async def set_agent_state(self, entry: AgentEntry) -> None:
        await asyncio.sleep(0)
        if self.down:
            raise AgentStateUnavailable(f"set agent {entry.agent_id}", "no cache node is reachable")
        self.writes += 1
        self.agents[entry.agent_id] = entry

    async def set_callback(self, cb: Callback) -> None:
        if self.down:
            raise CallbackRefused(f"set callback {cb.callback_id}", "no cache node is reachable")
        self.callbacks[cb.callback_id] = cb

    async def close(self) -> None:
        pass


class FakeSession:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send(self, frame: Any) -> None:
        self.sent.append(frame)


def wrapup_agent() -> AgentSnapshot:
    return AgentSnapshot("a1", "Default", logged_in=True, ready=True, call_state=CallState.WRAPUP,
                         job_state=AgentJobState.JOB_ATTACHED, job_id="17", call_id="17:2:c9", role=CallRole.OWNER)


def test_agent_entries_name_the_state() -> None:
    assert agent_entry(AgentSnapshot("a1", "Z")).state == "Logged Out"
    assert agent_entry(AgentSnapshot("a1", "Z", logged_in=True, ready=True)).state == "Ready"
    assert agent_entry(AgentSnapshot("a1", "Z", logged_in=True)).state == "Not Ready"
    entry = agent_entry(wrapup_agent())
    assert (entry.state, entry.zone, entry.job_id) == ("Wrapup", "Default", 17)


def test_callback_of_a_campaign_call_names_its_job_and_contact() -> None:
    at = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
    frame = WrapUp(req=4, call_id="17:2:c9", completion_code="CALLBACK",
                   callback=CallbackRequest(at=at, phone="+33123", agent_specific=True))
    cb = callback_of("Default", wrapup_agent(), frame)
    assert (cb.callback_id, cb.job_id, cb.contact_id, cb.agent_id) == ("Default:17:2:c9", 17, "c9", "a1")
    assert cb.due_at == at.isoformat() and cb.note == "phone +33123"
    other = callback_of("Default", wrapup_agent(), WrapUp(req=5, call_id="call-x", completion_code="CALLBACK",
                                                          callback=CallbackRequest(at=at)))
    assert (other.job_id, other.contact_id, other.agent_id) == (17, "call-x", None)


async def test_states_are_coalesced_per_agent_and_kept_while_the_cache_is_down() -> None:
    cache = FakeCache()
    link = AgentCacheLink(cache, retry_s=0.01)  # type: ignore[arg-type]
    try:
        cache.down = True
        link.agent_changed(AgentSnapshot("a1", "Z", logged_in=True))
        for _ in range(20):
            await asyncio.sleep(0.005)
        assert link.info()["down"] and link.outages == 1 and link.info()["pending"] == 1
        link.agent_changed(AgentSnapshot("a1", "Z", logged_in=True, ready=True))  # replaces the pending state
        link.agent_changed(AgentSnapshot("a2", "Z", logged_in=True))
        cache.down = False
        for _ in range(200):
            if not link.info()["pending"]:
                break
            await asyncio.sleep(0.005)
        assert cache.agents["a1"].state == "Ready" and cache.agents["a2"].state == "Not Ready"
        # a1's older state may have been on its way when it changed: at most one write more
        assert cache.writes in (2, 3) and link.coalesced == 1 and not link.info()["down"] and link.outages == 1
    finally:
        await link.close()


async def test_a_refused_callback_comes_back_to_the_desktop_as_an_error_frame() -> None:
    cache = FakeCache()
    link = AgentCacheLink(cache)  # type: ignore[arg-type]
    session = FakeSession()
    frame = WrapUp(req=9, call_id="17:2:c9", completion_code="CALLBACK",
                   callback=CallbackRequest(at=datetime(2026, 12, 2, 9, 0, tzinfo=UTC)))
    cache.down = True
    link.wrap_up(session, "Default", wrapup_agent(), frame)  # type: ignore[arg-type]
    for _ in range(100):
        if session.sent:
            break
        await asyncio.sleep(0.005)
    [error] = session.sent
    assert isinstance(error, ErrorFrame) and error.req == 9 and error.code == "callback_refused" and not error.fatal
    assert error.reason.startswith("callback refused: set callback Default:17:2:c9")
    cache.down = False
    link.wrap_up(session, "Default", wrapup_agent(), frame)  # type: ignore[arg-type]
    for _ in range(100):
        if link.callbacks_stored:
            break
        await asyncio.sleep(0.005)
    assert "Default:17:2:c9" in cache.callbacks and len(session.sent) == 1
    link.wrap_up(session, "Default", wrapup_agent(), WrapUp(req=10, call_id="x", completion_code="SALE"))  # type: ignore[arg-type]
    await link.close()
    assert link.callbacks_refused == 1
