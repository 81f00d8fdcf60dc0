"""The Campaign Manager's side of the media-platform protocol: one connection to the first reachable platform.

``MediaClient(addresses)`` tries the addresses in order and keeps one connection, reconnecting with a
jittered backoff when it is lost (the first address that answers wins, so a recovered primary is used
again at the next reconnect). On every (re)connect, before any new DIAL goes out, it

- reports calls that were accepted by a *different* platform as lost: a local OUTCOME NETWORK_FAILURE
  with ``platform_lost=True`` (their real outcomes, if they ever arrive, are dropped);
- sends CLAIM for every scope it has calls in progress in or dialed in within ``claim_window_s``, so
  outcomes the platform held while the connection was down arrive now, and later ones arrive here.

``dial`` returns the platform's ACCEPTED or REJECTED. It raises :class:`MediaUnavailable` (retriable)
when no platform is connected within ``reply_timeout_s`` or the reply does not come: whether the call
was placed is then unknown; send the same ``attempt_id`` again — REJECTED ``duplicate`` means it was.
Outcomes go to ``on_outcome`` (awaited one at a time, in arrival order) or, without it, to ``outcomes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from pom_ha.ha.retry import Backoff
from pom_ha.media.protocol import (
    Accepted,
    Cancel,
    Claim,
    Claimed,
    Dial,
    ErrorFrame,
    Mode,
    Outcome,
    ProtocolError,
    Rejected,
    SetMode,
    StatsReply,
    StatsRequest,
    parse_platform_frame,
)
from pom_ha.wire import WireError, encode, read_frame

log = structlog.get_logger("pom_ha.media.client")
Address = tuple[str, int]
OnOutcome = Callable[[Outcome], Awaitable[None]]


class MediaError(Exception):
    retriable = False


class MediaUnavailable(MediaError):
    """No platform connection, or no reply in time; the command's fate is unknown."""

    retriable = True


