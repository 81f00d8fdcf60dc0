"""One desktop connection of the Agent Manager: frames out one at a time, heartbeats without waiting, and the
zone runtime the agent is logged in to (``attach`` / ``detach``)."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from typing import Any

from pom_ha.desktop.protocol import Frame

HEARTBEAT_BUFFER_LIMIT = 256 * 1024
DRAIN_ABOVE = 64 * 1024


class Session:
    """One desktop connection. Frames to the desktop go out one at a time (a lock per connection)."""

    _ids = itertools.count(1)

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.session_id = f"s{next(self._ids)}-{uuid.uuid4().hex[:6]}"
        self.agent_id: str | None = None
        self.runtime: Any = None  # the ZoneRuntime (services/agent_manager/zone.py) the agent is logged in to
        self.closed = False
        self.beating = False  # logged in: the daemon's heartbeat ticker writes to it
        self._lock = asyncio.Lock()

    def attach(self, runtime: Any, agent_id: str) -> None:
        self.runtime, self.agent_id = runtime, agent_id

    def detach(self) -> None:
        self.runtime, self.agent_id = None, None

    async def send(self, frame: Frame) -> None:
        await self.send_bytes(frame.to_bytes())

    async def send_bytes(self, data: bytes) -> None:
        """One whole frame, in call order; waits (at most 1 s) only while the peer's buffer is over
        DRAIN_ABOVE: a takeover sends a few frames to every desktop, a wait per frame is wasted there."""
        if self.closed:
            return
        try:
            self.writer.write(data)
            if self.writer.transport.get_write_buffer_size() > DRAIN_ABOVE:
                async with self._lock, asyncio.timeout(1.0):
                    await self.writer.drain()
        except (ConnectionError, OSError, TimeoutError):
            self.abort()

    def write_nowait(self, data: bytes) -> None:
        """A whole frame appended to the transport without waiting (heartbeats); a peer that stopped reading
        (its buffer over HEARTBEAT_BUFFER_LIMIT) is aborted."""
        if self.closed:
            return
        if self.writer.transport.get_write_buffer_size() > HEARTBEAT_BUFFER_LIMIT:
            self.abort()
            return
        self.writer.write(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.transport.abort()
