"""The media simulator as a real daemon process (pom1's address, ``ports.media_simulator``), driven through
MediaClient and raw sockets. It needs no database; it runs under pom1's uid like every lab daemon."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pom_ha.infra.process import ProcessRecord, log_tail, stop_process
from pom_ha.infra.stack import Stack
from pom_ha.lab.daemons import start_daemon
from pom_ha.media.client import MediaClient
from pom_ha.media.protocol import Accepted, Dial, Outcome, Rejected
from pom_ha.wire import read_frame

pytestmark = pytest.mark.integration


async def _wait_listening(rec: ProcessRecord, address: tuple[str, int], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection(*address)
        except OSError:
            if not rec.alive():
                raise AssertionError(f"media simulator exited:\n{log_tail(rec.log)}") from None
            if time.monotonic() > deadline:
                raise AssertionError(f"media simulator not listening on {address}:\n{log_tail(rec.log)}") from None
            await asyncio.sleep(0.05)
        else:
            writer.close()
            return


@pytest.fixture(scope="module")
def simulator(stack: Stack, topology_file: Path) -> Iterator[tuple[ProcessRecord, tuple[str, int]]]:
    rec = start_daemon(stack.topo, topology_file, "pom1", "media-simulator",
                       "--time-scale", "0.01", "--capacity", "500", "--seed", "11")
    try:
        yield rec, (stack.topo.server("pom1").address, stack.topo.ports.media_simulator)
    finally:
        stop_process(rec, stack.topo.lab_dir() / "run")
        assert not rec.alive()


@pytest.fixture
async def client(simulator: tuple[ProcessRecord, tuple[str, int]]) -> AsyncIterator[MediaClient]:
    rec, address = simulator
    await _wait_listening(rec, address)
    async with MediaClient([address], reply_timeout_s=5.0) as c:
        await c.wait_connected(10)
        yield c


def _dial(i: int, *, epoch: int = 1, job: str = "it1") -> Dial:
    return Dial(f"{job}-c{i}-1", job, f"c{i}", 1, f"+1555{i:07d}", epoch, f"job/{job}")


async def _collect(q: asyncio.Queue[Outcome], n: int, timeout_s: float = 30.0) -> list[Outcome]:
    got: list[Outcome] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{len(got)} of {n} outcomes within {timeout_s} s")
        try:
            got.append(await asyncio.wait_for(q.get(), remaining))
        except TimeoutError:
            continue
    return got


async def test_n_dials_get_n_outcomes(client: MediaClient) -> None:
    n = 300
    replies = await asyncio.gather(*(client.dial(_dial(i, job="n300")) for i in range(n)))
    assert all(isinstance(r, Accepted) for r in replies)
    outcomes = await _collect(client.outcomes, n)
    assert sorted(o.attempt_id for o in outcomes) == sorted(_dial(i, job="n300").attempt_id for i in range(n))
    stats = await client.stats()
    assert stats.dialed >= n and stats.in_progress == 0 and stats.peak_in_progress <= 500


async def test_a_malformed_frame_disconnects_only_its_sender(
    client: MediaClient, simulator: tuple[ProcessRecord, tuple[str, int]]
) -> None:
    _, address = simulator
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(struct.pack(">I", 7) + b"garbage")
        error = await asyncio.wait_for(read_frame(reader), 10)
        assert error is not None and error["type"] == "ERROR"
        assert await asyncio.wait_for(read_frame(reader), 10) is None  # the platform closed it
    finally:
        writer.close()
    assert isinstance(await client.dial(_dial(1, job="bad")), Accepted)
    assert (await _collect(client.outcomes, 1))[0].attempt_id == "bad-c1-1"


async def test_stale_epochs_and_duplicates_are_rejected(client: MediaClient) -> None:
    assert isinstance(await client.dial(_dial(1, epoch=3, job="fence")), Accepted)
    stale = await client.dial(_dial(2, epoch=2, job="fence"))
    assert isinstance(stale, Rejected) and stale.reason == "stale_epoch"
    dup = await client.dial(_dial(1, epoch=3, job="fence"))
    assert isinstance(dup, Rejected) and dup.reason == "duplicate"
    await _collect(client.outcomes, 1)
    stats = await client.stats()
    assert stats.rejected.get("stale_epoch", 0) >= 1 and stats.rejected.get("duplicate", 0) >= 1


async def test_down_mode_rejects_then_recovers(client: MediaClient) -> None:
    assert (await client.set_mode("down", drop_calls=True)).mode == "down"
    try:
        refused = await client.dial(_dial(1, job="down"))
        assert isinstance(refused, Rejected) and refused.reason == "down"
    finally:
        assert (await client.set_mode("up")).mode == "up"
    assert isinstance(await client.dial(_dial(2, job="down")), Accepted)
    await _collect(client.outcomes, 1)
