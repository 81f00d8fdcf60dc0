"""MediaClient against the simulator's socket server in this process (loopback, ephemeral ports)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from pom_ha.ha.retry import Backoff
from pom_ha.media.client import MediaClient, MediaUnavailable
from pom_ha.media.protocol import Accepted, Dial, Outcome, Rejected
from pom_ha.media.simulator import MediaPlatform
from pom_ha.wire import encode, read_frame
from services.media_simulator.server import MediaSimulatorServer
from tests.unit.conftest import poll_until


class HeldTimers:
    """Calls end only when the test says so."""

    def __init__(self) -> None:
        self.due: list[Callable[[], None]] = []

    def schedule(self, _delay_s: float, callback: Callable[[], None]) -> asyncio.Handle:
        self.due.append(callback)
        return asyncio.get_running_loop().call_soon(lambda: None)  # a cancellable no-op handle

    def fire_all(self) -> None:
        due, self.due = self.due, []
        for callback in due:
            callback()


async def _server(timers: HeldTimers | None = None, **kwargs: Any) -> MediaSimulatorServer:
    if timers is not None:
        kwargs["schedule"] = timers.schedule
    platform = MediaPlatform(lambda _o, _x: False, seed=5, **kwargs)
    srv = MediaSimulatorServer(platform, "127.0.0.1", 0, summary_interval_s=3600)
    await srv.start()
    return srv


@pytest.fixture
async def fast() -> AsyncIterator[MediaSimulatorServer]:
    srv = await _server(time_scale=0.0005)
    yield srv
    await srv.stop()


def _client(*servers: MediaSimulatorServer, **kwargs: Any) -> MediaClient:
    return MediaClient([("127.0.0.1", s.port) for s in servers], reply_timeout_s=2.0,
                       backoff=Backoff(initial_s=0.01, max_s=0.05), **kwargs)


def _dial(i: int, *, epoch: int = 1, scope: str = "job/j1") -> Dial:
    return Dial(f"a{i}", scope.split("/")[-1], f"c{i}", 1, "+15550100", epoch, scope)


async def _drain(q: asyncio.Queue[Outcome], n: int) -> list[Outcome]:
    got: list[Outcome] = []

    def enough() -> bool:
        while not q.empty():
            got.append(q.get_nowait())
        return len(got) >= n

    await poll_until(enough, timeout_s=10)
    return got


async def test_every_accepted_dial_gets_one_outcome(fast: MediaSimulatorServer) -> None:
    async with _client(fast) as client:
        replies = await asyncio.gather(*(client.dial(_dial(i)) for i in range(200)))
        assert all(isinstance(r, Accepted) for r in replies)
        outcomes = await _drain(client.outcomes, 200)
        assert sorted(o.attempt_id for o in outcomes) == sorted(f"a{i}" for i in range(200))
        await poll_until(lambda: client.in_flight == 0)
        stats = await client.stats()
        assert stats.dialed == 200 and sum(stats.completed.values()) == 200 and stats.connections == 1


async def test_a_bad_frame_closes_only_its_own_connection(fast: MediaSimulatorServer) -> None:
    async with _client(fast) as client:
        await client.wait_connected(5)
        reader, writer = await asyncio.open_connection("127.0.0.1", fast.port)
        bad_dial = {**_dial(900).to_frame(), "phone": None}
        writer.write(encode(bad_dial))  # a DIAL with a bad field: REJECTED, the connection stays
        reply = await read_frame(reader)
        assert reply is not None and reply["type"] == "REJECTED" and reply["reason"] == "bad_request"
        assert "DIAL.phone" in reply["detail"]
        writer.write(struct.pack(">I", 5) + b"nope!")
        error = await read_frame(reader)
        assert error is not None and error["type"] == "ERROR" and "not valid JSON" in error["reason"]
        assert await read_frame(reader) is None  # then closed
        writer.close()
        assert isinstance(await client.dial(_dial(1)), Accepted)
        await _drain(client.outcomes, 1)


async def test_outcomes_held_while_disconnected_arrive_after_the_reconnect() -> None:
    timers = HeldTimers()
    srv = await _server(timers)
    try:
        async with _client(srv) as client:
            for i in range(3):
                assert isinstance(await client.dial(_dial(i)), Accepted)
            srv.disconnect_all()
            timers.fire_all()  # the calls end while nobody owns them: held for job/j1
            outcomes = await _drain(client.outcomes, 3)
            assert sorted(o.attempt_id for o in outcomes) == ["a0", "a1", "a2"]
            assert client.reconnects >= 1 and client.in_flight == 0
            assert (await client.stats()).orphans_delivered == 3
    finally:
        await srv.stop()


async def test_calls_on_a_crashed_platform_are_reported_lost_after_failover() -> None:
    timers = HeldTimers()
    primary, standby = await _server(timers), await _server(time_scale=0.0005)
    try:
        async with _client(primary, standby) as client:
            assert await client.wait_connected(5) == ("127.0.0.1", primary.port)
            for i in range(2):
                await client.dial(_dial(i))
            primary.disconnect_all(stop_listening=True)
            lost = await _drain(client.outcomes, 2)
            assert {(o.attempt_id, o.code, o.platform_lost) for o in lost} == {
                ("a0", "NETWORK_FAILURE", True), ("a1", "NETWORK_FAILURE", True)}
            assert client.connected_to == ("127.0.0.1", standby.port)
            assert isinstance(await client.dial(_dial(5)), Accepted)
            assert (await _drain(client.outcomes, 1))[0].platform_lost is False
    finally:
        await primary.stop()
        await standby.stop()


async def test_no_platform_reachable_raises_a_retriable_error() -> None:
    client = MediaClient([("127.0.0.1", 1)], reply_timeout_s=0.2, backoff=Backoff(initial_s=0.01, max_s=0.05))
    try:
        with pytest.raises(MediaUnavailable) as info:
            await client.dial(_dial(1))
        assert info.value.retriable
    finally:
        await client.close()


async def test_down_mode_and_stale_epochs_through_the_client(fast: MediaSimulatorServer) -> None:
    async with _client(fast) as client:
        assert (await client.set_mode("down")).mode == "down"
        refused = await client.dial(_dial(1))
        assert isinstance(refused, Rejected) and refused.reason == "down"
        assert (await client.set_mode("up")).mode == "up"
        assert isinstance(await client.dial(_dial(2, epoch=7)), Accepted)
        stale = await client.dial(_dial(3, epoch=6))
        assert isinstance(stale, Rejected) and stale.reason == "stale_epoch"
        assert (await client.stats()).rejected == {"down": 1, "stale_epoch": 1}


async def test_a_taker_claims_the_scope_and_the_old_owner_is_fenced() -> None:
    timers = HeldTimers()
    srv = await _server(timers)
    got: list[Outcome] = []

    async def on_outcome(outcome: Outcome) -> None:
        if outcome.attempt_id == "a0":
            raise RuntimeError("a failing callback does not stop delivery")
        got.append(outcome)

    try:
        async with _client(srv) as old, _client(srv, on_outcome=on_outcome) as taker:
            await old.dial(_dial(0, epoch=1))
            await old.dial(_dial(1, epoch=1))
            claimed = await taker.claim("job/j1", 2)
            assert claimed.granted and claimed.in_progress == 2
            timers.fire_all()
            await poll_until(lambda: len(got) == 1)
            assert got[0].attempt_id == "a1" and got[0].epoch == 1
            assert old.outcomes.empty()
            stale = await old.dial(_dial(2, epoch=1))
            assert isinstance(stale, Rejected) and stale.reason == "stale_epoch"
            assert old.in_flight == 2  # ... until it learns that a newer epoch owns the scope
            assert (await old.claim("job/j1", 1)).granted is False
            assert old.in_flight == 0
    finally:
        await srv.stop()


async def test_a_stopping_platform_ends_calls_with_network_failure() -> None:
    timers = HeldTimers()
    srv = await _server(timers)
    async with _client(srv) as client:
        await client.dial(_dial(1))
        await srv.stop()
        outcome = (await _drain(client.outcomes, 1))[0]
        assert (outcome.code, outcome.platform_lost) == ("NETWORK_FAILURE", False)

