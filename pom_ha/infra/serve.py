"""`pom-ha infra serve --server pomN`: run ONE POM server's share of the real servers in the foreground.

`pom-ha infra up` starts a whole lab from one place. On separate hosts (VMs, or one container per POM
server in `docker-compose.yml`) each POM server runs its own share instead: its ZooKeeper node, Kafka broker,
Ignite node and ActiveMQ broker, in that order, each waited for on its own protocol (a ZooKeeper node is
ready only once a quorum exists, so the servers of the other hosts must come up too; the wait is long).
While serving it supervises them: a server whose process died is started again (with a backoff, and said in
the log). SIGTERM / SIGINT stop them in reverse order and return. PostgreSQL is not part of it: on
separate hosts it is its own host (or container) and `pom-ha db migrate` prepares the schema.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

from pom_ha.config import Topology
from pom_ha.ha.sdnotify import notify
from pom_ha.infra.base import Launcher
from pom_ha.infra.process import InfraError
from pom_ha.infra.serve_metrics import ServeMetrics, metrics_http
from pom_ha.infra.stack import Stack

SERVE_ORDER = ("zookeeper", "kafka", "ignite", "activemq")


def server_launchers(topo: Topology, server: str, without: tuple[str, ...] = ()) -> list[Launcher]:
    """This POM server's JVM servers in start order (less the kinds in ``without``, e.g. ``ignite`` where a
    cache service supervises the node); an unknown server or kind is refused by name."""
    names = [s.name for s in topo.servers]
    if server not in names:
        raise InfraError(f"unknown server {server!r}: the topology {topo.source} has {', '.join(names)}")
    unknown = [k for k in without if k not in SERVE_ORDER]
    if unknown:
        raise InfraError(f"unknown server kind(s) {', '.join(unknown)}: expected some of {', '.join(SERVE_ORDER)}")
    stack = Stack(topo)
    return [stack.launcher(kind, server) for kind in SERVE_ORDER
            if kind in topo.server(server).runs and kind not in without]


async def serve(
    topo: Topology, server: str, *, without: tuple[str, ...] = (), ready_timeout_s: float = 600.0,
    check_interval_s: float = 2.0, stop: asyncio.Event | None = None, echo: Callable[[str], None] = print,
    metrics_port: int | None = None,
) -> list[str]:
    """Start, wait for, supervise and finally stop this server's share; returns the names it restarted.

    ``/health`` and ``/metrics`` listen on the server's address at ``metrics_port`` (default the topology's
    ``ports.metrics_infra``; 0 = ephemeral) from the start; under systemd (``Type=notify``) READY=1 goes
    out once every server of the share is ready."""
    launchers = server_launchers(topo, server, without)
    metrics = ServeMetrics(server, launchers)
    http = await metrics_http(topo, server, metrics, metrics_port)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handlers = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            handlers.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests): the caller sets ``stop``
            pass
    restarted: list[str] = []
    try:
        for launcher in launchers:
            launcher.start()
            seconds = await launcher.wait_ready(ready_timeout_s)
            echo(f"  {launcher.name} ready in {seconds:.1f} s")
        echo(f"{server}: {len(launchers)} server(s) up: {', '.join(lc.name for lc in launchers) or 'none'}")
        metrics.state = "running"
        notify("READY=1", f"STATUS=serving {', '.join(lc.name for lc in launchers) or 'nothing'}; "
                          f"/metrics on port {http.port}")
        backoff: dict[str, float] = {}
        while not stop.is_set():
            for launcher in launchers:
                if launcher.running() or time.monotonic() < backoff.get(launcher.name, 0.0):
                    continue
                echo(f"  {launcher.name} is not running: starting it again")
                restarted.append(launcher.name)
                metrics.restarted(launcher.kind)
                launcher.start()
                try:
                    await launcher.wait_ready(ready_timeout_s)
                    backoff.pop(launcher.name, None)
                except InfraError as exc:
                    echo(f"  {launcher.name} did not come back: {exc}")
                    backoff[launcher.name] = time.monotonic() + 10.0
            await metrics.refresh()
            try:
                await asyncio.wait_for(stop.wait(), check_interval_s)
            except TimeoutError:
                pass
    finally:
        metrics.state = "stopping"
        notify("STOPPING=1")
        await http.close()
        for launcher in reversed(launchers):
            if launcher.running():
                await asyncio.to_thread(launcher.stop)
        for sig in handlers:
            loop.remove_signal_handler(sig)
    return restarted
