"""structlog configuration for daemons: one JSON object per line on stderr; DSNs shown without secrets."""

from __future__ import annotations

import logging
import sys
from typing import TextIO
from urllib.parse import urlsplit

import structlog


def configure_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """JSON lines with ISO UTC timestamps, level, logger context (server/service/epoch bound by callers)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(default=str),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def redact_dsn(dsn: str) -> str:
    """``postgresql://user:secret@host:5432/db`` -> ``host:5432/db`` (never log the password)."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "?"
        port = parts.port or 5432
    except ValueError:
        return "<unparseable dsn>"
    return f"{host}:{port}{parts.path or ''}"
