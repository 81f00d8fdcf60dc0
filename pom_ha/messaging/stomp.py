"""An asyncio STOMP 1.2 client for ActiveMQ Classic master/slave with every wait bounded.

Only the master broker opens its STOMP connector (the slave waits on the JDBC lease and binds nothing),
so "failover" is: try every address of the broker list in turn until one answers CONNECT, for as long as
the caller's deadline allows. A SEND is *confirmed* only by its RECEIPT (the broker has it in its
persistent store); a SEND whose connection breaks before the receipt has an unknown fate and raises
:class:`StompUnavailable` — the caller decides whether to send it again (the runtime-change messages carry
a request id so a second copy is recognised and not applied twice).

Subscriptions are remembered and made again on every new connection (after a broker failover), with
``ack: client-individual``: a message is ACKed only after its handler returned, so one that was being
handled when the broker died is delivered again by the new master.

stomp.py is not used: its receipt and message waits have no deadline and it runs its own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger("pom_ha.messaging.stomp")

Address = tuple[str, int]
Handler = Callable[["Frame"], Awaitable[None]]
MAX_FRAME = 4 * 1024 * 1024  # bytes of one frame we accept


class StompError(Exception):
    """The broker refused something (an ERROR frame)."""


class StompUnavailable(Exception):
    """No broker of the list accepted the connection / confirmed the frame within the deadline."""


@dataclass(frozen=True)
class Frame:
    command: str
    headers: dict[str, str]
    body: str = ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n").replace(":", "\\c")


def _unescape(value: str) -> str:
    out, i = [], 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            out.append({"n": "\n", "r": "\r", "c": ":", "\\": "\\"}.get(value[i + 1], value[i + 1]))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def encode_frame(command: str, headers: dict[str, str], body: str = "") -> bytes:
    data = body.encode()
    escape = command != "CONNECT"  # STOMP 1.2: CONNECT headers are not escaped
    head = "".join(f"{_escape(k) if escape else k}:{_escape(str(v)) if escape else v}\n" for k, v in headers.items())
    if body:
        head += f"content-length:{len(data)}\n"
    return f"{command}\n{head}\n".encode() + data + b"\0"


def decode_frame(raw: bytes) -> Frame | None:
    """``raw`` without its NUL; None for a heart-beat (only EOLs)."""
    text = raw.decode("utf-8", errors="replace").lstrip("\r\n")
    if not text:
        return None
    head, _, body = text.partition("\n\n")
    command, *lines = head.replace("\r\n", "\n").split("\n")
    headers: dict[str, str] = {}
    for line in lines:
        if ":" in line:
            k, _, v = line.partition(":")
            headers.setdefault(_unescape(k), _unescape(v))  # the first of repeated headers wins
    return Frame(command, headers, body)


@dataclass
class _Subscription:
    sub_id: str
    destination: str
    handler: Handler
    selector: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class StompCounts:
    connects: int = 0
    failovers: int = 0  # connections made after a previous one was lost
    sent: int = 0  # confirmed by a receipt
    send_failed: int = 0
    received: int = 0
    handler_errors: int = 0


class StompClient:
    """One connection at a time to the broker that answers (the master), failing over across ``addresses``.

    ``await client.start()`` keeps a connection up in the background (reconnecting and resubscribing);
    ``await client.connect(timeout_s)`` is the one-shot form for a command-line client.
    """

    def __init__(self, addresses: Sequence[Address], *, name: str = "pom-ha", connect_timeout_s: float = 2.0,
                 login: str | None = None, passcode: str | None = None) -> None:
        if not addresses:
            raise ValueError("no ActiveMQ broker address given")
        self.addresses = list(addresses)
        self.name = name
        self.connect_timeout_s = connect_timeout_s
        self._login, self._passcode = login, passcode
        self.counts = StompCounts()
        self.connected_to: Address | None = None
        self.connected = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._receipts: dict[str, asyncio.Future[Frame]] = {}
        self._subs: dict[str, _Subscription] = {}
        self._ids = itertools.count(1)
        self._send_lock = asyncio.Lock()
        self._lost = asyncio.Event()
        self._closing = False
        self._ever_connected = False
        self._handlers: set[asyncio.Task[None]] = set()
        self._log = log.bind(client=name)

    # ---- connection ---------------------------------------------------------------------------------------
    async def connect(self, timeout_s: float) -> Address:
        """Connect to the first broker of the list that answers CONNECT, trying the list again until
        ``timeout_s`` has passed; raises :class:`StompUnavailable` naming what each broker said."""
        deadline = time.monotonic() + timeout_s
        errors: dict[str, str] = {}
        while True:
            for host, port in self.addresses:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    await self._open(host, port, min(self.connect_timeout_s, left))
                    return host, port
                except (OSError, TimeoutError, StompError, asyncio.IncompleteReadError) as exc:
                    errors[f"{host}:{port}"] = f"{type(exc).__name__}: {exc}".rstrip(": ")
            if time.monotonic() >= deadline:
                raise StompUnavailable(
                    f"no ActiveMQ broker accepted a connection within {timeout_s:g} s ("
                    + "; ".join(f"{a} {e}" for a, e in errors.items()) + ")")
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    async def _open(self, host: str, port: int, timeout_s: float) -> None:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=MAX_FRAME), timeout_s)
        try:
            headers = {"accept-version": "1.2", "host": "pomha", "heart-beat": "0,0", "client-id": self.name}
            if self._login is not None:
                headers["login"] = self._login
                headers["passcode"] = self._passcode or ""
            writer.write(encode_frame("CONNECT", headers))
            await writer.drain()
            raw = await asyncio.wait_for(reader.readuntil(b"\0"), timeout_s)
            frame = decode_frame(raw[:-1])
            if frame is None or frame.command != "CONNECTED":
                msg = frame.headers.get("message", frame.command) if frame else "no answer"
                raise StompError(f"CONNECT refused: {msg}")
        except BaseException:
            writer.close()
            raise
        self._writer = writer
        self.connected_to = (host, port)
        self.counts.connects += 1
        if self._ever_connected:
            self.counts.failovers += 1
        self._ever_connected = True
        self._lost.clear()
        self._reader_task = asyncio.create_task(self._read_loop(reader), name=f"stomp-read-{self.name}")
        for sub in self._subs.values():
            await self._write(self._subscribe_frame(sub))
        self.connected.set()
        # a daemon's connections are worth a line; a one-shot (CLI) client's are not
        (self._log.info if self._keeper is not None else self._log.debug)(
            "connected to ActiveMQ", broker=f"{host}:{port}", subscriptions=len(self._subs),
            failovers=self.counts.failovers)

    async def start(self) -> StompClient:
        """Keep a connection up in the background (reconnect, resubscribe) until :meth:`close`."""
        self._keeper = asyncio.create_task(self._keep_connected(), name=f"stomp-keeper-{self.name}")
        return self

    async def _keep_connected(self) -> None:
        warned = False
        while not self._closing:
            if self._writer is None:
                try:
                    await self.connect(5.0)
                    warned = False
                except StompUnavailable as exc:
                    if not warned:
                        self._log.warning("no ActiveMQ broker reachable, retrying", error=str(exc))
                        warned = True
                    continue
            await self._lost.wait()

    def _connection_lost(self, why: str) -> None:
        if self._writer is None:
            return
        if not self._closing:
            self._log.warning("ActiveMQ connection lost", broker=self.connected_to, reason=why)
        with contextlib.suppress(Exception):
            self._writer.close()
        self._writer = None
        self.connected_to = None
        self.connected.clear()
        for fut in self._receipts.values():
            if not fut.done():
                fut.set_exception(StompUnavailable(f"connection to the broker lost before the receipt ({why})"))
        self._receipts.clear()
        self._lost.set()

    async def close(self) -> None:
        self._closing = True
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.write(encode_frame("DISCONNECT", {}))
                await asyncio.wait_for(self._writer.drain(), 1.0)
        self._connection_lost("closed")
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def __aenter__(self) -> StompClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    # ---- frames -------------------------------------------------------------------------------------------
    async def _write(self, data: bytes) -> None:
        writer = self._writer
        if writer is None:
            raise StompUnavailable("not connected to an ActiveMQ broker")
        async with self._send_lock:
            try:
                writer.write(data)
                await asyncio.wait_for(writer.drain(), 5.0)
            except (OSError, TimeoutError) as exc:
                self._connection_lost(f"{type(exc).__name__}: {exc}")
                raise StompUnavailable(f"write to the broker failed: {exc}") from None

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        why = "closed by the broker"
        try:
            while True:
                raw = await reader.readuntil(b"\0")
                frame = decode_frame(raw[:-1])
                if frame is not None:
                    self._dispatch(frame)
        except (asyncio.IncompleteReadError, OSError) as exc:
            why = f"{type(exc).__name__}"
        except asyncio.LimitOverrunError as exc:
            why = f"frame too large: {exc}"
        finally:
            self._connection_lost(why)

    def _dispatch(self, frame: Frame) -> None:
        if frame.command == "RECEIPT":
            fut = self._receipts.pop(frame.headers.get("receipt-id", ""), None)
            if fut is not None and not fut.done():
                fut.set_result(frame)
        elif frame.command == "MESSAGE":
            self.counts.received += 1
            sub = self._subs.get(frame.headers.get("subscription", ""))
            if sub is not None:
                task = asyncio.create_task(self._handle(sub, frame))
                self._handlers.add(task)
                task.add_done_callback(self._handlers.discard)
        elif frame.command == "ERROR":
            message = frame.headers.get("message", "") + (f": {frame.body.strip()}" if frame.body.strip() else "")
            self._log.warning("ActiveMQ ERROR frame", message=message)
            rid = frame.headers.get("receipt-id")
            targets = [self._receipts.pop(rid)] if rid in self._receipts else list(self._receipts.values())
            for fut in targets:
                if not fut.done():
                    fut.set_exception(StompError(message or "ERROR frame"))

    async def _handle(self, sub: _Subscription, frame: Frame) -> None:
        try:
            await sub.handler(frame)
        except Exception:  # the message is not ACKed: the broker delivers it again (after a reconnect)
            self.counts.handler_errors += 1
            self._log.exception("message handler failed; message left unacknowledged",
                                destination=sub.destination)
            return
        ack = frame.headers.get("ack")
        if ack:
            with contextlib.suppress(StompUnavailable):
                await self._write(encode_frame("ACK", {"id": ack}))

    # ---- API ----------------------------------------------------------------------------------------------
    async def send(self, destination: str, body: str, *, headers: dict[str, str] | None = None,
                   timeout_s: float = 5.0, persistent: bool = True) -> None:
        """SEND with a receipt; returns once the broker confirmed it (stored, when persistent). Raises
        :class:`StompUnavailable` (not connected, connection lost: fate unknown) or :class:`StompError`."""
        receipt = f"r-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._receipts[receipt] = fut
        frame_headers = {"destination": destination, "receipt": receipt, "content-type": "application/json",
                         "persistent": "true" if persistent else "false", **(headers or {})}
        try:
            await self._write(encode_frame("SEND", frame_headers, body))
            async with asyncio.timeout(timeout_s):
                await fut
        except TimeoutError:
            self.counts.send_failed += 1
            raise StompUnavailable(f"no receipt from the broker within {timeout_s:g} s") from None
        except (StompUnavailable, StompError):
            self.counts.send_failed += 1
            raise
        finally:
            self._receipts.pop(receipt, None)
        self.counts.sent += 1

    def _subscribe_frame(self, sub: _Subscription) -> bytes:
        headers = {"id": sub.sub_id, "destination": sub.destination, "ack": "client-individual", **sub.extra}
        if sub.selector:
            headers["selector"] = sub.selector
        return encode_frame("SUBSCRIBE", headers)

    async def subscribe(self, destination: str, handler: Handler, *, selector: str | None = None,
                        prefetch: int | None = None) -> str:
        """Subscribe now (if connected) and again after every reconnect; returns the subscription id."""
        extra = {"activemq.prefetchSize": str(prefetch)} if prefetch else {}
        sub = _Subscription(f"s-{next(self._ids)}", destination, handler, selector, extra)
        self._subs[sub.sub_id] = sub
        if self._writer is not None:
            with contextlib.suppress(StompUnavailable):  # made again on the next connection
                await self._write(self._subscribe_frame(sub))
        return sub.sub_id

    def info(self) -> dict[str, Any]:
        return {"connected_to": f"{self.connected_to[0]}:{self.connected_to[1]}" if self.connected_to else None,
                **self.counts.__dict__}
