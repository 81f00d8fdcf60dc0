"""Producer settings: the ``pim_kafka_producer_config`` table (Java client property names, the guide's
defaults) mapped onto librdkafka (confluent-kafka) settings.

The table stays the single place an operator changes producer behaviour. Two values are not the table's
to choose: ``enable.idempotence=true`` and ``acks=all`` are always set (a table row asking for less is
reported in :attr:`ProducerSettings.overridden`), because the no-loss guarantees in docs/events.md rest on
them. Java properties with no librdkafka meaning are listed in :attr:`ProducerSettings.ignored`.

Mapping (Java -> librdkafka):

* ``acks`` -> ``acks`` (forced ``all``); ``retries`` -> ``retries``; ``retry.backoff.ms`` -> ``retry.backoff.ms``
  (and ``retry.backoff.max.ms`` raised to at least the same value, librdkafka requires max >= base);
* ``request.timeout.ms`` -> ``request.timeout.ms`` and the delivery deadline ``message.timeout.ms`` =
  request timeout + ``linger.ms`` (what the Java client does when ``delivery.timeout.ms`` is not set);
* ``max.block.ms`` -> no librdkafka equivalent (its ``produce`` never blocks; it raises when the local
  queue is full): :class:`~pom_ha.events.publisher.EventPublisher` waits up to this long for queue room;
* ``key.serializer`` / ``value.serializer`` must be the StringSerializer: events are UTF-8 JSON text;
* ``linger.ms`` (default 100 when the table has no row), ``batch.size``, ``compression.type`` (default
  ``zstd`` when the table has no row), ``client.id``, ``delivery.timeout.ms`` (->
  ``message.timeout.ms``), ``max.in.flight.requests.per.connection`` (-> ``max.in.flight``, at most 5 with
  idempotence), ``buffer.memory`` (-> ``queue.buffering.max.kbytes``) are mapped too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

STRING_SERIALIZER = "org.apache.kafka.common.serialization.StringSerializer"
#: the guide's PIM_Kafka_Producer_Config defaults (also seeded by migration 0001)
GUIDE_DEFAULTS: dict[str, str] = {
    "acks": "all",
    "retries": "2",
    "request.timeout.ms": "120000",
    "max.block.ms": "50000",
    "retry.backoff.ms": "10000",
    "key.serializer": STRING_SERIALIZER,
    "value.serializer": STRING_SERIALIZER,
}
_INT_PROPS = {"retries", "request.timeout.ms", "max.block.ms", "retry.backoff.ms", "linger.ms", "batch.size",
              "delivery.timeout.ms", "max.in.flight.requests.per.connection", "buffer.memory"}
_DIRECT = {"retries": "retries", "retry.backoff.ms": "retry.backoff.ms", "request.timeout.ms": "request.timeout.ms",
           "linger.ms": "linger.ms", "batch.size": "batch.size", "compression.type": "compression.type",
           "client.id": "client.id"}
MAX_IN_FLIGHT_IDEMPOTENT = 5
#: pom-ha's defaults where the table has no row (the guide's table sets neither): zstd batches and a
#: 100 ms linger cut the Event SDK's bytes per attempt from ~3.6 kB to ~1.2-1.3 kB (pom-ha bench
#: kafka-bytes; docs/events.md "Bytes per attempt"). A row (e.g. compression.type = none) wins.
DEFAULT_COMPRESSION = "zstd"
DEFAULT_LINGER_MS = 100


class ProducerConfigError(ValueError):
    """A ``pim_kafka_producer_config`` row that cannot be used; the message names the property."""


@dataclass(frozen=True)
class ProducerSettings:
    """librdkafka settings (without bootstrap and security) plus what the mapping decided."""

    librdkafka: dict[str, Any]
    max_block_ms: int
    overridden: dict[str, str] = field(default_factory=dict)  # property -> the table's value we replaced
    ignored: tuple[str, ...] = ()


def _int(prop: str, value: str) -> int:
    try:
        n = int(value.strip())
    except ValueError:
        raise ProducerConfigError(f"pim_kafka_producer_config: {prop}={value!r} is not an integer") from None
    if n < 0:
        raise ProducerConfigError(f"pim_kafka_producer_config: {prop}={n} must not be negative")
    return n


def map_producer_config(rows: Mapping[str, str]) -> ProducerSettings:
    """Map the table's rows (property -> value; missing ones take the guide's defaults)."""
    props = {**GUIDE_DEFAULTS, **{k.strip(): str(v).strip() for k, v in rows.items()}}
    overridden: dict[str, str] = {}
    ignored: list[str] = []
    out: dict[str, Any] = {"enable.idempotence": True, "acks": "all"}
    if props["acks"].lower() not in ("all", "-1"):
        overridden["acks"] = props["acks"]
    if props.get("enable.idempotence", "true").lower() != "true":
        overridden["enable.idempotence"] = props["enable.idempotence"]
    for ser in ("key.serializer", "value.serializer"):
        if props[ser] != STRING_SERIALIZER:
            raise ProducerConfigError(
                f"pim_kafka_producer_config: {ser}={props[ser]!r} is not supported (events are JSON text; "
                f"use {STRING_SERIALIZER})")
    ints = {k: _int(k, v) for k, v in props.items() if k in _INT_PROPS}
    for java, rd in _DIRECT.items():
        if java in props:
            out[rd] = ints.get(java, props[java])
    if ints["retries"] < 1:
        # librdkafka refuses idempotence without retries: keep the table's intent (few retries) but legal
        overridden["retries"] = props["retries"]
        out["retries"] = 1
    if ints["request.timeout.ms"] < 1:
        raise ProducerConfigError("pim_kafka_producer_config: request.timeout.ms must be at least 1")
    out["retry.backoff.max.ms"] = max(1000, ints["retry.backoff.ms"])
    linger = ints.get("linger.ms", DEFAULT_LINGER_MS)
    out["linger.ms"] = linger
    out.setdefault("compression.type", DEFAULT_COMPRESSION)
    out["message.timeout.ms"] = ints.get("delivery.timeout.ms", ints["request.timeout.ms"] + linger)
    if "max.in.flight.requests.per.connection" in ints:
        n = ints["max.in.flight.requests.per.connection"]
        if n > MAX_IN_FLIGHT_IDEMPOTENT:
            overridden["max.in.flight.requests.per.connection"] = str(n)
        out["max.in.flight"] = max(1, min(n, MAX_IN_FLIGHT_IDEMPOTENT))
    if "buffer.memory" in ints:
        out["queue.buffering.max.kbytes"] = max(1, ints["buffer.memory"] // 1024)
    known = set(GUIDE_DEFAULTS) | set(_DIRECT) | _INT_PROPS | {"enable.idempotence"}
    ignored = sorted(k for k in props if k not in known)
    return ProducerSettings(out, ints["max.block.ms"], overridden, tuple(ignored))


async def load_producer_rows(conn: Any, timeout_s: float = 5.0) -> dict[str, str]:
    """The table's rows from an asyncpg connection or pool."""
    rows = await conn.fetch("SELECT property, value FROM pim_kafka_producer_config", timeout=timeout_s)
    return {str(r["property"]): str(r["value"]) for r in rows}


async def load_producer_settings(dsn: str, timeout_s: float = 5.0) -> ProducerSettings:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=timeout_s)
    try:
        return map_producer_config(await load_producer_rows(conn, timeout_s))
    finally:
        await conn.close()
