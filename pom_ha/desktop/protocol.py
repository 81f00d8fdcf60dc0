"""The desktop protocol: typed frames between an agent desktop and the Agent Manager (AM) of its zone.

Frames travel as :mod:`pom_ha.wire` length-prefixed JSON objects (TCP, or TLS when the deployment says so),
each with ``"v": 1`` and a ``"type"``. Every frame is a pydantic model; unknown extra fields are ignored
(forward compatibility), a missing or ill-typed field raises :class:`ProtocolError` naming ``TYPE.field``.
:func:`read_frame` turns every way a frame can be broken (framing, size, JSON, version, type, field) into a
``ProtocolError`` with a ``code``: the receiver answers it with :func:`error_frame` and closes that
connection only. ``docs/desktop-protocol.md`` describes the semantics.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Annotated, Any, ClassVar, Literal, cast, overload

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    ValidationError,
)

from pom_ha import wire
from pom_ha.domain.agents import AgentEvent, AgentJobState, CallState, EventKind

VERSION: Literal[1] = 1
SUPPORTED_VERSIONS = frozenset({VERSION})
MAX_FRAME_BYTES = wire.DEFAULT_MAX_BYTES

Id = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=200)]
Text = Annotated[str, StringConstraints(strict=True, max_length=2000)]
Req = StrictInt | Annotated[str, StringConstraints(strict=True, max_length=256)]
CodeName = Annotated[str, StringConstraints(strict=True, pattern=r"^[A-Z][A-Z0-9_]{0,39}$")]
Phone = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=40)]
Count = Annotated[StrictInt, Field(ge=0)]

Direction = Literal["to_manager", "to_desktop"]
ErrorCode = Literal[
    "malformed",  # broken framing, not JSON, unknown type or a bad field: fatal
    "oversized",  # a frame over the size limit: fatal
    "unsupported_version",  # fatal
    "not_logged_in",  # a frame other than LOGIN / HEARTBEAT before LOGIN_OK
    "unknown_agent",
    "unknown_zone",
    "invalid_transition",  # the agent's state does not allow the request (pom_ha.domain.agents)
    "zone_unavailable",  # the zone has no master right now (POM_NOT_AVAILABLE was sent)
    "callback_refused",  # after a WRAP_UP's OK: the cache service did not store its callback (docs/cache-service.md)
    "heartbeat_timeout",  # fatal
]
FATAL_CODES = frozenset({"malformed", "oversized", "unsupported_version", "heartbeat_timeout"})
LogoutReason = Literal["desktop_error", "zone_reset", "second_login", "sdk_connection_lost", "administrator"]

# Call events each side may send in CALL_EVENT. The desktop reports what its agent did; the manager reports
# what happened to the agent's call (its media platform is the source of truth for offered/released).
DESKTOP_CALL_EVENTS = frozenset({
    EventKind.ANSWERED, EventKind.HELD, EventKind.RETRIEVED, EventKind.CONSULT, EventKind.CONSULT_ENDED,
    EventKind.CONFERENCE, EventKind.RELEASED,
})
MANAGER_CALL_EVENTS = frozenset({
    EventKind.OFFERED, EventKind.DIAL_STARTED, EventKind.ANSWERED, EventKind.CONSULT_JOINED,
    EventKind.CONSULT_ENDED, EventKind.CONFERENCE, EventKind.RELEASED,
})
CallEventName = Literal[
    "offered", "dial_started", "answered", "held", "retrieved", "consult", "consult_joined", "consult_ended",
    "conference", "released",
]


class ProtocolError(ValueError):
    """A frame that breaks the protocol. ``code`` is an :data:`ErrorCode` (``malformed``, ``oversized`` or
    ``unsupported_version``); ``field`` is ``TYPE.name`` (or ``v`` / ``type`` / ``frame``); ``req`` is the
    request id when it could be read, so the ERROR frame can echo it."""

    def __init__(self, code: ErrorCode, field: str, message: str, req: int | str | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.code: ErrorCode = code
        self.field = field
        self.message = message
        self.req = req


class _Frame(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    TYPE: ClassVar[str]
    v: Literal[1] = VERSION

    def to_frame(self) -> dict[str, Any]:
        return {"type": self.TYPE, **self.model_dump(mode="json")}

    def to_bytes(self, max_bytes: int = wire.DEFAULT_MAX_BYTES) -> bytes:
        return wire.encode(self.to_frame(), max_bytes)


# ---- desktop -> manager ------------------------------------------------------------------------------
class Login(_Frame):
    """First frame of a session. A second LOGIN of the same agent closes the older session
    (``FORCED_LOGOUT second_login``)."""

    TYPE: ClassVar[str] = "LOGIN"
    req: Req
    agent_id: Id
    zone: Id
    desktop_id: Id


class Logout(_Frame):
    TYPE: ClassVar[str] = "LOGOUT"
    req: Req


class Ready(_Frame):
    TYPE: ClassVar[str] = "READY"
    req: Req


class NotReady(_Frame):
    TYPE: ClassVar[str] = "NOT_READY"
    req: Req
    reason_code: CodeName | None = None


class JobAttach(_Frame):
    TYPE: ClassVar[str] = "JOB_ATTACH"
    req: Req
    job_id: Id


class PreviewAccept(_Frame):
    TYPE: ClassVar[str] = "PREVIEW_ACCEPT"
    req: Req
    call_id: Id


class PreviewCancel(_Frame):
    TYPE: ClassVar[str] = "PREVIEW_CANCEL"
    req: Req
    call_id: Id


class CallbackAccept(_Frame):
    TYPE: ClassVar[str] = "CALLBACK_ACCEPT"
    req: Req
    call_id: Id


class CallbackRequest(BaseModel):
    """A callback the agent books while wrapping up: the contact is called again at ``at``."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    at: AwareDatetime
    phone: Phone | None = None
    agent_specific: StrictBool = False


