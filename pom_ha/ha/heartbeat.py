"""TCP heartbeats between the instances of one service: fast failure detection, never arbitration.

Every daemon instance runs one :class:`HeartbeatNode`: a server socket on its POM server's address (the
endpoint published in ``ha_member.endpoint`` / ``ha_lease.holder_endpoint``) and one client connection to
each peer's endpoint. A client sends HELLO, gets HELLO back, then PINGs every ``heartbeat_interval_ms``;
the server answers each PING with a PONG carrying the same ``seq`` (the client's RTT sample). Either side
closes a connection that stays silent for ``heartbeat_interval_ms * heartbeat_miss_limit``, and a client
reconnects with backoff. A protocol error (oversized frame, bad JSON, unknown version/type) closes only
the connection it arrived on. GOODBYE, sent on a graceful stop, marks the sender as gone at once.

A peer is *gone* when it said GOODBYE, when no connection with it is open, or when it sent nothing for
``heartbeat_dead_after_s``. Two questions the elector asks (see :mod:`pom_ha.ha.election`):

* dormant side, :meth:`HeartbeatNode.failure_corroborated`: was the master seen and is it gone now?
  (a peer never seen corroborates nothing: a freshly started dormant waits for the lease to expire);
* master side, :meth:`HeartbeatNode.confirmed_until`: until when can no peer have called us gone by
  silence? Each PONG proves the peer heard our PING at its send time; a peer waits
  ``heartbeat_dead_after_s`` of silence, so we are safe until the oldest peer's last acknowledged PING
  plus ``heartbeat_fresh_s``. A peer we cannot reach, or one known only from an incoming connection,
  confirms nothing.

The database, not this module, decides who is master.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import structlog

from pom_ha.ha.heartbeat_frames import Frame, FrameError, FrameType, encode_frame, read_frame
from pom_ha.ha.retry import Backoff
from pom_ha.ha.settings import HATimings

log = structlog.get_logger("pom_ha.ha.heartbeat")
_NET_ERRORS = (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError)


@dataclass
class PeerState:
    """What this node knows of one peer instance (times on this node's monotonic clock)."""

    instance: str
    server: str = ""
    endpoint: str | None = None
    epoch: int = 0
    #: the sender's ``t`` of the frame ``epoch`` came from: frames of two connections may cross, the newest wins
    epoch_t: int = -1
    alive_since: float | None = None
    last_frame_at: float | None = None
    said_goodbye: bool = False
    connections: int = 0
    rtt_s: float | None = None
    #: send time of the newest of our PINGs this peer answered: it had heard from us by then
    acked_at: float | None = None
    ever_seen: bool = False

    def gone(self, now: float, dead_after_s: float) -> bool:
        return (
            self.said_goodbye
            or self.connections == 0
            or self.last_frame_at is None
            or now - self.last_frame_at > dead_after_s
        )


@dataclass(eq=False)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    incoming: bool
    peer: str | None = None
    sent: dict[int, float] = field(default_factory=dict)


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"heartbeat endpoint must be host:port, got {endpoint!r}")
    return host, int(port)


def _closer(writer: asyncio.StreamWriter) -> Callable[[asyncio.Task[None]], None]:
    def close(_task: asyncio.Task[None]) -> None:
        writer.close()

    return close


