"""Heartbeat frames and nodes over real sockets on 127.0.0.1 (conditions polled with deadlines)."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pom_ha.ha.heartbeat import HeartbeatNode
from pom_ha.ha.heartbeat_frames import Frame, FrameError, decode_payload, encode_frame, encode_raw, read_frame
from pom_ha.ha.settings import HATimings
from tests.unit.conftest import poll_until

HB = HATimings(
    lease_ttl_ms=600, renew_interval_ms=200, heartbeat_interval_ms=20, heartbeat_miss_limit=15,
    safety_margin_ms=100, store_timeout_ms=200, db_retry_max_backoff_ms=200, heartbeat_max_frame_bytes=1024,
)


def hello(instance: str = "raw", service: str = "svc") -> dict[str, object]:
    return {"v": 1, "type": "HELLO", "server": "pomX", "instance": instance, "service": service,
            "epoch": 0, "seq": 0, "t": 1}


# ---- frames ------------------------------------------------------------------------------------------------
async def test_frames_round_trip_through_a_stream() -> None:
    frames = [
        Frame("HELLO", "pom1", "i1", "rule_engine", 0, 0, 10),
        Frame("PING", "pom1", "i1", "rule_engine", 7, 1, 11),
        Frame("PONG", "pom2", "i2", "rule_engine", 0, 1, 12),
        Frame("GOODBYE", "pom1", "i1", "rule_engine", 7, 0, 13),
    ]
    reader = asyncio.StreamReader()
    for f in frames:
        wire = encode_frame(f, 1024)
        assert struct.unpack(">I", wire[:4])[0] == len(wire) - 4
        assert json.loads(wire[4:])["v"] == 1
        reader.feed_data(wire)
    reader.feed_eof()
    got = [await read_frame(reader, 1024) for _ in frames]
    assert got == frames
    assert await read_frame(reader, 1024) is None, "clean end of stream between frames"


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        b"\xff\xfe",
        b"[1, 2]",
        json.dumps({**hello(), "v": 2}).encode(),
        json.dumps({**hello(), "v": True}).encode(),
        json.dumps({**hello(), "type": "SHUTDOWN"}).encode(),
        json.dumps({k: v for k, v in hello().items() if k != "instance"}).encode(),
        json.dumps({**hello(), "epoch": "7"}).encode(),
        json.dumps({**hello(), "seq": False}).encode(),
    ],
)
def test_malformed_payloads_are_refused(payload: bytes) -> None:
    with pytest.raises(FrameError):
        decode_payload(payload)


async def test_oversized_frame_refused_from_its_length_alone() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(struct.pack(">I", 1025))  # no body follows: it must not be awaited
    with pytest.raises(FrameError, match="exceeds"):
        await asyncio.wait_for(read_frame(reader, 1024), 1.0)
    with pytest.raises(FrameError):
        encode_frame(Frame("PING", "p" * 2000, "i", "s", 0, 0, 0), 1024)


# ---- nodes ---------------------------------------------------------------------------------------------------
def make_node(name: str, **kwargs: object) -> HeartbeatNode:
    return HeartbeatNode(server=name, instance=f"inst-{name}", service="svc", host="127.0.0.1", timings=HB,
                         **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def pair() -> AsyncIterator[tuple[HeartbeatNode, HeartbeatNode, list[tuple[str, float]], list[str]]]:
    rtts: list[tuple[str, float]] = []
    changes: list[str] = []
    a = make_node("pom1", on_rtt=lambda peer, rtt: rtts.append((peer, rtt)), on_change=changes.append)
    b = make_node("pom2")
    for node in (a, b):
        await node.start()
    assert a.endpoint and b.endpoint
    a.set_peers({b.instance: (b.server_name, b.endpoint)})
    b.set_peers({a.instance: (a.server_name, a.endpoint)})
    await poll_until(lambda: not a.peer_gone(b.instance) and not b.peer_gone(a.instance))
    try:
        yield a, b, rtts, changes
    finally:
        await a.close()
        await b.close()


async def test_peers_see_each_other_and_measure_rtt(pair: tuple[HeartbeatNode, HeartbeatNode, list, list]) -> None:
    a, b, rtts, _ = pair
    await poll_until(lambda: len(rtts) >= 3)
    assert all(peer == "pom2" and 0 < rtt < 1.0 for peer, rtt in rtts)
    state = a.peer(b.instance)
    assert state is not None and state.rtt_s is not None and state.server == "pom2"
    assert state.connections == 2, "one connection each way"
    assert state.alive_since is not None and state.last_frame_at is not None
    assert state.last_frame_at >= state.alive_since
    assert a.alive_peers() == [b.instance]
    assert a.peer_gone("never-seen")


async def test_goodbye_marks_the_peer_gone_at_once(pair: tuple[HeartbeatNode, HeartbeatNode, list, list]) -> None:
    a, b, _, changes = pair
    assert await b.goodbye() == 2
    await poll_until(lambda: a.peer_gone(b.instance))
    state = a.peer(b.instance)
    assert state is not None and state.said_goodbye
    assert b.instance in changes


async def test_a_peer_that_dies_is_gone_without_waiting_for_timeouts(
    pair: tuple[HeartbeatNode, HeartbeatNode, list, list],
) -> None:
    a, b, _, changes = pair
    await b.close()
    await poll_until(lambda: a.peer_gone(b.instance), timeout_s=HB.heartbeat_dead_after_s / 2)
    state = a.peer(b.instance)
    assert state is not None and not state.said_goodbye and state.connections == 0
    assert b.instance in changes


async def raw_connect(node: HeartbeatNode) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert node.endpoint
    host, port = node.endpoint.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def assert_closed_by_peer(reader: asyncio.StreamReader) -> None:
    data = await asyncio.wait_for(reader.read(), 2.0)  # read to EOF: the node must close the socket
    assert b"PONG" not in data


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack(">I", 5000) + b"x" * 10,  # oversized
        struct.pack(">I", 9) + b"{bad json",  # not JSON
        encode_raw({**hello(), "v": 9}),  # unknown version
        encode_raw({**hello(), "type": "REBOOT"}),  # unknown type
    ],
    ids=["oversized", "bad-json", "unknown-version", "unknown-type"],
)
async def test_a_bad_frame_closes_only_its_own_connection(
    pair: tuple[HeartbeatNode, HeartbeatNode, list, list], garbage: bytes
) -> None:
    a, b, rtts, _ = pair
    reader, writer = await raw_connect(a)
    writer.write(encode_raw(hello()))
    writer.write(garbage)
    await writer.drain()
    await assert_closed_by_peer(reader)
    writer.close()
    assert a.protocol_errors == 1
    state = a.peer(b.instance)
    assert state is not None and state.connections == 2 and not a.peer_gone(b.instance)
    seen = len(rtts)
    await poll_until(lambda: len(rtts) > seen + 2)  # the good connection keeps beating


async def test_first_frame_must_be_a_hello_of_the_same_service(
    pair: tuple[HeartbeatNode, HeartbeatNode, list, list],
) -> None:
    a, _, _, _ = pair
    for first in ({**hello(), "type": "PING"}, hello(service="other_service")):
        reader, writer = await raw_connect(a)
        writer.write(encode_raw(first))
        await writer.drain()
        await assert_closed_by_peer(reader)
        writer.close()
    assert a.protocol_errors == 2


async def test_a_silent_connection_is_closed_after_the_miss_limit(
    pair: tuple[HeartbeatNode, HeartbeatNode, list, list],
) -> None:
    a, _, _, _ = pair
    reader, writer = await raw_connect(a)
    writer.write(encode_raw(hello("silent")))
    await writer.drain()
    got = await read_frame(reader, 1024)
    assert got is not None and got.type == "HELLO" and got.instance == a.instance
    await poll_until(lambda: not a.peer_gone("silent"))
    await poll_until(lambda: a.peer_gone("silent"), timeout_s=HB.heartbeat_dead_after_s * 3)
    assert await asyncio.wait_for(reader.read(), 2.0) == b""
    writer.close()


async def test_pings_are_answered_with_pong_of_the_same_seq(
    pair: tuple[HeartbeatNode, HeartbeatNode, list, list],
) -> None:
    a, _, _, _ = pair
    reader, writer = await raw_connect(a)
    writer.write(encode_raw(hello("pinger")))
    writer.write(encode_raw({**hello("pinger"), "type": "PING", "seq": 41}))
    await writer.drain()
    first = await read_frame(reader, 1024)
    pong = await read_frame(reader, 1024)
    assert first is not None and first.type == "HELLO"
    assert pong is not None and pong.type == "PONG" and pong.seq == 41 and pong.server == "pom1"
    writer.close()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed to make a test certificate")
async def test_heartbeats_over_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    rtts: list[tuple[str, float]] = []
    a = make_node("pom1", server_ssl=server_ctx, client_ssl=client_ctx, on_rtt=lambda p, r: rtts.append((p, r)))
    b = make_node("pom2", server_ssl=server_ctx, client_ssl=client_ctx)
    try:
        await a.start()
        await b.start()
        assert a.endpoint and b.endpoint
        a.set_peers({b.instance: ("pom2", b.endpoint)})
        b.set_peers({a.instance: ("pom1", a.endpoint)})
        await poll_until(lambda: len(rtts) >= 2 and not a.peer_gone(b.instance))
        # a plain-TCP client cannot talk to a TLS endpoint
        reader, writer = await raw_connect(a)
        writer.write(encode_raw(hello()))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 2.0) == b""
        writer.close()
    finally:
        await a.close()
        await b.close()


async def test_a_master_that_ends_its_term_is_seen_stepping_down() -> None:
    epoch = {"value": 7}
    changes: list[str] = []
    a = make_node("pom1", on_change=changes.append)
    b = make_node("pom2", epoch=lambda: epoch["value"])
    for node in (a, b):
        await node.start()
    try:
        assert a.endpoint and b.endpoint
        a.set_peers({b.instance: (b.server_name, b.endpoint)})
        b.set_peers({a.instance: (a.server_name, a.endpoint)})
        await poll_until(lambda: (s := a.peer(b.instance)) is not None and s.epoch == 7)
        assert not a.stepped_down(b.instance), "a master reporting its epoch has not stepped down"
        changes.clear()
        epoch["value"] = 0  # b's term ended
        await poll_until(lambda: a.stepped_down(b.instance))
        assert b.instance in changes, "stepping down wakes the dormants at once"
        state = a.peer(b.instance)
        assert state is not None
        # a frame that left earlier (older sender time) arriving late does not bring the old epoch back
        a._seen(Frame("PONG", b.server_name, b.instance, "svc", 7, 1, state.epoch_t - 1))
        assert a.stepped_down(b.instance)
        await b.goodbye()
        await poll_until(lambda: a.peer_gone(b.instance))
        assert not a.stepped_down(b.instance), "a departed peer is a failure, not a step-down"
    finally:
        await a.close()
        await b.close()
