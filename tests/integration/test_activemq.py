"""ActiveMQ JDBC master/slave: one master, a confirmed message survives SIGKILL of the master.

STOMP is spoken with raw frames on asyncio streams so that every wait has a deadline (stomp.py's
receipt and message waits have none).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest

from pom_ha.infra.activemq import MASTER, SLAVE, ActiveMQLauncher, stomp_addresses
from pom_ha.infra.stack import Stack

pytestmark = pytest.mark.integration

Frame = tuple[str, dict[str, str], str]


class RawStomp:
    """Just enough STOMP 1.2 for the test: CONNECT, SEND with receipt, SUBSCRIBE, read a frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int, timeout_s: float = 10.0) -> RawStomp:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        conn = cls(reader, writer)
        await conn.send_frame("CONNECT", {"accept-version": "1.2", "host": "pomha"})
        command, headers, _ = await conn.read_frame(timeout_s)
        assert command == "CONNECTED", headers
        return conn

    async def send_frame(self, command: str, headers: dict[str, str], body: str = "") -> None:
        head = "".join(f"{k}:{v}\n" for k, v in headers.items())
        self.writer.write(f"{command}\n{head}\n{body}\0".encode())
        await self.writer.drain()

    async def read_frame(self, timeout_s: float) -> Frame:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\0"), timeout_s)
        text = raw[:-1].decode().lstrip("\r\n")  # newlines between frames are heart-beats / EOLs
        head, _, body = text.partition("\n\n")
        command, *lines = head.split("\n")
        headers = dict(line.split(":", 1) for line in lines if ":" in line)
        return command, headers, body

    async def close(self) -> None:
        try:
            await self.send_frame("DISCONNECT", {})
        except OSError:
            pass
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


async def poll_until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> float:
    """Seconds until ``check`` passed; fails the test with ``what`` at the deadline."""
    t0 = time.monotonic()
    while not await check():
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"not within {timeout_s:.0f} s: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


def brokers_of(stack: Stack) -> list[ActiveMQLauncher]:
    brokers = stack.launchers("activemq")
    assert len(brokers) == 2
    assert all(isinstance(b, ActiveMQLauncher) for b in brokers)
    return [b for b in brokers if isinstance(b, ActiveMQLauncher)]


async def find_master(brokers: list[ActiveMQLauncher], timeout_s: float = 60.0) -> ActiveMQLauncher:
    found: list[ActiveMQLauncher] = []

    async def one_master() -> bool:
        found[:] = [b for b in brokers if await b.is_master()]
        return len(found) == 1

    await poll_until(one_master, timeout_s, "exactly one ActiveMQ master")
    return found[0]


async def test_one_master_one_slave_and_stomp_endpoints(stack: Stack) -> None:
    brokers = brokers_of(stack)
    master = await find_master(brokers)
    slave = next(b for b in brokers if b is not master)
    assert await master.role() == MASTER
    await poll_until(lambda: _has_role(slave, SLAVE), 60, f"{slave.name} reports {SLAVE!r}")
    assert stomp_addresses(stack.topo) == [(b.address, b.stomp_port) for b in brokers]
    assert all(host.startswith("127.") for host, _ in stomp_addresses(stack.topo))


async def _has_role(broker: ActiveMQLauncher, role: str) -> bool:
    return await broker.role() == role


async def test_confirmed_message_survives_sigkill_of_master(
    stack: Stack, record_property: Callable[[str, object], None]
) -> None:
    brokers = brokers_of(stack)
    master = await find_master(brokers)
    standby = next(b for b in brokers if b is not master)
    queue = f"/queue/pomha.it.failover.{uuid.uuid4().hex[:12]}"
    body = f"sent before the kill {uuid.uuid4()}"

    conn = await RawStomp.connect(master.address, master.stomp_port)
    try:
        headers = {"destination": queue, "persistent": "true", "receipt": "r-1", "content-type": "text/plain"}
        await conn.send_frame("SEND", headers, body)
        command, reply, _ = await conn.read_frame(15)
        # only a receipted SEND is known to be in PostgreSQL (DESIGN §4): unconfirmed ones may be lost
        assert (command, reply.get("receipt-id")) == ("RECEIPT", "r-1"), (command, reply)
    finally:
        await conn.close()

    await asyncio.to_thread(master.kill)
    try:
        t0 = time.monotonic()
        await poll_until(standby.is_master, 90, f"{standby.name} takes over after SIGKILL of {master.name}")
        failover_s = time.monotonic() - t0
        record_property("activemq_failover_after_sigkill_s", round(failover_s, 2))
        print(f"\nactivemq failover after SIGKILL: {failover_s:.2f} s ({master.name} -> {standby.name})")

        conn = await RawStomp.connect(standby.address, standby.stomp_port)
        try:
            await conn.send_frame("SUBSCRIBE", {"destination": queue, "id": "0", "ack": "auto"})
            command, headers, got = await conn.read_frame(30)
        finally:
            await conn.close()
        assert command == "MESSAGE", (command, headers)
        assert got == body
    finally:
        # bring the killed broker back so the stack is whole for the tests after this one
        master.start()
        await master.wait_ready()
    await poll_until(lambda: _has_role(master, SLAVE), 60, f"restarted {master.name} waits as slave")
    assert await standby.role() == MASTER