class HeartbeatNode:
    """Heartbeat server + clients of one daemon instance for one service."""

    def __init__(
        self, *, server: str, instance: str, service: str, host: str, timings: HATimings, port: int = 0,
        epoch: Callable[[], int] = lambda: 0, server_ssl: ssl.SSLContext | None = None,
        client_ssl: ssl.SSLContext | None = None, clock: Callable[[], float] = time.monotonic,
        on_rtt: Callable[[str, float], None] | None = None, on_change: Callable[[str], None] | None = None,
    ) -> None:
        self.server_name = server
        self.instance = instance
        self.service = service
        self.host = host
        self.port = port
        self.timings = timings
        self._epoch = epoch
        self._server_ssl = server_ssl
        self._client_ssl = client_ssl
        self._clock = clock
        self._on_rtt = on_rtt
        self._on_change = on_change
        self.peers: dict[str, PeerState] = {}
        self._clients: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self._conns: set[_Connection] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._closing = False
        self.protocol_errors = 0
        self.endpoint: str | None = None
        self._log = log.bind(server=server, service=service)

    # ---- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> str:
        """Bind the server socket; returns the endpoint ``host:port`` (the real port when ``port=0``)."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port, ssl=self._server_ssl)
        port = self._server.sockets[0].getsockname()[1]
        self.endpoint = f"{self.host}:{port}"
        self._log.info("heartbeat server listening", endpoint=self.endpoint, tls=self._server_ssl is not None)
        return self.endpoint

    async def goodbye(self) -> int:
        """Tell every connected peer we are leaving (graceful stop); returns how many connections were told."""
        self._closing = True
        told = 0
        for conn in list(self._conns):
            with contextlib.suppress(*_NET_ERRORS, FrameError):
                await self._send(conn, "GOODBYE")
                told += 1
        return told

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        tasks = [t for _, t in self._clients.values()] + list(self._handlers)
        self._clients.clear()
        for conn in list(self._conns):
            conn.writer.close()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, *_NET_ERRORS):
                await task
        if self._server is not None:
            with contextlib.suppress(*_NET_ERRORS):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    # ---- peers -------------------------------------------------------------------------------------------
    def set_peers(self, peers: Mapping[str, tuple[str, str]]) -> None:
        """Keep one client connection per peer ``instance -> (server, endpoint)``; others are dropped."""
        if self._closing:
            return
        for instance, (endpoint, task) in list(self._clients.items()):
            if instance not in peers or peers[instance][1] != endpoint:
                task.cancel()
                del self._clients[instance]
        for instance in [i for i, st in self.peers.items() if i not in peers and st.connections == 0]:
            del self.peers[instance]  # a member that left the table and has no connection to us
        for instance, (server, endpoint) in peers.items():
            if instance == self.instance or instance in self._clients:
                continue
            state = self.peers.setdefault(instance, PeerState(instance))
            state.server, state.endpoint = server, endpoint
            task = asyncio.create_task(self._client(instance, endpoint), name=f"heartbeat-client-{server}")
            self._clients[instance] = (endpoint, task)

    def peer(self, instance: str) -> PeerState | None:
        return self.peers.get(instance)

    def peer_gone(self, instance: str) -> bool:
        state = self.peers.get(instance)
        return state is None or state.gone(self._clock(), self.timings.heartbeat_dead_after_s)

    def failure_corroborated(self, instance: str) -> bool:
        """The peer was seen alive earlier and is gone now (GOODBYE, connections closed, or silent)."""
        state = self.peers.get(instance)
        return state is not None and state.ever_seen and state.gone(self._clock(), self.timings.heartbeat_dead_after_s)

    def stepped_down(self, instance: str) -> bool:
        """The peer is alive and its newest frame says it is master of nothing in this service (epoch 0).

        A master only sends epoch 0 after its term ended (demotion, or self-demotion when it could not renew),
        so a dormant may count this as a corroborated failure of that master's lease: the take-over is still
        the store's CAS on renewals stopped for ``takeover_stale_renewals`` intervals.
        """
        state = self.peers.get(instance)
        return (
            state is not None and state.ever_seen and state.epoch_t >= 0 and state.epoch == 0
            and not state.gone(self._clock(), self.timings.heartbeat_dead_after_s)
        )

    def confirmed_until(self) -> float:
        """Monotonic time until which no peer can have called this node gone by silence.

        ``inf`` without peers; ``-inf`` when a peer (listed or connected, not departed) never acknowledged a PING.
        """
        until = float("inf")
        for instance, state in self.peers.items():
            if state.said_goodbye or (instance not in self._clients and state.connections == 0):
                continue
            if state.acked_at is None:
                return float("-inf")
            until = min(until, state.acked_at + self.timings.heartbeat_fresh_s)
        return until

    def alive_peers(self) -> list[str]:
        return sorted(i for i in self.peers if not self.peer_gone(i))

    # ---- frames --------------------------------------------------------------------------------------------
    def _frame(self, kind: FrameType, seq: int) -> Frame:
        return Frame(
            type=kind, server=self.server_name, instance=self.instance, service=self.service,
            epoch=self._epoch(), seq=seq, t=int(self._clock() * 1000),
        )

    async def _send(self, conn: _Connection, kind: FrameType, seq: int = 0) -> None:
        conn.writer.write(encode_frame(self._frame(kind, seq), self.timings.heartbeat_max_frame_bytes))
        async with asyncio.timeout(self.timings.heartbeat_dead_after_s):
            await conn.writer.drain()

    async def _read(self, conn: _Connection) -> Frame | None:
        async with asyncio.timeout(self.timings.heartbeat_dead_after_s):
            return await read_frame(conn.reader, self.timings.heartbeat_max_frame_bytes)

    def _changed(self, instance: str) -> None:
        if self._on_change is not None:
            self._on_change(instance)

    def _attach(self, conn: _Connection, hello: Frame) -> None:
        conn.peer = hello.instance
        self._conns.add(conn)
        state = self.peers.setdefault(hello.instance, PeerState(hello.instance))
        state.server = hello.server
        state.said_goodbye = False
        state.ever_seen = True
        state.connections += 1
        self._seen(hello)

    def _detach(self, conn: _Connection) -> None:
        if conn in self._conns:
            self._conns.discard(conn)
            state = self.peers.get(conn.peer or "")
            if state is not None:
                state.connections = max(0, state.connections - 1)
                if state.connections == 0:
                    state.alive_since = None
                    self._changed(state.instance)
        conn.writer.close()

    def _seen(self, frame: Frame) -> None:
        state = self.peers[frame.instance]
        now = self._clock()
        if state.alive_since is None or state.last_frame_at is None or (
            now - state.last_frame_at > self.timings.heartbeat_dead_after_s
        ):
            state.alive_since = now
        state.last_frame_at = now
        if frame.t >= state.epoch_t:
            was = state.epoch
            state.epoch, state.epoch_t = frame.epoch, frame.t
            if was and not frame.epoch:
                self._changed(state.instance)  # it stepped down: dormants look at once

    async def _read_loop(self, conn: _Connection) -> None:
        while True:
            frame = await self._read(conn)
            if frame is None:
                return
            if frame.instance != conn.peer:
                raise FrameError(f"instance changed mid-connection: {conn.peer!r} -> {frame.instance!r}")
            self._seen(frame)
            if frame.type == "PING":
                await self._send(conn, "PONG", frame.seq)
            elif frame.type == "PONG":
                sent = conn.sent.pop(frame.seq, None)
                if sent is not None:
                    rtt = self._clock() - sent
                    state = self.peers[frame.instance]
                    state.rtt_s = rtt
                    state.acked_at = sent if state.acked_at is None else max(state.acked_at, sent)
                    if self._on_rtt is not None:
                        self._on_rtt(frame.server, rtt)
            elif frame.type == "GOODBYE":
                self.peers[frame.instance].said_goodbye = True
                self._log.info("peer said goodbye", peer=frame.server, peer_instance=frame.instance)
                self._changed(frame.instance)
                return
            else:
                raise FrameError("HELLO after the handshake")

    def _check_hello(self, frame: Frame | None, expect_instance: str | None) -> Frame:
        if frame is None:
            raise ConnectionError("peer closed before HELLO")
        if frame.type != "HELLO":
            raise FrameError(f"first frame must be HELLO, got {frame.type}")
        if frame.service != self.service:
            raise FrameError(f"peer serves {frame.service!r}, not {self.service!r}")
        if expect_instance is not None and frame.instance != expect_instance:
            raise FrameError(f"endpoint now answers as instance {frame.instance!r}, not {expect_instance!r}")
        return frame

    def _protocol_error(self, conn: _Connection, exc: FrameError) -> None:
        self.protocol_errors += 1
        peer = self.peers.get(conn.peer or "")
        self._log.warning(
            "heartbeat protocol error, closing that connection", error=str(exc), incoming=conn.incoming,
            peer=peer.server if peer else None, peer_instance=conn.peer,
        )

    # ---- server side ---------------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        conn = _Connection(reader, writer, incoming=True)
        try:
            hello = self._check_hello(await self._read(conn), None)
            if self._closing:
                return
            self._attach(conn, hello)
            await self._send(conn, "HELLO")
            await self._read_loop(conn)
        except FrameError as exc:
            self._protocol_error(conn, exc)
        except _NET_ERRORS:
            pass
        finally:
            self._detach(conn)
            if task is not None:
                self._handlers.discard(task)

    # ---- client side -----------------------------------------------------------------------------------------
    async def _client(self, instance: str, endpoint: str) -> None:
        backoff = Backoff(
            initial_s=self.timings.heartbeat_interval_s / 5, max_s=max(1.0, self.timings.heartbeat_dead_after_s)
        )
        host, port = split_endpoint(endpoint)
        while not self._closing:
            conn: _Connection | None = None
            try:
                async with asyncio.timeout(self.timings.heartbeat_dead_after_s):
                    reader, writer = await asyncio.open_connection(
                        host, port, ssl=self._client_ssl, server_hostname=host if self._client_ssl else None
                    )
                conn = _Connection(reader, writer, incoming=False)
                await self._send(conn, "HELLO")
                hello = self._check_hello(await self._read(conn), instance)
                self._attach(conn, hello)
                backoff.reset()
                pinger = asyncio.create_task(self._ping_loop(conn))
                # a PING that cannot be sent ends the connection now rather than at the read timeout
                pinger.add_done_callback(_closer(conn.writer))
                try:
                    await self._read_loop(conn)
                finally:
                    pinger.cancel()
                    with contextlib.suppress(asyncio.CancelledError, *_NET_ERRORS):
                        await pinger
            except FrameError as exc:
                if conn is not None:
                    self._protocol_error(conn, exc)
            except _NET_ERRORS:
                pass
            finally:
                if conn is not None:
                    self._detach(conn)
            if not self._closing:
                await backoff.wait()

    async def _ping_loop(self, conn: _Connection) -> None:
        seq = 0
        horizon = 2 * self.timings.heartbeat_dead_after_s
        while True:
            seq += 1
            now = self._clock()
            conn.sent[seq] = now
            for old in [s for s, at in conn.sent.items() if now - at > horizon]:
                del conn.sent[old]
            await self._send(conn, "PING", seq)
            await asyncio.sleep(self.timings.heartbeat_interval_s)
