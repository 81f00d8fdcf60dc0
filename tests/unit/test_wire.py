"""Framed JSON: round trip, and every kind of bad frame raises WireError."""

from __future__ import annotations

import asyncio
import struct

import pytest

from pom_ha.wire import WireError, encode, read_frame


def _reader(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r


async def test_round_trip_and_clean_eof() -> None:
    r = _reader(encode({"type": "DIAL", "epoch": 7}) + encode({"n": [1, 2]}))
    assert await read_frame(r) == {"type": "DIAL", "epoch": 7}
    assert await read_frame(r) == {"n": [1, 2]}
    assert await read_frame(r) is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (struct.pack(">I", 10**6) + b"{}", "exceeds"),
        (struct.pack(">I", 5) + b"nope!", "not valid JSON"),
        (struct.pack(">I", 2) + b"[]", "JSON object"),
        (struct.pack(">I", 9) + b"{}", "inside a frame"),
        (b"\x00\x00", "frame header"),
    ],
)
async def test_bad_frames_raise(data: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        await read_frame(_reader(data), max_bytes=1024)


def test_oversized_frame_is_refused_when_encoding() -> None:
    with pytest.raises(WireError, match="exceeds"):
        encode({"x": "y" * 100}, max_bytes=50)
