"""pim_kafka_producer_config rows -> librdkafka settings."""

from __future__ import annotations

import pytest
from confluent_kafka import Producer

from pom_ha.events.config import GUIDE_DEFAULTS, ProducerConfigError, map_producer_config


def test_the_guides_defaults_map_to_librdkafka_with_idempotence() -> None:
    s = map_producer_config(GUIDE_DEFAULTS)
    assert s.librdkafka == {
        "enable.idempotence": True, "acks": "all", "retries": 2, "retry.backoff.ms": 10000,
        "retry.backoff.max.ms": 10000, "request.timeout.ms": 120000, "linger.ms": 100, "message.timeout.ms": 120100,
        "compression.type": "zstd",
    }
    assert s.max_block_ms == 50000 and not s.overridden and s.ignored == ()


def test_a_table_row_wins_over_the_compression_and_linger_defaults() -> None:
    lib = map_producer_config({"compression.type": "none", "linger.ms": "5"}).librdkafka
    assert lib["compression.type"] == "none" and lib["linger.ms"] == 5 and lib["message.timeout.ms"] == 120005


def test_an_empty_table_means_the_guides_defaults() -> None:
    assert map_producer_config({}) == map_producer_config(GUIDE_DEFAULTS)


def test_librdkafka_accepts_the_mapped_settings() -> None:
    Producer({**map_producer_config(GUIDE_DEFAULTS).librdkafka, "bootstrap.servers": "127.0.0.1:1"})


def test_acks_and_idempotence_cannot_be_weakened_and_the_override_is_reported() -> None:
    s = map_producer_config({"acks": "1", "enable.idempotence": "false", "retries": "0",
                             "max.in.flight.requests.per.connection": "10"})
    assert s.librdkafka["acks"] == "all" and s.librdkafka["enable.idempotence"] is True
    assert s.librdkafka["retries"] == 1 and s.librdkafka["max.in.flight"] == 5
    assert s.overridden == {"acks": "1", "enable.idempotence": "false", "retries": "0",
                            "max.in.flight.requests.per.connection": "10"}


def test_java_names_are_translated_and_unknown_ones_listed() -> None:
    s = map_producer_config({"linger.ms": "20", "delivery.timeout.ms": "90000", "buffer.memory": "33554432",
                             "compression.type": "lz4", "client.id": "cm", "sasl.jaas.config": "x"})
    lib = s.librdkafka
    assert lib["linger.ms"] == 20 and lib["message.timeout.ms"] == 90000
    assert lib["queue.buffering.max.kbytes"] == 32768 and lib["compression.type"] == "lz4" and lib["client.id"] == "cm"
    assert s.ignored == ("sasl.jaas.config",)


@pytest.mark.parametrize("rows,names", [
    ({"retries": "two"}, "retries"),
    ({"request.timeout.ms": "-1"}, "request.timeout.ms"),
    ({"value.serializer": "org.apache.kafka.common.serialization.ByteArraySerializer"}, "value.serializer"),
])
def test_bad_rows_are_refused_naming_the_property(rows: dict[str, str], names: str) -> None:
    with pytest.raises(ProducerConfigError, match=names):
        map_producer_config(rows)
