"""Prometheus metrics of one daemon instance (its own registry, so tests can build several daemons)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pom_ha.ha.store import HAEvent

RTT_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class HAMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.role_master = Gauge(
            "pom_ha_role_master", "1 while this instance is master of the role scope, else 0",
            ["service", "scope"], registry=r,
        )
        self.epoch = Gauge(
            "pom_ha_epoch", "epoch of the current (or last) term of this instance", ["service", "scope"], registry=r
        )
        self.transitions = Counter(
            "pom_ha_transitions", "HA transitions by kind (one per ha_event row)", ["service", "scope", "kind"],
            registry=r,
        )
        self.heartbeat_rtt = Histogram(
            "pom_ha_heartbeat_rtt_seconds", "heartbeat PING->PONG round trip (monotonic)", ["peer"],
            buckets=RTT_BUCKETS, registry=r,
        )
        self.heartbeat_peers_alive = Gauge(
            "pom_ha_heartbeat_peers_alive", "peers with a live heartbeat", ["service"], registry=r
        )
        self.fenced_writes = Counter(
            "pom_ha_fenced_writes", "fenced writes by result (ok, rejected, error)", ["service", "scope", "result"],
            registry=r,
        )
        self.store_up = Gauge(
            "pom_ha_status_store_up", "1 when the last status-store call of the role succeeded", ["service", "scope"],
            registry=r,
        )

    def transition(self, event: HAEvent) -> None:
        self.transitions.labels(event.service, event.scope, event.kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
