"""The one EventPublisher of a daemon, opened once a Kafka broker of the topology answers.

Daemons (Campaign Manager, Campaign Director, ...) call :func:`open_event_publisher` from a task: it waits for
a broker as long as it takes, so dialing or directing never waits for Kafka, and returns None when the topology
has no broker or the publisher cannot start (said once in the log; the daemon works on without events).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from pom_ha.config import Topology
from pom_ha.events.config import GUIDE_DEFAULTS, load_producer_rows, map_producer_config
from pom_ha.events.publisher import EventPublisher


async def open_event_publisher(topology: Topology, pool: Any, *, service: str, server: str, instance: str,
                               log: Any, epoch: Callable[[], int] = lambda: 0) -> EventPublisher | None:
    """The daemon's one EventPublisher, once a Kafka broker of the topology answers (probed every 5 s; this
    waits as long as it takes, so run it as a task). Settings from ``pim_kafka_producer_config`` (the
    guide's defaults if the table cannot be read). None if the topology has no broker or it cannot start."""
    from pom_ha.config.addresses import bootstrap_servers
    from pom_ha.kafka.tls import security_config

    brokers = [(s.address, topology.ports.kafka) for s in topology.servers_running("kafka")]
    if not brokers:
        return None
    warned = False
    while not await _any_reachable(brokers):
        if not warned:
            log.info("no Kafka broker reachable: events are not published until one is")
            warned = True
        await asyncio.sleep(5.0)
    try:
        async with asyncio.timeout(5.0):
            rows = await load_producer_rows(pool)
    except Exception as exc:  # the database may be down: the guide's defaults then
        log.warning("producer settings not readable, using the guide's defaults", error=str(exc))
        rows = dict(GUIDE_DEFAULTS)
    try:
        publisher = EventPublisher(bootstrap_servers(topology), map_producer_config(rows), service=service,
                                   server=server, instance=instance, epoch=epoch,
                                   security=security_config(topology))
        await publisher.start()
    except Exception as exc:  # a bad table row, missing TLS files: said once, the daemon works on
        log.error("event publisher not started; events are not published", error=str(exc))
        return None
    log.info("event publisher started", bootstrap=bootstrap_servers(topology))
    return publisher


async def _any_reachable(addresses: Sequence[tuple[str, int]], timeout_s: float = 1.0) -> bool:
    for host, port in addresses:
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        except (OSError, TimeoutError):
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return False
