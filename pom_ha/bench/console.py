"""``pom-ha bench console``: how fast the console shows a lease change, and how fast it serves the overview.

* **update**: a lease changes hands in PostgreSQL (``ha_lease``, the table every takeover writes) ->
  the console's Server-Sent Events stream delivers a component table showing the new master. Measured
  by an SSE client over ``trials`` takeovers of a bench role between pom1 and pom2 (goal <= 1 s; POM's
  monitor shows stale data for as long as its CD is down, 140 s).
* **overview**: 20 concurrent viewers each load ``/`` every ``interval_s`` (1 s; 0: back to back, a
  saturation test rather than viewers); the server time of each answer is read from
  its ``Server-Timing`` header (auth, both database reads and rendering). Goal p99 <= 100 ms.

Self-contained by default: an isolated copy of the topology (PostgreSQL only) with the web daemon on
pom1. ``--url`` and ``--token`` measure a running lab instead (its own web daemon and database).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import asyncpg

from pom_ha.bench.failover import latency_summary, percentile
from pom_ha.bench.isolated import isolated_topology
from pom_ha.config import Topology, dump_topology
from pom_ha.infra.process import ProcessRecord, log_tail, stop_process
from pom_ha.infra.stack import Stack
from pom_ha.web import auth

BLOCK = 62
PORT = 7792
SERVICE = "bench_console"
POM_MONITOR_STALE_S = 140.0
_TIMING = re.compile(r"app;dur=([0-9.]+)")


async def _events(http: aiohttp.ClientSession, url: str, queue: asyncio.Queue[tuple[float, str]]) -> None:
    """Read the SSE stream; put (arrival time, data) of every ``components`` event."""
    async with http.get(url + "/events", timeout=aiohttp.ClientTimeout(total=None, sock_read=60)) as resp:
        resp.raise_for_status()
        kind, data = "", []
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif not line:
                if kind == "components":
                    queue.put_nowait((time.monotonic(), "\n".join(data)))
                kind, data = "", []


def _master_shown(html: str, server: str) -> bool:
    row = re.search(rf'<tr data-service="{SERVICE}">(.*?)</tr>', html, re.S)
    return bool(row and re.search(rf'data-server="{server}">MASTER', row.group(1)))


async def measure(url: str, token: str, dsn: str, trials: int, viewers: int, seconds: float,
                  echo: Callable[[str], None], interval_s: float = 1.0) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    conn = await asyncpg.connect(dsn)
    updates: list[float] = []
    server_ms: list[float] = []
    try:
        await conn.execute(
            "INSERT INTO ha_member (service, server, instance_id, state, seen_at) VALUES"
            " ($1, 'pom1', 'bench1', 'DORMANT', now() + interval '1 day'),"
            " ($1, 'pom2', 'bench2', 'DORMANT', now() + interval '1 day')"
            " ON CONFLICT (service, server) DO UPDATE SET seen_at = EXCLUDED.seen_at", SERVICE)
        async with aiohttp.ClientSession(headers=headers) as http:
            queue: asyncio.Queue[tuple[float, str]] = asyncio.Queue()
            reader = asyncio.create_task(_events(http, url, queue))
            try:
                for i in range(trials):
                    holder = ("pom1", "pom2")[i % 2]
                    while not queue.empty():
                        queue.get_nowait()
                    t0 = time.monotonic()  # before the statement: its commit round trip is counted
                    await conn.execute(
                        "INSERT INTO ha_lease AS l (service, scope, holder_server, holder_instance, epoch, acquired_at,"
                        " renewed_at, expires_at) VALUES ($1, '', $2, $2, 1, now(), now(), now() + interval '1 hour')"
                        " ON CONFLICT (service, scope) DO UPDATE SET holder_server = $2, holder_instance = $2,"
                        " epoch = l.epoch + 1, acquired_at = now(), renewed_at = now(),"
                        " expires_at = now() + interval '1 hour', released_at = NULL", SERVICE, holder)
                    deadline = t0 + 30
                    while True:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise TimeoutError(f"takeover {i + 1}: {holder} not shown as master within 30 s")
                        at, html = await asyncio.wait_for(queue.get(), left)
                        if _master_shown(html, holder):
                            updates.append((at - t0) * 1000)
                            break
                    echo(f"  takeover {i + 1}/{trials} -> {holder}: shown after {updates[-1]:.0f} ms")
                    await asyncio.sleep(0.3)

                # the viewers load the overview while a live stream is open, as every open overview has
                stop_at = time.monotonic() + seconds

                async def viewer(k: int) -> None:
                    await asyncio.sleep(interval_s * k / viewers)  # spread the viewers over the interval
                    while time.monotonic() < stop_at:
                        started = time.monotonic()
                        async with http.get(url + "/", headers={"Accept": "text/html"}) as resp:
                            await resp.read()
                            match = _TIMING.search(resp.headers.get("Server-Timing", ""))
                            if resp.status != 200 or not match:
                                raise RuntimeError(f"overview answered {resp.status}")
                            server_ms.append(float(match.group(1)))
                        await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))

                await asyncio.gather(*(viewer(k) for k in range(viewers)))
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
    finally:
        await conn.execute("DELETE FROM ha_lease WHERE service = $1", SERVICE)
        await conn.execute("DELETE FROM ha_member WHERE service = $1", SERVICE)
        await conn.close()
    up = latency_summary(updates)
    echo(f"  overview: {len(server_ms)} pages for {viewers} concurrent viewers in {seconds:.0f} s "
         f"(each reloading every {interval_s:g} s; 0: as fast as answered)")
    return {
        "trials": trials, "update_p50_ms": up["p50_ms"], "update_p99_ms": up["p99_ms"], "update_max_ms": up["max_ms"],
        "update_goal_ms": 1000, "pom_monitor_stale_s": POM_MONITOR_STALE_S,
        "viewers": viewers, "viewer_interval_s": interval_s, "overview_pages": len(server_ms),
        "overview_p50_ms": round(percentile(server_ms, 50), 1), "overview_p99_ms": round(percentile(server_ms, 99), 1),
        "overview_goal_p99_ms": 100,
    }


async def run_bench(base: Topology, *, trials: int = 20, viewers: int = 20, seconds: float = 10.0,
                    interval_s: float = 1.0, url: str | None = None, token: str | None = None, block: int = BLOCK,
                    echo: Callable[[str], None] = print) -> dict[str, Any]:
    if url:
        if not token:
            raise ValueError("--url needs --token (pom-ha token create --user U --role viewer)")
        return await measure(url.rstrip("/"), token, base.postgres.dsn(), trials, viewers, seconds, echo, interval_s)
    from pom_ha.lab.daemons import start_daemon

    topo = isolated_topology(base, block=block)
    stack = Stack(topo)
    lab = topo.lab_dir()
    rec: ProcessRecord | None = None
    try:
        await stack.up(only=["postgres"])
        topology_file = dump_topology(topo, lab / "topology.toml")
        rec = start_daemon(topo, topology_file, "pom1", "rest-api", "--port", str(PORT))
        conn = await asyncpg.connect(topo.postgres.dsn())
        try:
            await auth.add_user(conn, "bench", "viewer", secrets.token_urlsafe(16))
            bench_token = await auth.create_token(conn, "bench", "viewer")
        finally:
            await conn.close()
        web = f"http://{topo.server('pom1').address}:{PORT}"
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as http:
            while True:
                if not rec.alive():
                    raise RuntimeError(f"web daemon exited:\n{log_tail(rec.log)}")
                try:
                    async with http.get(web + "/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("web daemon not answering within 60 s")
                await asyncio.sleep(0.1)
        return await measure(web, bench_token, topo.postgres.dsn(), trials, viewers, seconds, echo, interval_s)
    finally:
        if rec is not None:
            stop_process(rec, lab / "run")
        await stack.down()
        if not os.environ.get("POM_KEEP_LAB"):
            shutil.rmtree(lab, ignore_errors=True)
