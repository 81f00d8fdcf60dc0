"""librdkafka's own log lines (broker down, retries, coordinator moves) as structlog JSON lines instead of
raw ``%4|...`` text on stderr: pass ``{"logger": KafkaLogBridge("events-publisher")}`` in a client config."""

from __future__ import annotations

import logging
from typing import Any

import structlog


class KafkaLogBridge:
    """confluent-kafka calls ``log(level, fmt, *args)`` with Python logging levels."""

    def __init__(self, client: str) -> None:
        self._log = structlog.get_logger("librdkafka").bind(client=client)

    def log(self, level: int, msg: str, *args: Any) -> None:
        text = msg % args if args else msg
        if level >= logging.ERROR:
            self._log.error("librdkafka", detail=text)
        elif level >= logging.WARNING:
            self._log.warning("librdkafka", detail=text)
        else:
            self._log.info("librdkafka", detail=text)