class WrapUp(_Frame):
    """Dispose of the call in Wrapup with a completion code, optionally booking a callback."""

    TYPE: ClassVar[str] = "WRAP_UP"
    req: Req
    call_id: Id
    completion_code: CodeName
    callback: CallbackRequest | None = None


class StateReport(_Frame):
    """The desktop's answer to STATE_QUERY: what its agent is doing, by the desktop's account."""

    TYPE: ClassVar[str] = "STATE_REPORT"
    req: Req
    call_state: CallState
    call_id: Id | None = None
    job_id: Id | None = None


class Heartbeat(_Frame):
    """Sent by both sides every ``heartbeat_interval_ms``; ``seq`` counts up per sender and connection."""

    TYPE: ClassVar[str] = "HEARTBEAT"
    seq: Count


class CallEvent(_Frame):
    """Both directions. From the desktop: what the agent did (answered, held, retrieved, consult,
    consult_ended, conference, released), answered with OK or ERROR. From the manager: what happened to the
    agent's call (offered, dial_started, answered, consult_joined, consult_ended, conference, released)."""

    TYPE: ClassVar[str] = "CALL_EVENT"
    req: Req | None = None
    call_id: Id
    event: CallEventName
    consult_agent_id: Id | None = None

    @property
    def kind(self) -> EventKind:
        return EventKind(self.event)

    def to_agent_event(self) -> AgentEvent:
        return AgentEvent(self.kind, call_id=self.call_id)


# ---- manager -> desktop ------------------------------------------------------------------------------
class LoginOk(_Frame):
    """The session is open. ``manager_addresses`` (``host:port``) are every AM of the deployment, for
    reconnecting; ``epoch`` is the master's lease epoch for the zone."""

    TYPE: ClassVar[str] = "LOGIN_OK"
    req: Req
    agent_id: Id
    zone: Id
    session_id: Id
    master: Id
    epoch: Count
    heartbeat_interval_ms: Annotated[StrictInt, Field(ge=10, le=60_000)]
    heartbeat_miss_limit: Annotated[StrictInt, Field(ge=1, le=100)]
    manager_addresses: list[Id] = Field(default_factory=list, max_length=32)


