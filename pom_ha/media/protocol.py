"""The media-platform protocol: typed frames between a Campaign Manager and a media platform (simulator).

Frames travel as :mod:`pom_ha.wire` length-prefixed JSON objects, each with ``"v": 1`` and a ``"type"``.
Unknown extra fields are ignored (forward compatibility); a missing or ill-typed field raises
:class:`ProtocolError` naming ``TYPE.field``. ``docs/media-protocol.md`` describes the semantics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, cast

VERSION = 1
Mode = Literal["up", "down"]
RejectReason = Literal["capacity", "down", "stale_epoch", "duplicate", "bad_request"]
MODES: tuple[Mode, ...] = ("up", "down")
REJECT_REASONS: tuple[RejectReason, ...] = ("capacity", "down", "stale_epoch", "duplicate", "bad_request")
_MAX_ID = 200


class ProtocolError(ValueError):
    """A frame that breaks the protocol. ``field`` is ``TYPE.name`` (or ``v`` / ``type``); ``attempt_id`` is
    set when the frame was a DIAL whose id could be read, so the platform can answer REJECTED bad_request."""

    def __init__(self, field: str, message: str, attempt_id: str | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.attempt_id = attempt_id


# ---- field readers: each names the field in its error ---------------------------------------------------
def _str(obj: dict[str, Any], frame: str, name: str, *, max_len: int = _MAX_ID) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{frame}.{name}", f"must be a non-empty string, got {value!r}")
    if len(value) > max_len:
        raise ProtocolError(f"{frame}.{name}", f"must be at most {max_len} characters, got {len(value)}")
    return value


def _int(obj: dict[str, Any], frame: str, name: str, *, minimum: int = 0) -> int:
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{frame}.{name}", f"must be an integer, got {value!r}")
    if value < minimum:
        raise ProtocolError(f"{frame}.{name}", f"must be at least {minimum}, got {value}")
    return value


def _bool(obj: dict[str, Any], frame: str, name: str, default: bool | None = None) -> bool:
    value = obj.get(name, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"{frame}.{name}", f"must be true or false, got {value!r}")
    return value


def _choice(obj: dict[str, Any], frame: str, name: str, choices: tuple[str, ...]) -> str:
    value = obj.get(name)
    if value not in choices:
        raise ProtocolError(f"{frame}.{name}", f"must be one of {list(choices)}, got {value!r}")
    return cast(str, value)


def _counts(obj: dict[str, Any], frame: str, name: str) -> dict[str, int]:
    value = obj.get(name)
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in value.items()
    ):
        raise ProtocolError(f"{frame}.{name}", f"must be an object of integer counters, got {value!r}")
    return dict(value)


class _Frame:
    __slots__ = ()
    TYPE: ClassVar[str]

    def to_frame(self) -> dict[str, Any]:
        return {"v": VERSION, "type": self.TYPE, **asdict(self)}  # type: ignore[call-overload]


# ---- client -> platform ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Dial(_Frame):
    """Place one call. ``epoch`` is the sender's fencing epoch for ``scope`` (e.g. ``job/<id>``)."""

    TYPE: ClassVar[str] = "DIAL"
    attempt_id: str
    job: str
    contact: str
    attempt_no: int
    phone: str
    epoch: int
    scope: str

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> Dial:
        attempt_id = _str(obj, "DIAL", "attempt_id")
        try:
            return cls(
                attempt_id=attempt_id, job=_str(obj, "DIAL", "job"), contact=_str(obj, "DIAL", "contact"),
                attempt_no=_int(obj, "DIAL", "attempt_no", minimum=1),
                phone=_str(obj, "DIAL", "phone", max_len=40), epoch=_int(obj, "DIAL", "epoch"),
                scope=_str(obj, "DIAL", "scope"),
            )
        except ProtocolError as exc:
            raise ProtocolError(exc.field, exc.message, attempt_id) from None


@dataclass(frozen=True, slots=True)
class Cancel(_Frame):
    """End a call in progress; it then reports OUTCOME code CANCELLED. Unknown ids are ignored (counted)."""

    TYPE: ClassVar[str] = "CANCEL"
    attempt_id: str

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> Cancel:
        return cls(_str(obj, "CANCEL", "attempt_id"))


@dataclass(frozen=True, slots=True)
class SetMode(_Frame):
    """``down`` rejects every DIAL; with ``drop_calls`` the calls in progress end now with NETWORK_FAILURE."""

    TYPE: ClassVar[str] = "SET_MODE"
    mode: Mode
    drop_calls: bool = False

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> SetMode:
        mode = cast(Mode, _choice(obj, "SET_MODE", "mode", MODES))
        return cls(mode, _bool(obj, "SET_MODE", "drop_calls", default=False))


@dataclass(frozen=True, slots=True)
class StatsRequest(_Frame):
    TYPE: ClassVar[str] = "STATS"

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> StatsRequest:
        return cls()


@dataclass(frozen=True, slots=True)
class Claim(_Frame):
    """Take ownership of ``scope``'s calls: outcomes held for it are delivered (before CLAIMED), and calls
    still in progress will report here. Refused (``granted`` false) if ``epoch`` is stale for the scope."""

    TYPE: ClassVar[str] = "CLAIM"
    scope: str
    epoch: int

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> Claim:
        return cls(_str(obj, "CLAIM", "scope"), _int(obj, "CLAIM", "epoch"))


