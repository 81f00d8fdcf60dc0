"""``python -m pom_ha.bench.agents_worker``: a share of the AM failover bench's desktops, in a process of its own.

One bench process answering 1000 desktops' STATE_QUERYs, logins and POM_AVAILABLEs on one event loop measured
itself (up to 0.4 s of a takeover was that loop's queue), so ``pom-ha bench failover --component am`` runs its
desktops in 2-4 of these workers (``DeskWorkers``) and measures the Agent Manager, not itself.

Protocol: JSON lines. The first line on stdin is the worker's configuration ``{"addresses": [[host, port], ...],
"agents": [...], "zone": ..., "job": ..., "batch": N, "reply_timeout_s": S}``. The worker logs its desktops in
``batch`` at a time (each READY + JOB_ATTACH), answers the calls offered to them, and prints ``{"ev": "ready",
"n": N}`` once every one is logged in, available, ready and attached (``{"ev": "failed", "error": ...}`` if not).
Then, per request line ``{"op": ..., "id": K, ...}`` it prints one reply ``{"id": K, ...}``:

* ``wait``, ``since``, ``master`` (or null), ``timeout_s``: replies once every desktop is available and its last
  ``POM_AVAILABLE`` came after ``since`` from ``master`` (any master when null): ``{"ok": true, "max_at": T,
  "masters": [...]}``, with ``T`` the latest of those ``POM_AVAILABLE`` stamps; ``{"ok": false, ...}`` with the
  counts at the timeout. Stamps are ``time.monotonic()``: CLOCK_MONOTONIC is one clock for every process on
  Linux, so they compare with the bench's own kill stamp.
* ``close``: closes the desktops, replies ``{"ok": true}`` and exits 0.

Logs (WARNING and up) go to stderr; stdout carries only the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

from pom_ha.desktop.client import DesktopClient, DesktopSettings, DesktopUnavailable, RequestRefused
from pom_ha.desktop.protocol import CallEvent, PomAvailable
from pom_ha.ha.logsetup import configure_logging

WAIT_POLL_S = 0.01  # how often a ``wait`` re-reads the desktops (the stamps are exact either way)


class BenchDesk:
    """A desktop that answers offered calls and stamps every POM_AVAILABLE it receives."""

    def __init__(self, addresses: list[tuple[str, int]], agent_id: str, zone: str,
                 reply_timeout_s: float = 10.0) -> None:
        settings = DesktopSettings(reply_timeout_s=reply_timeout_s)
        self.client = DesktopClient(addresses, agent_id, zone, settings=settings)
        self.available_at: float = 0.0  # monotonic time of the last POM_AVAILABLE
        self.master: str | None = None
        self._pump: asyncio.Task[None] | None = None
        self._answers: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self.client.start()
        self._pump = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            frame = await self.client.events.get()
            if isinstance(frame, PomAvailable):
                self.available_at, self.master = time.monotonic(), frame.master
            elif isinstance(frame, CallEvent) and frame.event == "offered":
                task = asyncio.create_task(self._answer(frame.call_id))
                self._answers.add(task)
                task.add_done_callback(self._answers.discard)

    async def _answer(self, call_id: str) -> None:
        with contextlib.suppress(DesktopUnavailable, RequestRefused):
            await self.client.call_event(call_id, "answered")

    def back(self, since: float, master: str | None) -> bool:
        return (self.client.available.is_set() and self.available_at > since
                and (master is None or self.master == master))

    async def close(self) -> None:
        await self.client.close()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump


async def prepare(desk: BenchDesk, job: str, timeout_s: float = 120.0) -> None:
    """READY + JOB_ATTACH, retried while the zone is (re)initialising (a loaded machine may flap a master)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            state = desk.client.last_state
            if state is None or not state.ready:
                await desk.client.ready()
            if state is None or state.job_id != job:
                await desk.client.job_attach(job)
            return
        except (DesktopUnavailable, RequestRefused) as exc:
            if isinstance(exc, RequestRefused) and exc.error.code == "invalid_transition":
                return  # already ready / attached
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def wait_back(desks: list[BenchDesk], since: float, master: str | None, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        back = sum(d.back(since, master) for d in desks)
        if back == len(desks):
            return {"ok": True, "max_at": max((d.available_at for d in desks), default=0.0),
                    "masters": sorted({d.master for d in desks if d.master is not None})}
        if time.monotonic() > deadline:
            return {"ok": False, "back": back, "n": len(desks),
                    "masters": sorted({d.master for d in desks if d.master is not None})}
        await asyncio.sleep(WAIT_POLL_S)


async def _log_in(desks: list[BenchDesk], job: str, batch: int, timeout_s: float = 120.0) -> None:
    for start in range(0, len(desks), batch):
        group = desks[start:start + batch]
        for d in group:
            d.start()
        deadline = time.monotonic() + timeout_s
        while not all(d.client.available.is_set() for d in group):
            if time.monotonic() > deadline:
                raise TimeoutError(f"desktops {start}..{start + len(group)} not logged in within {timeout_s:.0f} s")
            await asyncio.sleep(0.02)
        await asyncio.gather(*(prepare(d, job) for d in group))


async def serve(config: dict[str, Any], reader: asyncio.StreamReader, emit: Any) -> int:
    addresses = [(str(h), int(p)) for h, p in config["addresses"]]
    desks = [BenchDesk(addresses, str(a), str(config["zone"]), float(config.get("reply_timeout_s", 10.0)))
             for a in config["agents"]]
    try:
        try:
            await _log_in(desks, str(config["job"]), max(1, int(config.get("batch", 25))))
        except (TimeoutError, DesktopUnavailable, RequestRefused) as exc:
            emit({"ev": "failed", "error": f"{type(exc).__name__}: {exc}"})
            return 1
        emit({"ev": "ready", "n": len(desks)})
        waits: set[asyncio.Task[None]] = set()
        while line := await reader.readline():
            req = json.loads(line)
            op, rid = req.get("op"), req.get("id")
            if op == "wait":
                async def answer(req: dict[str, Any] = req, rid: Any = rid, desks: list[BenchDesk] = desks) -> None:
                    emit({"id": rid, **await wait_back(desks, float(req.get("since", 0.0)), req.get("master"),
                                                       float(req.get("timeout_s", 60.0)))})
                task = asyncio.create_task(answer())
                waits.add(task)
                task.add_done_callback(waits.discard)
            elif op == "close":
                for task in list(waits):
                    task.cancel()
                await asyncio.gather(*(d.close() for d in desks))
                desks = []
                emit({"id": rid, "ok": True})
                return 0
            else:
                emit({"id": rid, "ok": False, "error": f"unknown op {op!r}"})
        return 0  # the bench went away (stdin closed)
    finally:
        await asyncio.gather(*(d.close() for d in desks), return_exceptions=True)


async def amain() -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    first = await reader.readline()
    if not first:
        return 2
    out = sys.stdout

    def emit(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    return await serve(json.loads(first), reader, emit)


def main() -> int:
    configure_logging("WARNING")  # to stderr: a thousand desktops' info lines would cost the worker's loop
    return asyncio.run(amain())


if __name__ == "__main__":
    sys.exit(main())
