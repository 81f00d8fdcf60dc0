"""Length-prefixed JSON frames over asyncio streams: the wire format of every pom-ha socket protocol
(Rule Engine, media platform, agent desktops). Heartbeats keep their own typed codec in ``pom_ha.ha``.

A frame is a 4-byte big-endian payload length followed by a UTF-8 JSON object. A frame larger than
``max_bytes``, a payload that is not a JSON object, or a stream cut mid-frame raises
:class:`WireError`; the caller closes that connection and nothing else.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

_LEN = struct.Struct(">I")
DEFAULT_MAX_BYTES = 64 * 1024


class WireError(Exception):
    """A malformed or oversized frame; the connection it came from should be closed."""


def encode(obj: dict[str, Any], max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    payload = json.dumps(obj, separators=(",", ":")).encode()
    if len(payload) > max_bytes:
        raise WireError(f"frame of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    return _LEN.pack(len(payload)) + payload


def decode(payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"frame is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise WireError(f"frame must be a JSON object, got {type(obj).__name__}")
    return obj


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Any] | None:
    """The next frame, or None on a clean end of stream between frames."""
    try:
        header = await reader.readexactly(_LEN.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise WireError("stream ended inside a frame header") from None
    (length,) = _LEN.unpack(header)
    if length > max_bytes:
        raise WireError(f"frame of {length} bytes exceeds the {max_bytes}-byte limit")
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise WireError("stream ended inside a frame") from None
    return decode(payload)


async def write_frame(
    writer: asyncio.StreamWriter, obj: dict[str, Any], max_bytes: int = DEFAULT_MAX_BYTES
) -> None:
    writer.write(encode(obj, max_bytes))
    await writer.drain()
