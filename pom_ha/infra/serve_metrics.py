"""``/health`` and ``/metrics`` of ``pom-ha infra serve``: one POM server's share of the real servers as
Prometheus gauges, on the server's address at the topology's ``ports.metrics_infra``.

* ``pom_ha_server_up{kind}``: 1 while the server process runs and answers its readiness probe.
* ``pom_ha_server_restarts_total{kind}``: times ``infra serve`` found it dead and started it again.
* ``pom_ha_kafka_under_replicated_partitions``: partitions whose leader is this server's broker and whose
  in-sync replicas are fewer than their replicas (Kafka's own per-broker ``UnderReplicatedPartitions``:
  summed over the brokers, every partition is counted once).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pom_ha.config import Topology
from pom_ha.ha.sdnotify import notify
from pom_ha.ha.status_http import StatusHTTP
from pom_ha.infra.base import Launcher
from pom_ha.infra.kafka import KafkaLauncher
from pom_ha.infra.process import InfraError


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, server: str, launchers: list[Launcher]) -> None:
        self.server = server
        self.launchers = launchers
        self.state = "starting"
        self.registry = CollectorRegistry()
        self.up = Gauge("pom_ha_server_up", "1 while the server process runs and answers its readiness probe",
                        ["kind"], registry=self.registry)
        self.restarts = Counter("pom_ha_server_restarts", "times infra serve started the server again",
                                ["kind"], registry=self.registry)
        self.under_replicated = Gauge(
            "pom_ha_kafka_under_replicated_partitions",
            "partitions led by this server's broker with fewer in-sync replicas than replicas",
            registry=self.registry,
        )
        self._up: dict[str, bool] = {}
        for launcher in launchers:
            self.up.labels(launcher.kind).set(0)
            self.restarts.labels(launcher.kind)

    async def refresh(self) -> None:
        """Probe every server of the share once and update the gauges."""
        for launcher in self.launchers:
            up = launcher.running() and await launcher.probe()
            self._up[launcher.kind] = up
            self.up.labels(launcher.kind).set(1 if up else 0)
            if isinstance(launcher, KafkaLauncher):
                md = await launcher.metadata() if up else None
                if md is not None:
                    self.under_replicated.set(sum(
                        1 for topic in md.topics.values() for part in topic.partitions.values()
                        if part.leader == launcher.broker_id and len(part.isrs) < len(part.replicas)
                    ))

    def restarted(self, kind: str) -> None:
        self.restarts.labels(kind).inc()

    def health(self) -> dict[str, Any]:
        return {"server": self.server, "state": self.state, "servers": dict(self._up)}

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def metrics_http(topo: Topology, server: str, metrics: ServeMetrics, port: int | None) -> StatusHTTP:
    """``/health`` and ``/metrics`` of ``metrics`` on the server's address at ``port`` (default
    ``ports.metrics_infra``); a port in use is an :class:`InfraError` that names it."""
    http = StatusHTTP(metrics.health, metrics)
    address = topo.server(server).address
    port = topo.ports.metrics_infra if port is None else port
    try:
        await http.start(address, port)
    except OSError as exc:
        await http.close()
        raise InfraError(f"{server}: cannot serve /metrics on {address}:{port}: {exc.strerror or exc}") from None
    return http


async def observe(
    topo: Topology, server: str, launchers: list[Launcher], *, stop: asyncio.Event, interval_s: float = 2.0,
    metrics_port: int | None = None,
) -> None:
    """Serve the share's gauges without starting, restarting or stopping anything (the process lab, where one
    ``pom-ha lab up`` runs every server and lab faults must stay faults) until ``stop`` is set."""
    metrics = ServeMetrics(server, launchers)
    http = await metrics_http(topo, server, metrics, metrics_port)
    metrics.state = "running"
    notify("READY=1", f"STATUS=observing {', '.join(lc.name for lc in launchers) or 'nothing'}")
    try:
        while not stop.is_set():
            await metrics.refresh()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
    finally:
        metrics.state = "stopping"
        await http.close()
