"""STOMP frames, runtime-change messages and the client's failover across the broker list (a fake broker)."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from pom_ha.messaging.runtime import (
    RuntimeChange,
    RuntimeChangeError,
    RuntimeReply,
    change_headers,
    owner_selector,
    send_runtime_change,
)
from pom_ha.messaging.stomp import StompClient, StompUnavailable, decode_frame, encode_frame


def test_frame_round_trip_escapes_header_values() -> None:
    raw = encode_frame("SEND", {"destination": "/queue/x", "selector": "a = 'b:c'\nd"}, '{"k": 1}')
    frame = decode_frame(raw[:-1])
    assert frame is not None
    assert frame.command == "SEND"
    assert frame.headers["selector"] == "a = 'b:c'\nd"
    assert frame.headers["content-length"] == str(len(b'{"k": 1}'))
    assert frame.body == '{"k": 1}'
    assert decode_frame(b"\n\n") is None  # heart-beats


def test_runtime_change_validation() -> None:
    ok = RuntimeChange(1, "pacing_rate", "r1", "abc123", 3, pacing_rate=12.5, expires_ms=1)
    assert RuntimeChange.from_json(ok.to_json()) == ok
    assert ok.expired(now_ms=2) and not ok.expired(now_ms=1)
    assert change_headers(ok)["pom_owner"] == "abc123" and change_headers(ok)["expires"] == "1"
    for bad in ({"action": "dance"}, {"pacing_rate": 0}, {"pacing_rate": None}, {"job_id": 0}):
        data = {**json.loads(ok.to_json()), **bad}
        with pytest.raises(ValueError):
            RuntimeChange.from_json(json.dumps(data))
    assert owner_selector("abc123") == "pom_owner = 'abc123'"
    with pytest.raises(ValueError):
        owner_selector("x' OR '1'='1")


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


class FakeBroker:
    """Answers CONNECT, confirms SENDs with receipts, delivers SENDs to matching subscribers (no selectors
    except on pom_request) and records everything."""

    def __init__(self) -> None:
        self.sent: list[tuple[dict[str, str], str]] = []
        self.subs: list[tuple[asyncio.StreamWriter, dict[str, str]]] = []
        self.server: asyncio.Server | None = None
        self.auto_reply = True

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                raw = await reader.readuntil(b"\0")
                frame = decode_frame(raw[:-1])
                if frame is None:
                    continue
                if frame.command == "CONNECT":
                    writer.write(encode_frame("CONNECTED", {"version": "1.2"}))
                elif frame.command == "SUBSCRIBE":
                    self.subs.append((writer, frame.headers))
                elif frame.command == "SEND":
                    self.sent.append((frame.headers, frame.body))
                    writer.write(encode_frame("RECEIPT", {"receipt-id": frame.headers["receipt"]}))
                    if self.auto_reply and frame.headers["destination"] == "/queue/pom.job.runtime":
                        change = RuntimeChange.from_json(frame.body)
                        reply = RuntimeReply(change.request_id, change.job_id, "applied", "ok", "pom1", "i1")
                        for w, h in self.subs:
                            if h.get("selector", "").endswith(f"'{change.request_id}'"):
                                w.write(encode_frame("MESSAGE", {"subscription": h["id"], "ack": "a1",
                                                                  "message-id": "m1"}, reply.to_json()))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_client_fails_over_to_the_broker_that_answers() -> None:
    broker = FakeBroker()
    port = await broker.start()
    client = StompClient([("127.0.0.1", _closed_port()), ("127.0.0.1", port)], connect_timeout_s=0.5)
    try:
        assert await client.connect(3) == ("127.0.0.1", port)
        await client.send("/topic/t", "{}", timeout_s=2)
        assert broker.sent[0][0]["destination"] == "/topic/t"
        assert client.counts.sent == 1
    finally:
        await client.close()
        await broker.close()


async def test_no_broker_means_a_clear_refusal() -> None:
    client = StompClient([("127.0.0.1", _closed_port())], connect_timeout_s=0.2)
    with pytest.raises(StompUnavailable, match=r"no ActiveMQ broker accepted a connection within 0\.5 s"):
        await client.connect(0.5)
    change = RuntimeChange(1, "pause", "r2", "abc", 1)
    with pytest.raises(RuntimeChangeError, match="nothing was applied"):
        await send_runtime_change([("127.0.0.1", _closed_port())], change, timeout_s=0.5)


async def test_runtime_change_round_trip_and_unanswered_change() -> None:
    broker = FakeBroker()
    port = await broker.start()
    try:
        change = RuntimeChange(5, "pacing_rate", "req1", "abc", 2, pacing_rate=3.0)
        reply = await send_runtime_change([("127.0.0.1", port)], change, timeout_s=3)
        assert (reply.status, reply.request_id, reply.job_id) == ("applied", "req1", 5)
        headers, _body = next(s for s in broker.sent if s[0]["destination"] == "/queue/pom.job.runtime")
        assert headers["pom_owner"] == "abc" and headers["pom_request"] == "req1"
        broker.auto_reply = False
        with pytest.raises(RuntimeChangeError, match="expired at the broker and was not applied"):
            await send_runtime_change([("127.0.0.1", port)], RuntimeChange(5, "pause", "req2", "abc", 2),
                                      timeout_s=0.5, grace_s=0.2)
    finally:
        await broker.close()
