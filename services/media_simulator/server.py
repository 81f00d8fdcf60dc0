"""The media simulator's socket side: many client connections onto one :class:`MediaPlatform`.

Each connection is read frame by frame and answered in order. A malformed frame (bad wire framing, wrong
version or type, an ill-typed field of a non-DIAL frame) gets one ERROR frame and closes that connection
only; a DIAL with a readable ``attempt_id`` but a bad field is answered REJECTED bad_request and the
connection stays. Outcomes go to the connection that owns the call; a client whose send buffer passes
``max_buffer_bytes`` is too slow and is closed (its calls' outcomes are then held for their scope).
SIGTERM/SIGINT: stop listening, end calls in progress with NETWORK_FAILURE (delivered to their owners),
close every connection, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
from dataclasses import dataclass
from typing import Any

import structlog

from pom_ha.domain.attempts import CompletionCode
from pom_ha.ha.sdnotify import notify
from pom_ha.media.protocol import (
    Cancel,
    Claim,
    Dial,
    ErrorFrame,
    Outcome,
    ProtocolError,
    Rejected,
    SetMode,
    StatsRequest,
    parse_client_frame,
)
from pom_ha.media.simulator import MediaPlatform, Owner
from pom_ha.wire import WireError, encode, read_frame

log = structlog.get_logger("services.media_simulator")


@dataclass
class _Conn:
    ident: int
    peer: str
    writer: asyncio.StreamWriter
    closing: bool = False


class MediaSimulatorServer:
    def __init__(
        self, platform: MediaPlatform, host: str, port: int, *, server_name: str = "",
        summary_interval_s: float = 5.0, max_buffer_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self.platform = platform
        self.host, self.port = host, port
        self.summary_interval_s = summary_interval_s
        self.max_buffer_bytes = max_buffer_bytes
        self.conns: dict[int, _Conn] = {}
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._stopping = asyncio.Event()
        self._log = log.bind(server=server_name, service="media_simulator")
        platform.deliver = self._deliver

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=1 << 20, backlog=512)
        sock = self._server.sockets[0].getsockname()
        self.port = int(sock[1])
        self._log.info("media simulator listening", address=self.host, port=self.port,
                       capacity=self.platform.capacity, time_scale=self.platform.time_scale)

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or :meth:`request_stop`); returns the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        await self.start()
        notify("READY=1", f"STATUS=listening on {self.host}:{self.port}")
        summaries = asyncio.create_task(self._summaries(), name="media-summaries")
        try:
            await self._stopping.wait()
        finally:
            summaries.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await summaries
            await self.stop()
        return 0

    def request_stop(self, reason: str = "requested") -> None:
        if not self._stopping.is_set():
            self._log.info("stopping", reason=reason)
            self._stopping.set()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        dropped = self.platform.drop_all(CompletionCode.NETWORK_FAILURE)
        conns = list(self.conns.values())
        for conn in conns:
            self._close(conn)
        for conn in conns:
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(conn.writer.wait_closed(), 2.0)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._log.info("media simulator stopped", calls_dropped=dropped, **self._summary())

    def disconnect_all(self, *, stop_listening: bool = False) -> None:
        """Fault injection: close every client connection now (calls go on, their outcomes are held for
        their scope); with ``stop_listening`` also close the listener, as a crashed platform would."""
        if stop_listening and self._server is not None:
            self._server.close()
        for conn in list(self.conns.values()):
            self._close(conn)

    # ---- one connection ----------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        conn = _Conn(next(self._ids), f"{peer[0]}:{peer[1]}" if peer else "?", writer)
        self.conns[conn.ident] = conn
        self._log.info("client connected", conn=conn.ident, peer=conn.peer, connections=len(self.conns))
        reason = "end of stream"
        try:
            while not conn.closing:
                try:
                    obj = await read_frame(reader)
                    if obj is None:
                        break
                    self._handle(conn, obj)
                except (WireError, ProtocolError) as exc:
                    reason = f"malformed frame: {exc}"
                    self._log.warning("malformed frame, closing connection", conn=conn.ident, peer=conn.peer,
                                      error=str(exc))
                    self._send(conn, ErrorFrame(str(exc)).to_frame())
                    break
                if writer.transport.get_write_buffer_size() > 64 * 1024:
                    await writer.drain()
        except (ConnectionError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            self._close(conn)
            self._log.info("client disconnected", conn=conn.ident, peer=conn.peer, reason=reason,
                           connections=len(self.conns))

    def _handle(self, conn: _Conn, obj: dict[str, Any]) -> None:
        try:
            frame = parse_client_frame(obj)
        except ProtocolError as exc:
            if exc.attempt_id is None:
                raise
            self.platform.counters.rejected["bad_request"] += 1
            self._send(conn, Rejected(exc.attempt_id, "bad_request", str(exc)).to_frame())
            return
        if isinstance(frame, Dial):
            self._send(conn, self.platform.dial(frame, conn.ident).to_frame())
        elif isinstance(frame, Cancel):
            self.platform.cancel(frame.attempt_id)
        elif isinstance(frame, SetMode):
            self.platform.set_mode(frame.mode, drop_calls=frame.drop_calls)
            self._log.info("mode set", conn=conn.ident, mode=frame.mode, drop_calls=frame.drop_calls)
            self._send(conn, self.platform.stats(len(self.conns)).to_frame())
        elif isinstance(frame, StatsRequest):
            self._send(conn, self.platform.stats(len(self.conns)).to_frame())
        elif isinstance(frame, Claim):
            claimed = self.platform.claim(frame.scope, frame.epoch, conn.ident)
            self._log.info("scope claimed", conn=conn.ident, scope=frame.scope, epoch=frame.epoch,
                           granted=claimed.granted, delivered=claimed.delivered)
            self._send(conn, claimed.to_frame())

    # ---- sending -----------------------------------------------------------------------------------------
    def _deliver(self, owner: Owner, outcome: Outcome) -> bool:
        conn = self.conns.get(owner) if isinstance(owner, int) else None
        return conn is not None and self._send(conn, outcome.to_frame())

    def _send(self, conn: _Conn, frame: dict[str, Any]) -> bool:
        if conn.closing or conn.writer.transport.is_closing():
            return False
        conn.writer.write(encode(frame))
        if conn.writer.transport.get_write_buffer_size() > self.max_buffer_bytes:
            self._log.warning("client too slow, closing connection", conn=conn.ident, peer=conn.peer)
            self._close(conn)
        return True

    def _close(self, conn: _Conn) -> None:
        if self.conns.pop(conn.ident, None) is not None:
            self.platform.disconnect(conn.ident)
        conn.closing = True
        if not conn.writer.transport.is_closing():
            conn.writer.close()

    # ---- logs --------------------------------------------------------------------------------------------
    def _summary(self) -> dict[str, Any]:
        s = self.platform.stats(len(self.conns))
        return {"mode": s.mode, "dialed": s.dialed, "in_progress": s.in_progress, "peak": s.peak_in_progress,
                "completed": s.completed, "rejected": s.rejected, "orphans_held": s.orphans_held,
                "orphans_expired": s.orphans_expired, "connections": s.connections}

    async def _summaries(self) -> None:
        last: dict[str, Any] = {}
        while True:
            await asyncio.sleep(self.summary_interval_s)
            summary = self._summary()
            if summary != last:
                self._log.info("media counters", **summary)
            last = summary
