"""Heartbeat wire format: 4-byte big-endian length, then a UTF-8 JSON object (see docs/heartbeat-protocol.md).

``{"v": 1, "type": "HELLO|PING|PONG|GOODBYE", "server": str, "instance": str, "service": str,
"epoch": int, "seq": int, "t": int}`` where ``t`` is the sender's ``time.monotonic()`` in milliseconds.
Anything else (oversized, not JSON, not an object, another version or type, a missing or mistyped
field) raises :class:`FrameError`; the caller closes that one connection.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass
from typing import Any, Literal

from pom_ha import wire
from pom_ha.wire import WireError

PROTOCOL_VERSION = 1
FrameType = Literal["HELLO", "PING", "PONG", "GOODBYE"]
FRAME_TYPES: tuple[FrameType, ...] = ("HELLO", "PING", "PONG", "GOODBYE")
_LEN = struct.Struct(">I")


class FrameError(Exception):
    """A frame that breaks the protocol; the connection it came on must be closed."""


@dataclass(frozen=True)
class Frame:
    type: FrameType
    server: str
    instance: str
    service: str
    epoch: int
    seq: int
    t: int

    def to_json(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION, "type": self.type, "server": self.server, "instance": self.instance,
            "service": self.service, "epoch": self.epoch, "seq": self.seq, "t": self.t,
        }


def encode_frame(frame: Frame, max_bytes: int) -> bytes:
    payload = json.dumps(frame.to_json(), separators=(",", ":")).encode()
    if len(payload) > max_bytes:
        raise FrameError(f"frame of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    return _LEN.pack(len(payload)) + payload


def encode_raw(obj: object) -> bytes:
    """Length-prefix any JSON value as-is (tests use it to send frames a correct peer never would)."""
    payload = json.dumps(obj).encode()
    return _LEN.pack(len(payload)) + payload


def _frame_type(value: object) -> FrameType:
    for known in FRAME_TYPES:
        if value == known:
            return known
    raise FrameError(f"unknown frame type {value!r}")


def _field(obj: dict[str, Any], name: str, kind: type) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise FrameError(f"field {name!r} missing or not {kind.__name__}: {value!r}")
    return value


def decode_payload(payload: bytes) -> Frame:
    try:
        obj = wire.decode(payload)
    except WireError as exc:
        raise FrameError(str(exc)) from None
    return frame_from_object(obj)


def frame_from_object(obj: dict[str, Any]) -> Frame:
    """A decoded frame object, checked field by field (version, type, every field's type)."""
    if obj.get("v") != PROTOCOL_VERSION or isinstance(obj.get("v"), bool):
        raise FrameError(f"unsupported protocol version {obj.get('v')!r}")
    return Frame(
        type=_frame_type(obj.get("type")),
        server=_field(obj, "server", str),
        instance=_field(obj, "instance", str),
        service=_field(obj, "service", str),
        epoch=_field(obj, "epoch", int),
        seq=_field(obj, "seq", int),
        t=_field(obj, "t", int),
    )


async def read_frame(reader: asyncio.StreamReader, max_bytes: int) -> Frame | None:
    """The next frame, or ``None`` on a clean end of stream between frames (the shared length-prefixed
    framing of :mod:`pom_ha.wire`). An oversized frame is refused from its length prefix alone."""
    try:
        obj = await wire.read_frame(reader, max_bytes)
    except WireError as exc:
        raise FrameError(str(exc)) from None
    return None if obj is None else frame_from_object(obj)
