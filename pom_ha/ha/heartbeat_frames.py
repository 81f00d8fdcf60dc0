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
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"frame is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise FrameError(f"frame is not a JSON object but {type(obj).__name__}")
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
    """The next frame, or ``None`` on a clean end of stream between frames.

    An oversized frame is refused from its length prefix alone: its body is never read.
    """
    try:
        head = await reader.readexactly(_LEN.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FrameError("stream ended inside a frame header") from None
    (size,) = _LEN.unpack(head)
    if size > max_bytes:
        raise FrameError(f"frame of {size} bytes exceeds the {max_bytes}-byte limit")
    try:
        payload = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise FrameError("stream ended inside a frame body") from None
    return decode_payload(payload)
