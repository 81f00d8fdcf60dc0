"""`pom-ha bench activemq-failover`: SIGKILL of the ActiveMQ master -> the first confirmed STOMP send.

Self-contained: an isolated copy of the topology (its own addresses and lab folder) running only
PostgreSQL and the two ActiveMQ brokers (JDBC master/slave, lease-database-locker). A client that holds
both brokers' STOMP addresses (``pom_ha.messaging.stomp.StompClient``, the one the CLI and the Campaign
Manager use) sends persistent messages with receipts; each trial SIGKILLs the master and measures, on one
monotonic clock, the time from just before the signal to the first ``RECEIPT`` of a SEND on the new master
(connection refused by the dead broker, refused by the slave until it holds the lease and opens its
connectors, then CONNECT, SEND, RECEIPT = the message is stored in PostgreSQL). The killed broker is
started again and waits as the slave before the next trial. Everything is stopped at the end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections.abc import Callable
from typing import Any

from pom_ha.bench.failover import latency_summary, percentile
from pom_ha.bench.isolated import isolated_topology
from pom_ha.config import Topology
from pom_ha.config.addresses import stomp_addresses
from pom_ha.infra.activemq import KEEPALIVE_MS, LEASE_MS, MASTER, SLAVE, ActiveMQLauncher
from pom_ha.infra.process import InfraError
from pom_ha.infra.stack import Stack
from pom_ha.messaging.stomp import StompClient, StompError, StompUnavailable

#: 127.0.64.N / PostgreSQL 127.0.65.1: beside the test sessions (20, 40, 50, 60, 70) and the other benches
BLOCK = 64
#: the vendor guide's ActiveMQ failover time (2 min 20 s)
POM_FAILOVER_S = 140.0
QUEUE = "/queue/pomha.bench.failover"


def _brokers(stack: Stack) -> list[ActiveMQLauncher]:
    brokers = [b for b in stack.launchers("activemq") if isinstance(b, ActiveMQLauncher)]
    if len(brokers) != 2:
        raise InfraError(f"the ActiveMQ failover bench needs two brokers, the topology has {len(brokers)}")
    return brokers


async def _roles(brokers: list[ActiveMQLauncher], timeout_s: float = 120.0) -> tuple[ActiveMQLauncher,
                                                                                   ActiveMQLauncher]:
    """(master, slave) once one broker answers STOMP and the other waits for the lease."""
    deadline = time.monotonic() + timeout_s
    while True:
        roles = await asyncio.gather(*(b.role() for b in brokers))
        if sorted(roles) == sorted([MASTER, SLAVE]):
            master = brokers[roles.index(MASTER)]
            return master, brokers[roles.index(SLAVE)]
        if time.monotonic() > deadline:
            raise InfraError(f"no master + slave pair within {timeout_s:.0f} s: "
                             + ", ".join(f"{b.name} {r}" for b, r in zip(brokers, roles, strict=True)))
        await asyncio.sleep(0.1)


async def _confirmed_send(client: StompClient, deadline: float, attempt_timeout_s: float) -> int:
    """Send until one SEND gets its RECEIPT (reconnecting across the broker list); returns the sends tried."""
    tried = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise InfraError("no confirmed send on the new master before the trial's deadline")
        try:
            if not client.connected.is_set():
                await client.connect(timeout_s=left)
            tried += 1
            await client.send(QUEUE, f'{{"probe": "{uuid.uuid4()}"}}', timeout_s=min(attempt_timeout_s, left))
            return tried
        except (StompUnavailable, StompError):
            # the connection to the killed broker broke (or the new master refused while starting):
            # drop it and walk the broker list again
            # (a send that timed out on a connection still open: drop it too)
            if client.connected.is_set() and client._writer is not None:
                client._connection_lost("bench: send failed")
            continue


async def _trial(brokers: list[ActiveMQLauncher], topo: Topology) -> dict[str, Any]:
    master, slave = await _roles(brokers)
    client = StompClient(stomp_addresses(topo), name="pomha-bench-amq", connect_timeout_s=1.0)
    try:
        await client.connect(timeout_s=30)
        if client.connected_to != (master.address, master.stomp_port):
            raise InfraError(f"client connected to {client.connected_to}, expected the master {master.name}")
        # warm: the connection and a stored message before the fault (a trial measures failover only)
        await _confirmed_send(client, time.monotonic() + 30, 10.0)
        t0 = time.monotonic()
        await asyncio.to_thread(master.kill)
        sends = await _confirmed_send(client, t0 + 120, 2.0)
        ms = (time.monotonic() - t0) * 1000
        new_master = client.connected_to
    finally:
        await client.close()
    if new_master != (slave.address, slave.stomp_port):
        raise InfraError(f"the confirmed send went to {new_master}, not the former slave {slave.name}")
    # the killed broker comes back as the slave for the next trial
    master.start()
    await master.wait_ready()
    await _roles(brokers)
    return {"ms": ms, "from": master.name, "to": slave.name, "sends": sends}


async def run_bench(base: Topology, trials: int, echo: Callable[[str], None] = print) -> dict[str, Any]:
    topo = isolated_topology(base, block=BLOCK)
    stack = Stack(topo)
    lab = topo.lab_dir()
    samples: list[float] = []
    try:
        await stack.up(only=["postgres", "activemq"])
        brokers = _brokers(stack)
        for i in range(trials):
            r = await _trial(brokers, topo)
            samples.append(r["ms"])
            echo(f"  trial {i + 1}/{trials}: {r['ms']:.0f} ms ({r['from']} killed -> {r['to']}, "
                 f"{r['sends']} send(s) tried)")
    finally:
        await stack.down()
        if not os.environ.get("POM_KEEP_LAB"):
            shutil.rmtree(lab, ignore_errors=True)
    p99 = percentile(samples, 99)
    return {
        "trials": trials,
        **latency_summary(samples),
        "samples_ms": [round(s, 1) for s in samples],
        "lease_ms": LEASE_MS,
        "keepalive_ms": KEEPALIVE_MS,
        "target_p99_ms": 3000,
        "pom_s": POM_FAILOVER_S,
        "pom_ratio_p99": round(POM_FAILOVER_S * 1000 / p99, 1),
    }
