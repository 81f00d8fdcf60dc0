"""The Rule Engine client and server on 127.0.0.1, no database: a fake locator stands in for ``ha_lease``.

Covers the epoch gate (a stale reply is dropped, counted, and its connection given up), waiting for a
master and giving up at the timeout, failover to the next master on a push, and the server's handling of
malformed requests and of the end of its term.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from pom_ha.clients.rule_engine import (
    MasterEndpoint,
    RuleEngineClient,
    RuleEngineRefused,
    RuleEngineUnavailable,
)
from pom_ha.domain.rules import RuleSet
from pom_ha.ha.term import MasterTerm
from pom_ha.wire import encode, read_frame, write_frame
from services.rule_engine.server import RuleServer

CONTACT = {"id": "c1", "phone": "+14155550100", "timezone": "UTC"}


class FakeLocator:
    def __init__(self, endpoint: MasterEndpoint | None = None) -> None:
        self.endpoint = endpoint
        self._on_change: Callable[[str], None] = lambda _c: None

    def start(self, on_change: Callable[[str], None]) -> None:
        self._on_change = on_change

    async def locate(self) -> MasterEndpoint | None:
        return self.endpoint

    async def close(self) -> None:
        pass

    def push(self, endpoint: MasterEndpoint | None) -> None:
        self.endpoint = endpoint
        self._on_change("lease-notify")


@contextlib.asynccontextmanager
async def fake_master(epochs: list[int]) -> AsyncIterator[int]:
    """A scripted master: the n-th reply (over all connections) carries ``epochs[n]`` (the last repeats)."""
    replies = iter(epochs)
    last = epochs[-1]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal last
        with contextlib.suppress(OSError):
            while (frame := await read_frame(reader)) is not None:
                last = next(replies, last)
                reply: dict[str, Any] = {"v": 1, "req": frame["req"], "epoch": last}
                if frame["type"] == "PING":
                    reply["type"] = "PONG"
                else:
                    reply.update(type="VERDICT", allowed=True, code=None, retry_at=None, reason="allowed")
                await write_frame(writer, reply)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def _client(locator: FakeLocator, timeout_s: float = 2.0) -> RuleEngineClient:
    return RuleEngineClient("unused", "unused", locator=locator, timeout_s=timeout_s)


async def test_a_stale_reply_is_dropped_counted_and_its_connection_given_up() -> None:
    # PONG 7, VERDICT 7, then a VERDICT of epoch 6 (a deposed master), then epoch 7 again after reconnecting
    async with fake_master([7, 7, 6, 7]) as port:
        async with _client(FakeLocator(MasterEndpoint("pom1", "127.0.0.1", port, 7))) as client:
            assert (await client.evaluate(CONTACT)).epoch == 7
            verdict = await client.evaluate(CONTACT)
            assert verdict.epoch == 7 and verdict.allowed
            assert client.stale_replies == 1
            assert client.gate.highest[("rule_engine", "")] == 7
            assert client.reconnects == 1 and client.reconnect_causes == {"socket": 1}


async def test_evaluate_waits_for_a_master_then_gives_up() -> None:
    locator = FakeLocator(None)
    async with _client(locator, timeout_s=0.2) as client:
        with pytest.raises(RuleEngineUnavailable, match="no Rule Engine master reachable"):
            await client.evaluate(CONTACT)
        assert not client.connected.is_set()
        async with fake_master([3]) as port:
            waiting = asyncio.create_task(client.evaluate(CONTACT, timeout_s=5))
            locator.push(MasterEndpoint("pom2", "127.0.0.1", port, 3))  # pushed while evaluate waits
            assert (await waiting).epoch == 3
            assert await client.wait_connected(0)
            assert client.reconnects == 0  # a first connection is not a reconnect


async def _rule_server(epoch: int) -> tuple[MasterTerm, RuleServer, int]:
    term = MasterTerm("rule_engine", "", epoch)
    server = RuleServer(term, lambda: RuleSet(dnc=frozenset({"+14155550199"})))
    return term, server, await server.start("127.0.0.1", 0)


async def test_failover_to_the_next_master_on_a_push() -> None:
    term1, server1, port1 = await _rule_server(5)
    locator = FakeLocator(MasterEndpoint("pom1", "127.0.0.1", port1, 5))
    async with _client(locator) as client:
        first = await client.evaluate({**CONTACT, "phone": "+14155550199"})
        assert (first.epoch, first.code) == (5, "DNC_BLOCKED")
        term1.end("demoted")  # what the elector does; the serving code closes everything in its finally
        server1.close()
        assert await _until(lambda: not client.connected.is_set())
        term2, server2, port2 = await _rule_server(6)
        try:
            pending = asyncio.create_task(client.evaluate(CONTACT))
            locator.push(MasterEndpoint("pom2", "127.0.0.1", port2, 6))
            assert (await pending).epoch == 6
            assert await client.ping() == 6
            assert client.reconnects == 1 and client.reconnect_causes["lease-notify"] == 1
            assert client.last_outage_s is not None and client.stale_replies == 0
        finally:
            term2.end("test over")
            server2.close()


async def test_a_malformed_request_closes_only_its_own_connection() -> None:
    term, server, port = await _rule_server(9)
    try:
        bad_r, bad_w = await asyncio.open_connection("127.0.0.1", port)
        good_r, good_w = await asyncio.open_connection("127.0.0.1", port)
        bad_w.write(encode({"v": 1, "type": "EVALUATE", "req": 4, "contact": "nope"}))
        error = await read_frame(bad_r)
        assert error is not None and (error["type"], error["req"], error["epoch"]) == ("ERROR", 4, 9)
        assert "contact must be an object" in error["reason"]
        assert await read_frame(bad_r) is None  # closed by the server
        bad_w.close()
        await write_frame(good_w, {"v": 1, "type": "PING", "req": 1})
        assert await read_frame(good_r) == {"v": 1, "type": "PONG", "req": 1, "epoch": 9}
        assert server.counts.errors == 1
        good_w.write(b"\x00\x00\x00\x03[1]")  # not a JSON object: ERROR without req, then closed
        error = await read_frame(good_r)
        assert error is not None and error["type"] == "ERROR" and "req" not in error
        good_w.close()
    finally:
        term.end("test over")
        server.close()


async def test_refused_request_raises_and_the_end_of_term_drops_every_connection() -> None:
    term, server, port = await _rule_server(2)
    async with _client(FakeLocator(MasterEndpoint("pom1", "127.0.0.1", port, 2)), timeout_s=0.3) as client:
        with pytest.raises(RuleEngineRefused, match="must be a string"):
            await client.evaluate({"id": "c1", "phone": "+14155550100"})
        assert await client.wait_connected(2)  # reconnected after the server closed that connection
        readers = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        assert await _until(lambda: server.connections == 4)
        term.end("demoted")
        server.close()
        for reader, writer in readers:
            assert await reader.read() == b""
            writer.close()
        with pytest.raises(RuleEngineUnavailable):
            await client.evaluate(CONTACT)


async def _until(predicate: Callable[[], bool], timeout_s: float = 2.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True