class Ok(_Frame):
    TYPE: ClassVar[str] = "OK"
    req: Req


class ErrorFrame(_Frame):
    """A refused request (``fatal`` false: the session goes on) or the last word on a connection (``fatal``
    true: the sender closes it)."""

    TYPE: ClassVar[str] = "ERROR"
    req: Req | None = None
    code: ErrorCode
    reason: Text
    fatal: StrictBool


class AgentStateFrame(_Frame):
    """The manager's view of the agent, pushed after every change it makes."""

    TYPE: ClassVar[str] = "AGENT_STATE"
    logged_in: StrictBool
    ready: StrictBool
    call_state: CallState
    job_state: AgentJobState | None = None
    job_id: Id | None = None
    call_id: Id | None = None


class PreviewOffered(_Frame):
    TYPE: ClassVar[str] = "PREVIEW_OFFERED"
    call_id: Id
    job_id: Id
    contact_id: Id
    phone: Phone


class CallbackOffered(_Frame):
    TYPE: ClassVar[str] = "CALLBACK_OFFERED"
    call_id: Id
    job_id: Id
    contact_id: Id
    phone: Phone
    due_at: AwareDatetime


class PomNotAvailable(_Frame):
    """The guide's POMNotAvailable: the zone has no working master; the agent's calls go on but desktop
    requests are refused (``zone_unavailable``) until POM_AVAILABLE."""

    TYPE: ClassVar[str] = "POM_NOT_AVAILABLE"
    zone: Id
    reason: Text


class PomAvailable(_Frame):
    """The guide's POMAvailable: a master (``master``, lease ``epoch``) runs the zone again."""

    TYPE: ClassVar[str] = "POM_AVAILABLE"
    zone: Id
    master: Id
    epoch: Count


class StateQuery(_Frame):
    """After a takeover the new master asks each desktop for its state (answered by STATE_REPORT). A
    mismatch closes the call with DESKTOP_ERROR and is followed by FORCED_LOGOUT desktop_error."""

    TYPE: ClassVar[str] = "STATE_QUERY"
    req: Req


class ForcedLogout(_Frame):
    TYPE: ClassVar[str] = "FORCED_LOGOUT"
    reason: LogoutReason
    detail: Text = ""


ToManager = (
    Login | Logout | Ready | NotReady | JobAttach | PreviewAccept | PreviewCancel | CallbackAccept | WrapUp
    | StateReport | Heartbeat | CallEvent
)
ToDesktop = (
    LoginOk | Ok | ErrorFrame | AgentStateFrame | PreviewOffered | CallbackOffered | PomNotAvailable
    | PomAvailable | StateQuery | ForcedLogout | Heartbeat | CallEvent
)
Frame = ToManager | ToDesktop
_TO_MANAGER: dict[str, type[_Frame]] = {c.TYPE: c for c in (
    Login, Logout, Ready, NotReady, JobAttach, PreviewAccept, PreviewCancel, CallbackAccept, WrapUp, StateReport,
    Heartbeat, CallEvent,
)}
_TO_DESKTOP: dict[str, type[_Frame]] = {c.TYPE: c for c in (
    LoginOk, Ok, ErrorFrame, AgentStateFrame, PreviewOffered, CallbackOffered, PomNotAvailable, PomAvailable,
    StateQuery, ForcedLogout, Heartbeat, CallEvent,
)}


def _readable_req(obj: dict[str, Any]) -> int | str | None:
    req = obj.get("req")
    if isinstance(req, bool):
        return None
    if isinstance(req, int) or (isinstance(req, str) and len(req) <= 256):
        return req
    return None


def _is_union_tag(part: str | int) -> bool:
    # pydantic names the union member it tried ("int", "constrained-str", "function-after[...]").
    return isinstance(part, str) and (part in ("int", "str", "bool", "none") or "-" in part or "[" in part)


