"""The Campaign Manager's client of the Rule Engine master, and the VERDICT frame both sides share.

The client finds the master in ``ha_lease`` (service ``rule_engine``, scope ``''``, unexpired), keeps one
framed-JSON connection to it (``pom_ha.wire``) and re-reads the lease only when something happened: a
``NOTIFY ha_lease`` for ``rule_engine`` (pushed over a LISTEN connection — no polling for a new master), a
broken socket, or the LISTEN connection coming back. While the known holder refuses connections (killed,
its lease not yet taken over) it retries that address with backoff until the next push names another.

``evaluate`` is idempotent, so a request cut off by a failover is re-sent on the next master within its
own timeout; while no master answers it waits, then raises :class:`RuleEngineUnavailable` (the CM pauses
dialing). Replies carry the master's epoch; an :class:`EpochGate` drops replies older than the newest
epoch seen (``stale_replies``) and closes the connection they came on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import structlog

from pom_ha.config import Topology, load_topology
from pom_ha.domain.attempts import CompletionCode, ContactHistory, code_by_name
from pom_ha.domain.contacts import Contact
from pom_ha.domain.instants import as_utc
from pom_ha.domain.rules import RuleVerdict
from pom_ha.ha.fencing import EpochEnvelope, EpochGate
from pom_ha.ha.pg_listen import LeaseListener
from pom_ha.ha.retry import Backoff
from pom_ha.wire import WireError, encode, read_frame

SERVICE = "rule_engine"
SCOPE = ""
PROTOCOL_VERSION = 1
log = structlog.get_logger("pom_ha.clients.rule_engine")
Req = int | str


class RuleEngineUnavailable(Exception):
    """No Rule Engine master answered within the timeout; dialing should pause."""


class RuleEngineRefused(Exception):
    """The request itself is malformed (the master answered ERROR, or it is too large to send)."""


class LocatorError(Exception):
    """The master could not be looked up (database unreachable)."""


class _LinkLost(Exception):
    pass


def iso_utc(at: datetime | None) -> str | None:
    return None if at is None else as_utc(at).isoformat()


async def _wait(event: asyncio.Event, timeout_s: float | None) -> bool:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
    return event.is_set()


@dataclass(frozen=True, slots=True)
class Verdict:
    req: Req
    epoch: int
    allowed: bool
    code: str | None  # a CompletionCode name
    retry_at: datetime | None
    reason: str

    @classmethod
    def from_rule(cls, req: Req, epoch: int, verdict: RuleVerdict) -> Verdict:
        code = verdict.code.name if verdict.code is not None else None
        return cls(req, epoch, verdict.allowed, code, verdict.retry_at, verdict.reason)

    @property
    def completion_code(self) -> CompletionCode | None:
        return None if self.code is None else code_by_name(self.code)

    def to_frame(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "type": "VERDICT", "req": self.req, "epoch": self.epoch,
                "allowed": self.allowed, "code": self.code, "retry_at": iso_utc(self.retry_at), "reason": self.reason}

    @classmethod
    def from_frame(cls, f: Mapping[str, Any]) -> Verdict:
        """Parse a VERDICT frame; ``ValueError`` names the first bad field."""
        for name, ok in (
            ("type", f.get("type") == "VERDICT"),
            ("req", isinstance(f.get("req"), int | str) and not isinstance(f.get("req"), bool)),
            ("epoch", type(f.get("epoch")) is int),
            ("allowed", isinstance(f.get("allowed"), bool)),
            ("reason", isinstance(f.get("reason"), str)),
            ("code", f.get("code") is None or isinstance(f.get("code"), str)),
            ("retry_at", f.get("retry_at") is None or isinstance(f.get("retry_at"), str)),
        ):
            if not ok:
                raise ValueError(f"VERDICT field {name} is invalid: {f.get(name)!r:.80}")
        at = None if f["retry_at"] is None else as_utc(datetime.fromisoformat(f["retry_at"]), "retry_at")
        return cls(f["req"], f["epoch"], f["allowed"], f["code"], at, f["reason"])


def evaluate_body(
    contact: Contact | Mapping[str, str], history: ContactHistory | None, now: datetime | None, job: str
) -> dict[str, Any]:
    """The EVALUATE frame without its ``req``; ``contact`` may be a raw mapping (id, phone, timezone)."""
    if isinstance(contact, Contact):
        who = {"id": contact.id, "phone": contact.phone, "timezone": contact.timezone}
    else:
        who = {k: contact[k] for k in ("id", "phone", "timezone") if k in contact}
    history = history or ContactHistory()
    return {"v": PROTOCOL_VERSION, "type": "EVALUATE", "job": job, "contact": who,
            "history": {"dialed_attempts": history.dialed_attempts, "last_dial_at": iso_utc(history.last_dialed_at)},
            "now": iso_utc(now)}


# ---- finding the master ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MasterEndpoint:
    server: str
    host: str
    port: int
    epoch: int


class MasterLocator(Protocol):
    """Where the master is, and a push (``on_change(cause)``) whenever that may have changed."""

    def start(self, on_change: Callable[[str], None]) -> None: ...
    async def locate(self) -> MasterEndpoint | None: ...
    async def close(self) -> None: ...


class LeaseLocator:
    """Reads ``ha_lease``; LISTENs on ``ha_lease`` (health-checked, reconnected) for the push."""

    def __init__(self, dsn: str, topology: Topology, *, timeout_s: float = 1.0) -> None:
        self._dsn, self._topo, self._timeout_s = dsn, topology, timeout_s
        self._listener = LeaseListener(dsn, self._on_lease, timeout_s=timeout_s,
                                       application_name="pom-ha:re-client-listen")
        self._on_change: Callable[[str], None] = lambda _cause: None
        self._conn: Any = None
        self.notifications = 0

    def start(self, on_change: Callable[[str], None]) -> None:
        self._on_change = on_change
        self._listener.start()

    def _on_lease(self, service: str, scope: str) -> None:
        if service == "*":
            self._on_change("listener-reconnect")
        elif service == SERVICE and scope == SCOPE:
            self.notifications += 1
            self._on_change("lease-notify")

    async def locate(self) -> MasterEndpoint | None:
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(self._dsn, timeout=self._timeout_s,
                                                   server_settings={"application_name": "pom-ha:re-client"})
            row = await self._conn.fetchrow(
                "SELECT holder_server, epoch FROM ha_lease WHERE service = $1 AND scope = $2"
                " AND holder_server IS NOT NULL AND expires_at > now()", SERVICE, SCOPE, timeout=self._timeout_s)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if self._conn is not None:
                self._conn.terminate()
                self._conn = None
            raise LocatorError(f"{type(exc).__name__}: {exc}") from exc
        if row is None:
            return None
        server = next((s for s in self._topo.servers if s.name == row["holder_server"]), None)
        if server is None:
            log.warning("rule engine master is not in the topology", server=row["holder_server"])
            return None
        return MasterEndpoint(server.name, server.address, self._topo.ports.rule_engine, int(row["epoch"]))

    async def close(self) -> None:
        await self._listener.close()
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None


# ---- one connection to one master ------------------------------------------------------------------------
class _Link:
    def __init__(self, endpoint: MasterEndpoint, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 admit: Callable[[int], bool], on_lost: Callable[[_Link, str, bool], None]) -> None:
        self.endpoint, self._reader, self._writer = endpoint, reader, writer
        self._admit, self.on_lost = admit, on_lost
        self.pending: dict[Req, asyncio.Future[dict[str, Any]]] = {}
        self.closed = False
        self._task = asyncio.create_task(self._read(), name=f"re-link-{endpoint.server}")

    async def request(self, frame: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        if self.closed:
            raise _LinkLost("connection closed")
        data = encode(frame)  # an oversized request is the caller's error (WireError), not the link's
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[frame["req"]] = fut
        try:
            async with asyncio.timeout(timeout_s):
                self._writer.write(data)
                try:
                    await self._writer.drain()
                except ConnectionError as exc:
                    self.close(f"send failed: {exc}")
                    raise _LinkLost(str(exc)) from exc
                return await fut
        finally:
            self.pending.pop(frame["req"], None)

    async def _read(self) -> None:
        reason = "closed by the master"
        try:
            while (frame := await read_frame(self._reader)) is not None:
                epoch = frame.get("epoch")
                if not isinstance(epoch, int) or isinstance(epoch, bool):
                    reason = f"reply without an epoch: {frame!r:.200}"
                    break
                if not self._admit(epoch):
                    reason = f"stale reply of epoch {epoch} dropped"
                    break
                req = frame.get("req")
                fut = self.pending.get(req) if isinstance(req, int | str) else None
                if fut is not None and not fut.done():
                    fut.set_result(frame)
        except (OSError, WireError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        self.close(reason, from_reader=True)

    def close(self, reason: str, *, deliberate: bool = False, from_reader: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self._writer.transport.abort()
        if not from_reader:
            self._task.cancel()
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(_LinkLost(reason))
        self.on_lost(self, reason, deliberate)


# ---- the client ----------------------------------------------------------------------------------------------
class RuleEngineClient:
    """``async with RuleEngineClient(dsn, topology) as re: verdict = await re.evaluate(contact, history)``."""

    def __init__(self, dsn: str, topology: Topology | str | Path, *, locator: MasterLocator | None = None,
                 timeout_s: float = 2.0, connect_timeout_s: float = 0.5, backoff: Backoff | None = None) -> None:
        if locator is None:
            locator = LeaseLocator(dsn, topology if isinstance(topology, Topology) else load_topology(topology))
        self.locator: MasterLocator = locator
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self._backoff = backoff or Backoff(initial_s=0.02, max_s=0.5)
        self.connected = asyncio.Event()
        self.gate = EpochGate()
        self.reconnects = 0
        self.reconnect_causes: Counter[str] = Counter()
        self.last_outage_s: float | None = None  # from losing a master to being connected to the next one
        self.master: MasterEndpoint | None = None
        self._ever_connected = False
        self._link: _Link | None = None
        self._lost_at: float | None = None
        self._wake = asyncio.Event()
        self._causes: set[str] = set()
        self._req = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def stale_replies(self) -> int:
        return self.gate.dropped_total()

    async def start(self) -> None:
        if self._task is None:
            self._poke("start")
            self.locator.start(self._poke)
            self._task = asyncio.create_task(self._connector(), name="re-client-connector")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._link is not None:
            self._link.close("client closed", deliberate=True)
        await self.locator.close()

    async def __aenter__(self) -> RuleEngineClient:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def wait_connected(self, timeout_s: float | None = None) -> bool:
        return await _wait(self.connected, timeout_s)

    async def evaluate(self, contact: Contact | Mapping[str, str], history: ContactHistory | None = None,
                       now: datetime | None = None, *, job: str = "", timeout_s: float | None = None) -> Verdict:
        """The master's verdict; raises RuleEngineUnavailable if none answers within ``timeout_s``."""
        try:
            reply = await self._call(evaluate_body(contact, history, now, job), timeout_s)
        except WireError as exc:
            raise RuleEngineRefused(f"request not sent: {exc}") from None
        if reply.get("type") == "ERROR":
            raise RuleEngineRefused(str(reply.get("reason")))
        return Verdict.from_frame(reply)

    async def ping(self, timeout_s: float | None = None) -> int:
        """The master's epoch."""
        return int((await self._call({"v": PROTOCOL_VERSION, "type": "PING"}, timeout_s))["epoch"])

    async def _call(self, body: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        why = "no Rule Engine master reachable"
        while (remaining := deadline - time.monotonic()) > 0:
            link = self._link
            if link is None or link.closed:
                await self.wait_connected(remaining)
                continue
            self._req += 1
            try:
                return await link.request({**body, "req": self._req}, remaining)
            except _LinkLost as exc:
                why = f"connection to {link.endpoint.server} lost ({exc})"
            except TimeoutError:
                why = f"no reply from {link.endpoint.server}"
        raise RuleEngineUnavailable(f"{why} within {timeout:.2f} s")

    # ---- connection management ----------------------------------------------------------------------------
    def _poke(self, cause: str) -> None:
        self._causes.add(cause)
        self._wake.set()

    def _admit(self, epoch: int) -> bool:
        return self.gate.admit(EpochEnvelope(SERVICE, SCOPE, epoch, None))

    def _on_lost(self, link: _Link, reason: str, deliberate: bool) -> None:
        if link is not self._link:
            return
        self._link = None
        self.connected.clear()
        self._lost_at = time.monotonic()
        log.info("rule engine connection lost", server=link.endpoint.server, epoch=link.endpoint.epoch, reason=reason)
        if not deliberate:
            self._poke("socket")

    async def _connector(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            cause = "+".join(sorted(self._causes)) or "retry"
            self._causes.clear()
            try:
                endpoint = await self.locator.locate()
            except LocatorError as exc:
                log.warning("cannot look the rule engine master up", error=str(exc))
                if not await _wait(self._wake, self._backoff.next_delay()):
                    self._poke("retry")
                continue
            link = self._link
            if link is not None and endpoint == link.endpoint:
                continue
            if link is not None:
                link.close(f"master is now {endpoint}", deliberate=True)
            self.master = endpoint
            if endpoint is not None:
                await self._connect(endpoint, cause)

    async def _connect(self, endpoint: MasterEndpoint, cause: str) -> None:
        """Connect to ``endpoint`` (retrying with backoff) unless a push asks to look again first."""
        self._backoff.reset()
        while True:
            try:
                link = await self._open(endpoint)
            except (OSError, TimeoutError, WireError, _LinkLost) as exc:
                log.debug("cannot reach rule engine master", server=endpoint.server, error=str(exc))
                if await _wait(self._wake, self._backoff.next_delay()):
                    return
                continue
            if link.closed:  # lost between the handshake and now
                continue
            if self._ever_connected:
                self.reconnects += 1
                self.reconnect_causes[cause] += 1
            if self._lost_at is not None:
                self.last_outage_s = time.monotonic() - self._lost_at
            self._lost_at = None
            self._ever_connected = True
            self._link = link
            self.connected.set()
            log.info("connected to rule engine master", server=endpoint.server, epoch=endpoint.epoch, cause=cause)
            return

    async def _open(self, endpoint: MasterEndpoint) -> _Link:
        async with asyncio.timeout(self.connect_timeout_s):
            reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
        link = _Link(endpoint, reader, writer, self._admit, lambda _l, _r, _d: None)
        self._req += 1
        try:
            await link.request({"v": PROTOCOL_VERSION, "type": "PING", "req": self._req}, self.connect_timeout_s)
        except BaseException:
            link.close("handshake failed", deliberate=True)
            raise
        link.on_lost = self._on_lost
        return link
