"""Where clients find the topology's servers: every address a client holds (and fails over between), read from
the topology model beside it. Runtime code imports these from here, never from the server launchers
(``pom_ha/infra``), which use them too."""

from __future__ import annotations

from pyignite.exceptions import ClusterError, HandshakeError, NotSupportedByClusterError, ReconnectError

from pom_ha.config import Topology

# Errors an Ignite thin-client call raises when the node is down, starting, or not (yet) in an active cluster.
CLIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    TimeoutError,
    HandshakeError,
    ReconnectError,
    ClusterError,
    NotSupportedByClusterError,
)


def bootstrap_servers(topo: Topology) -> str:
    """Comma list ``addr:port`` of every Kafka broker, for clients' ``bootstrap.servers``."""
    return ",".join(f"{s.address}:{topo.ports.kafka}" for s in topo.servers_running("kafka"))


def thin_client_addresses(topo: Topology) -> list[tuple[str, int]]:
    """Every Ignite node's thin-client endpoint, in topology order (what a client should hold)."""
    return [(s.address, topo.ports.ignite_thin_client) for s in topo.servers_running("ignite")]


def stomp_addresses(topo: Topology) -> list[tuple[str, int]]:
    """Every ActiveMQ broker's STOMP endpoint in topology order (clients hold them all and fail over)."""
    return [(s.address, topo.ports.activemq_stomp) for s in topo.servers_running("activemq")]