@overload
def parse_frame(obj: dict[str, Any], direction: Literal["to_manager"]) -> ToManager: ...
@overload
def parse_frame(obj: dict[str, Any], direction: Literal["to_desktop"]) -> ToDesktop: ...
@overload
def parse_frame(obj: dict[str, Any], direction: Direction) -> Frame: ...
def parse_frame(obj: dict[str, Any], direction: Direction) -> Frame:
    """A decoded frame travelling ``direction``; raises :class:`ProtocolError` naming the bad field."""
    req = _readable_req(obj)
    version = obj.get("v")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            "unsupported_version", "v", f"must be one of {sorted(SUPPORTED_VERSIONS)}, got {version!r}", req
        )
    table = _TO_MANAGER if direction == "to_manager" else _TO_DESKTOP
    kind = obj.get("type")
    model = table.get(kind) if isinstance(kind, str) else None
    if model is None:
        side = "desktop to manager" if direction == "to_manager" else "manager to desktop"
        raise ProtocolError("malformed", "type", f"must be one of {sorted(table)} ({side}), got {kind!r}", req)
    try:
        frame = model.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if not _is_union_tag(part)) or "frame"
        got = repr(first.get("input"))
        got = got if len(got) <= 80 else got[:77] + "..."
        raise ProtocolError("malformed", f"{kind}.{where}", f"{first['msg']}, got {got}", req) from None
    if isinstance(frame, CallEvent):
        allowed = DESKTOP_CALL_EVENTS if direction == "to_manager" else MANAGER_CALL_EVENTS
        if frame.kind not in allowed:
            names = sorted(k.value for k in allowed)
            raise ProtocolError("malformed", "CALL_EVENT.event", f"must be one of {names}, got {frame.event!r}", req)
    return cast(Frame, frame)


@overload
async def read_frame(
    reader: asyncio.StreamReader, direction: Literal["to_manager"], max_bytes: int = ...
) -> ToManager | None: ...
@overload
async def read_frame(
    reader: asyncio.StreamReader, direction: Literal["to_desktop"], max_bytes: int = ...
) -> ToDesktop | None: ...
async def read_frame(
    reader: asyncio.StreamReader, direction: Direction, max_bytes: int = MAX_FRAME_BYTES
) -> Frame | None:
    """The next frame, or None on a clean end of stream; any broken frame raises :class:`ProtocolError`."""
    try:
        obj = await wire.read_frame(reader, max_bytes)
    except wire.WireError as exc:
        # pom_ha.wire has one error type; its size message is the only one that says "exceeds".
        code: ErrorCode = "oversized" if "exceeds" in str(exc) else "malformed"
        raise ProtocolError(code, "frame", str(exc)) from None
    return None if obj is None else parse_frame(obj, direction)


async def write_frame(writer: asyncio.StreamWriter, frame: Frame, max_bytes: int = MAX_FRAME_BYTES) -> None:
    await wire.write_frame(writer, frame.to_frame(), max_bytes)


def error_frame(exc: ProtocolError) -> ErrorFrame:
    return ErrorFrame(req=exc.req, code=exc.code, reason=str(exc)[:2000], fatal=exc.code in FATAL_CODES)


class ProtocolCounters:
    """Broken frames per error code, and connections closed because of them (for metrics and tests)."""

    def __init__(self) -> None:
        self.errors: Counter[str] = Counter()
        self.closed = 0

    def as_dict(self) -> dict[str, int]:
        return {**{f"error_{code}": n for code, n in sorted(self.errors.items())}, "closed": self.closed}


async def refuse_and_close(
    writer: asyncio.StreamWriter, exc: ProtocolError, counters: ProtocolCounters, *, flush_timeout_s: float = 1.0
) -> None:
    """Send the ERROR frame for ``exc``, close the connection, count it. Never raises on a dead peer."""
    counters.errors[exc.code] += 1
    counters.closed += 1
    try:
        writer.write(error_frame(exc).to_bytes())
        async with asyncio.timeout(flush_timeout_s):
            await writer.drain()
    except (ConnectionError, TimeoutError, OSError):
        pass
    finally:
        writer.close()
        try:
            async with asyncio.timeout(flush_timeout_s):
                await writer.wait_closed()
        except (ConnectionError, TimeoutError, OSError):
            pass