ClientFrame = Dial | Cancel | SetMode | StatsRequest | Claim
_CLIENT: dict[str, Any] = {c.TYPE: c for c in (Dial, Cancel, SetMode, StatsRequest, Claim)}


# ---- platform -> client ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Accepted(_Frame):
    TYPE: ClassVar[str] = "ACCEPTED"
    attempt_id: str

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> Accepted:
        return cls(_str(obj, "ACCEPTED", "attempt_id"))


@dataclass(frozen=True, slots=True)
class Rejected(_Frame):
    TYPE: ClassVar[str] = "REJECTED"
    attempt_id: str
    reason: RejectReason
    detail: str = ""

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> Rejected:
        reason = cast(RejectReason, _choice(obj, "REJECTED", "reason", REJECT_REASONS))
        detail = obj.get("detail", "")
        if not isinstance(detail, str):
            raise ProtocolError("REJECTED.detail", f"must be a string, got {detail!r}")
        return cls(_str(obj, "REJECTED", "attempt_id"), reason, detail)


@dataclass(frozen=True, slots=True)
class Outcome(_Frame):
    """How a call ended. ``duration_ms`` is simulated call time (before ``time_scale``); ``answered`` means
    the line was picked up (human, machine or fax). ``platform_lost`` is never on the wire: the client sets
    it on a NETWORK_FAILURE it reports itself because the platform holding the call was lost."""

    TYPE: ClassVar[str] = "OUTCOME"
    attempt_id: str
    scope: str
    job: str
    contact: str
    attempt_no: int
    epoch: int
    code: str
    answered: bool
    duration_ms: int
    platform_lost: bool = field(default=False, compare=False)

    def to_frame(self) -> dict[str, Any]:
        frame = _Frame.to_frame(self)
        del frame["platform_lost"]
        return frame

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> Outcome:
        t = "OUTCOME"
        return cls(
            attempt_id=_str(obj, t, "attempt_id"), scope=_str(obj, t, "scope"), job=_str(obj, t, "job"),
            contact=_str(obj, t, "contact"), attempt_no=_int(obj, t, "attempt_no", minimum=1),
            epoch=_int(obj, t, "epoch"), code=_str(obj, t, "code"), answered=_bool(obj, t, "answered"),
            duration_ms=_int(obj, t, "duration_ms"),
        )


@dataclass(frozen=True, slots=True)
class StatsReply(_Frame):
    """Counters of one platform; the reply to STATS and to SET_MODE (after the change)."""

    TYPE: ClassVar[str] = "STATS_REPLY"
    mode: Mode
    capacity: int
    in_progress: int
    peak_in_progress: int
    dialed: int
    completed: dict[str, int]
    rejected: dict[str, int]
    cancel_unknown: int
    orphans_held: int
    orphans_delivered: int
    orphans_expired: int
    connections: int = 0

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> StatsReply:
        t = "STATS_REPLY"
        ints = {
            name: _int(obj, t, name) for name in (
                "capacity", "in_progress", "peak_in_progress", "dialed", "cancel_unknown", "orphans_held",
                "orphans_delivered", "orphans_expired", "connections",
            )
        }
        mode = cast(Mode, _choice(obj, t, "mode", MODES))
        return cls(mode=mode, completed=_counts(obj, t, "completed"), rejected=_counts(obj, t, "rejected"), **ints)


@dataclass(frozen=True, slots=True)
class Claimed(_Frame):
    TYPE: ClassVar[str] = "CLAIMED"
    scope: str
    granted: bool
    delivered: int
    in_progress: int

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> Claimed:
        t = "CLAIMED"
        return cls(_str(obj, t, "scope"), _bool(obj, t, "granted"), _int(obj, t, "delivered"),
                   _int(obj, t, "in_progress"))


@dataclass(frozen=True, slots=True)
class ErrorFrame(_Frame):
    """The platform's last word on a connection that sent a malformed frame; the connection is then closed."""

    TYPE: ClassVar[str] = "ERROR"
    reason: str

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> ErrorFrame:
        return cls(_str(obj, "ERROR", "reason", max_len=4000))


PlatformFrame = Accepted | Rejected | Outcome | StatsReply | Claimed | ErrorFrame
_PLATFORM: dict[str, Any] = {c.TYPE: c for c in (Accepted, Rejected, Outcome, StatsReply, Claimed, ErrorFrame)}


def _parse(obj: dict[str, Any], table: dict[str, Any], side: str) -> Any:
    if obj.get("v") != VERSION:
        raise ProtocolError("v", f"protocol version must be {VERSION}, got {obj.get('v')!r}")
    kind = obj.get("type")
    parser = table.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise ProtocolError("type", f"must be one of {sorted(table)} ({side}), got {kind!r}")
    return parser.parse(obj)


def parse_client_frame(obj: dict[str, Any]) -> ClientFrame:
    """A frame a platform received; raises :class:`ProtocolError` naming the bad field."""
    return cast(ClientFrame, _parse(obj, _CLIENT, "client to platform"))


def parse_platform_frame(obj: dict[str, Any]) -> PlatformFrame:
    """A frame a client received; raises :class:`ProtocolError` naming the bad field."""
    return cast(PlatformFrame, _parse(obj, _PLATFORM, "platform to client"))
