"""The Agent Manager's side of the cache service (docs/cache-service.md): best-effort, never in a desktop's reply.

- **Agent states.** Every change the AM persists (``ZoneRuntime.persist`` and the batch writes of a takeover
  or a zone reset) calls :meth:`AgentCacheLink.agent_changed`, which only records the agent's latest state
  and wakes one background task; that task writes ``set_agent_state`` per agent, coalesced (an agent that
  changed five times since the last write is written once, with its latest state). A desktop's ``OK`` never
  waits for the cache. While every cache node is down (``AgentStateUnavailable``) the states are kept and
  written again when the cache answers; the outage is logged once, and once more when it is over.
- **Callbacks.** A ``WRAP_UP`` that books a callback completes as usual (``OK`` + ``AGENT_STATE``); then
  the callback is stored with ``set_callback`` by a task of its own. When the cache refuses it
  (``CallbackRefused``: every node down, or the cache being rebuilt) the desktop gets
  ``ERROR {req: <the WRAP_UP's req>, code: "callback_refused", reason: "callback refused: ...", fatal: false}``
  (docs/desktop-protocol.md) — the agent knows the callback was not booked and can book it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import structlog

from pom_ha.cache import AgentEntry, AgentStateUnavailable, Callback, CallbackRefused, OperationalCache
from pom_ha.desktop.protocol import ErrorFrame, WrapUp
from pom_ha.domain.agents import AgentSnapshot, CallState

if TYPE_CHECKING:
    from services.agent_manager.session import Session

log = structlog.get_logger("services.agent_manager.cache_link")


def agent_entry(snap: AgentSnapshot) -> AgentEntry:
    """The cache's view of an agent: ``Logged Out``, ``Ready`` / ``Not Ready`` while Idle, else its call
    state (``Talking``, ``Wrapup``, ...); the job when its id is a job number."""
    if not snap.logged_in:
        state = "Logged Out"
    elif snap.call_state is CallState.IDLE:
        state = "Ready" if snap.ready else "Not Ready"
    else:
        state = snap.call_state.value
    job = int(snap.job_id) if snap.job_id is not None and snap.job_id.isdigit() else None
    return AgentEntry(snap.agent_id, state, snap.zone, job, time.time())


def callback_of(zone: str, agent: AgentSnapshot, frame: WrapUp) -> Callback:
    """The callback a ``WRAP_UP`` books. A Campaign Manager call id is ``<job>:<attempt>:<contact>``; other
    calls give the agent's job (when a number) and the call id as the contact. The key is the zone and the
    call, so a retried write lands on the same entry."""
    assert frame.callback is not None
    parts = frame.call_id.split(":", 2)
    if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
        job, contact = int(parts[0]), parts[2]
    else:
        job = int(agent.job_id) if agent.job_id is not None and agent.job_id.isdigit() else 0
        contact = frame.call_id
    note = f"phone {frame.callback.phone}" if frame.callback.phone else ""
    return Callback(f"{zone}:{frame.call_id}", job, contact, agent.agent_id if frame.callback.agent_specific else None,
                    frame.callback.at.isoformat(), note)


class AgentCacheLink:
    """One per Agent Manager. Its task starts with the first change (inside the daemon's event loop)."""

    def __init__(self, cache: OperationalCache, *, retry_s: float = 1.0) -> None:
        self.cache = cache
        self.retry_s = retry_s
        self._latest: dict[tuple[str, str], AgentEntry] = {}  # (zone, agent) -> its state not written yet
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._callbacks: set[asyncio.Task[None]] = set()
        self.written = 0
        self.coalesced = 0
        self.refused = 0
        self.outages = 0
        self.down_since: float | None = None
        self.callbacks_stored = 0
        self.callbacks_refused = 0
        self.last_error: str | None = None

    # ---- hooks (never wait) ------------------------------------------------------------------------------
    def agent_changed(self, snap: AgentSnapshot) -> None:
        key = (snap.zone, snap.agent_id)
        if key in self._latest:
            self.coalesced += 1
        self._latest[key] = agent_entry(snap)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="am-cache-agents")

    def wrap_up(self, session: Session, zone: str, before: AgentSnapshot, frame: WrapUp) -> None:
        """After a WRAP_UP's OK: its callback (if any) to the cache; a refusal goes back to the desktop."""
        if frame.callback is None:
            return
        task = asyncio.get_running_loop().create_task(self._store_callback(session, callback_of(zone, before, frame),
                                                                           frame.req), name="am-cache-callback")
        self._callbacks.add(task)
        task.add_done_callback(self._callbacks.discard)

    # ---- tasks -------------------------------------------------------------------------------------------
    async def _store_callback(self, session: Session, cb: Callback, req: int | str) -> None:
        try:
            await self.cache.set_callback(cb)
        except CallbackRefused as exc:
            self.callbacks_refused += 1
            log.warning("callback refused by the cache; the agent is told", callback=cb.callback_id, error=str(exc))
            with contextlib.suppress(OSError, ConnectionError, RuntimeError):
                await session.send(ErrorFrame(req=req, code="callback_refused", reason=str(exc)[:2000], fatal=False))
            return
        self.callbacks_stored += 1

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            for key in list(self._latest):
                entry = self._latest.get(key)
                if entry is None:
                    continue
                try:
                    await self.cache.set_agent_state(entry)
                except AgentStateUnavailable as exc:
                    self.refused += 1
                    self.last_error = str(exc)
                    if self.down_since is None:
                        self.down_since = time.time()
                        self.outages += 1
                        log.warning("agent states not updated in the cache; desktops are not affected",
                                    error=str(exc))
                    self._wake.set()  # everything still pending is tried again after a pause
                    await asyncio.sleep(self.retry_s)
                    break
                if self._latest.get(key) is entry:  # not changed again meanwhile
                    del self._latest[key]
                self.written += 1
                if self.down_since is not None:
                    log.info("agent states reach the cache again", down_s=round(time.time() - self.down_since, 1))
                    self.down_since = None

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._callbacks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.cache.close()

    def info(self) -> dict[str, Any]:
        return {"written": self.written, "coalesced": self.coalesced, "pending": len(self._latest),
                "refused": self.refused, "outages": self.outages, "down": self.down_since is not None,
                "callbacks_stored": self.callbacks_stored, "callbacks_refused": self.callbacks_refused,
                "last_error": self.last_error}