class MediaClient:
    def __init__(
        self,
        addresses: list[Address],
        *,
        on_outcome: OnOutcome | None = None,
        outcomes: asyncio.Queue[Outcome] | None = None,
        reply_timeout_s: float = 2.0,
        connect_timeout_s: float = 1.0,
        claim_window_s: float = 300.0,
        backoff: Backoff | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("MediaClient needs at least one platform address")
        self.addresses = list(addresses)
        self.on_outcome = on_outcome
        self.outcomes: asyncio.Queue[Outcome] = outcomes if outcomes is not None else asyncio.Queue()
        self.reply_timeout_s = reply_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.claim_window_s = claim_window_s
        self.backoff = backoff or Backoff(initial_s=0.05, max_s=2.0)
        self.connected_to: Address | None = None
        self.reconnects = 0
        self.dropped_outcomes = 0
        self._writer: asyncio.StreamWriter | None = None
        self._up = asyncio.Event()
        self._closed = False
        self._pending: dict[str, tuple[Dial, asyncio.Future[Accepted | Rejected]]] = {}
        self._control: deque[tuple[type[Any], asyncio.Future[Any]]] = deque()
        self._in_flight: dict[str, tuple[Dial, Address]] = {}
        self._scopes: dict[str, tuple[int, float]] = {}  # scope -> (highest epoch used, last dial time)
        self._resolved_locally: OrderedDict[str, None] = OrderedDict()
        self._tasks: list[asyncio.Task[None]] = []

    # ---- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start connecting in the background (returns at once; see :meth:`wait_connected`)."""
        if not self._tasks:
            self._tasks.append(asyncio.create_task(self._run(), name="media-client"))
            if self.on_outcome is not None:
                self._tasks.append(asyncio.create_task(self._deliver(), name="media-client-outcomes"))

    async def wait_connected(self, timeout_s: float) -> Address:
        await self.start()
        try:
            await asyncio.wait_for(self._up.wait(), timeout_s)
        except TimeoutError:
            raise MediaUnavailable(f"no media platform reachable at {self.addresses} within {timeout_s} s") from None
        assert self.connected_to is not None
        return self.connected_to

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def __aenter__(self) -> MediaClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def in_flight(self) -> int:
        """Calls accepted and not yet reported."""
        return len(self._in_flight)

    # ---- commands ----------------------------------------------------------------------------------------
    async def dial(self, cmd: Dial) -> Accepted | Rejected:
        if cmd.attempt_id in self._pending:
            raise ValueError(f"attempt {cmd.attempt_id} already has a DIAL waiting for its reply")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reply_timeout_s
        writer = await self._writer_until(deadline)
        fut: asyncio.Future[Accepted | Rejected] = loop.create_future()
        self._pending[cmd.attempt_id] = (cmd, fut)
        epoch, _ = self._scopes.get(cmd.scope, (cmd.epoch, 0.0))
        self._scopes[cmd.scope] = (max(epoch, cmd.epoch), time.monotonic())
        try:
            writer.write(encode(cmd.to_frame()))
            if writer.transport.get_write_buffer_size() > 1 << 20:
                await writer.drain()
            return await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise MediaUnavailable(f"no reply to DIAL {cmd.attempt_id} within {self.reply_timeout_s} s") from None
        except OSError as exc:
            raise MediaUnavailable(f"DIAL {cmd.attempt_id} not sent: {exc}") from None
        finally:
            self._pending.pop(cmd.attempt_id, None)

    async def cancel(self, attempt_id: str) -> None:
        """Ask the platform to end a call; its OUTCOME (CANCELLED) confirms it. No reply otherwise."""
        writer = await self._writer_until(asyncio.get_running_loop().time() + self.reply_timeout_s)
        writer.write(encode(Cancel(attempt_id).to_frame()))

    async def set_mode(self, mode: Mode, *, drop_calls: bool = False) -> StatsReply:
        reply: StatsReply = await self._control_call(SetMode(mode, drop_calls), StatsReply)
        return reply

    async def stats(self) -> StatsReply:
        reply: StatsReply = await self._control_call(StatsRequest(), StatsReply)
        return reply

    async def claim(self, scope: str, epoch: int) -> Claimed:
        """Take over ``scope``'s calls on the platform (a CM taking a job over); refused if ``epoch`` is stale."""
        claimed: Claimed = await self._control_call(Claim(scope, epoch), Claimed)
        if claimed.granted:
            self._scopes[scope] = (max(epoch, self._scopes.get(scope, (epoch, 0.0))[0]), time.monotonic())
        else:
            self._forget(scope)
        return claimed

    def _forget(self, scope: str) -> None:
        """A newer epoch owns ``scope``: its calls report there now, not here."""
        self._scopes.pop(scope, None)
        for attempt_id in [a for a, (cmd, _) in self._in_flight.items() if cmd.scope == scope]:
            del self._in_flight[attempt_id]

    # ---- internals ---------------------------------------------------------------------------------------
    async def _writer_until(self, deadline: float) -> asyncio.StreamWriter:
        await self.start()
        loop = asyncio.get_running_loop()
        while self._writer is None or not self._up.is_set():
            if self._closed:
                raise MediaUnavailable("the media client is closed")
            try:
                await asyncio.wait_for(self._up.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise MediaUnavailable(f"no media platform connected (tried {self.addresses})") from None
        return self._writer

    async def _control_call(self, frame: SetMode | StatsRequest | Claim, reply: type[Any], *, resuming: bool = False,
                            ) -> Any:
        loop = asyncio.get_running_loop()
        if resuming:
            writer = self._writer
            assert writer is not None
        else:
            writer = await self._writer_until(loop.time() + self.reply_timeout_s)
        fut: asyncio.Future[Any] = loop.create_future()
        self._control.append((reply, fut))  # replies come in request order; a late one finds fut done
        writer.write(encode(frame.to_frame()))
        try:
            return await asyncio.wait_for(fut, self.reply_timeout_s)
        except TimeoutError:
            raise MediaUnavailable(f"no reply to {frame.TYPE} within {self.reply_timeout_s} s") from None

    async def _run(self) -> None:
        while not self._closed:
            connected = await self._connect_any()
            if connected is None:
                await self.backoff.wait()
                continue
            reader, writer, address = connected
            self.backoff.reset()
            self._writer, self.connected_to = writer, address
            reading = asyncio.create_task(self._read(reader), name="media-client-reader")
            try:
                await self._resume(address)
                self._up.set()
                log.info("media platform connected", address=f"{address[0]}:{address[1]}")
                await reading
            except (MediaError, OSError) as exc:
                log.warning("media platform resume failed", error=f"{type(exc).__name__}: {exc}")
            except Exception:
                log.exception("media client connection failed")
                await self.backoff.wait()
            finally:
                self._up.clear()
                self._writer = None
                reading.cancel()
                writer.close()
            self.reconnects += 1
            log.warning("media platform connection lost", address=f"{address[0]}:{address[1]}",
                        in_flight=len(self._in_flight))

    async def _connect_any(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Address] | None:
        for host, port in self.addresses:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, limit=1 << 20), self.connect_timeout_s)
            except (OSError, TimeoutError):
                continue
            return reader, writer, (host, port)
        return None

    async def _resume(self, address: Address) -> None:
        for attempt_id, (cmd, where) in list(self._in_flight.items()):
            if where != address:
                del self._in_flight[attempt_id]
                self._resolved_locally[attempt_id] = None
                if len(self._resolved_locally) > 100_000:
                    self._resolved_locally.popitem(last=False)
                self._emit(Outcome(
                    attempt_id=cmd.attempt_id, scope=cmd.scope, job=cmd.job, contact=cmd.contact,
                    attempt_no=cmd.attempt_no, epoch=cmd.epoch, code="NETWORK_FAILURE", answered=False,
                    duration_ms=0, platform_lost=True,
                ))
        now = time.monotonic()
        busy = {cmd.scope for cmd, _ in self._in_flight.values()}
        for scope, (epoch, last) in list(self._scopes.items()):
            if scope in busy or now - last < self.claim_window_s:
                claimed = await self._control_call(Claim(scope, epoch), Claimed, resuming=True)
                log.info("media scope reclaimed", scope=scope, epoch=epoch, granted=claimed.granted,
                         delivered=claimed.delivered)
                if not claimed.granted:
                    self._forget(scope)
            else:
                del self._scopes[scope]

    async def _read(self, reader: asyncio.StreamReader) -> None:
        address = self.connected_to
        try:
            await self._read_frames(reader, address)
        finally:
            self._up.clear()
            where = f"{address[0]}:{address[1]}" if address else "?"
            self._fail_waiters(MediaUnavailable(f"connection to {where} lost"))

    async def _read_frames(self, reader: asyncio.StreamReader, address: Address | None) -> None:
        while True:
            try:
                obj = await read_frame(reader)
                if obj is None:
                    return
                frame = parse_platform_frame(obj)
            except (WireError, ProtocolError) as exc:
                log.error("bad frame from media platform", error=str(exc))
                return
            except OSError:
                return
            if isinstance(frame, Accepted | Rejected):
                waiting = self._pending.get(frame.attempt_id)
                if waiting is not None and address is not None:
                    if isinstance(frame, Accepted):
                        self._in_flight[frame.attempt_id] = (waiting[0], address)
                    if not waiting[1].done():
                        waiting[1].set_result(frame)
            elif isinstance(frame, Outcome):
                if frame.attempt_id in self._resolved_locally:
                    self.dropped_outcomes += 1
                    continue
                self._in_flight.pop(frame.attempt_id, None)
                self._emit(frame)
            elif isinstance(frame, ErrorFrame):
                log.error("media platform closed the connection", reason=frame.reason)
                return
            else:
                self._control_reply(frame)

    def _control_reply(self, frame: StatsReply | Claimed) -> None:
        if not self._control:
            log.warning("unexpected reply from media platform", type=frame.TYPE)
            return
        expected, fut = self._control.popleft()
        if fut.done():
            return
        if isinstance(frame, expected):
            fut.set_result(frame)
        else:
            fut.set_exception(MediaError(f"expected {expected.TYPE}, got {frame.TYPE}"))

    def _emit(self, outcome: Outcome) -> None:
        self.outcomes.put_nowait(outcome)

    def _fail_waiters(self, exc: MediaError) -> None:
        for _, fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        while self._control:
            _, cfut = self._control.popleft()
            if not cfut.done():
                cfut.set_exception(exc)

    async def _deliver(self) -> None:
        assert self.on_outcome is not None
        while True:
            outcome = await self.outcomes.get()
            try:
                await self.on_outcome(outcome)
            except Exception:
                log.exception("on_outcome failed", attempt_id=outcome.attempt_id)
