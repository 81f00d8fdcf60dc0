"""The Campaign Manager's LISTEN on the ``ha_assignment`` channel (migration 0006): the health-checked,
reconnecting :class:`pom_ha.ha.pg_listen.ChannelListener`, with the trigger's JSON payload decoded. After
every (re)connect ``on_reconnect()`` is called: notifications may have been missed, so the caller re-reads
its assignments."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import structlog

from pom_ha.ha.pg_listen import ChannelListener
from pom_ha.ha.retry import Backoff

CHANNEL = "ha_assignment"
log = structlog.get_logger("services.campaign_manager.listen")


class AssignmentListener(ChannelListener):
    """Calls ``on_change(payload)`` for each ``NOTIFY ha_assignment`` (payload: the JSON object of the
    trigger: service, item, owner, previous, epoch) and ``on_reconnect()`` after each (re)connect."""

    def __init__(
        self, dsn: str, on_change: Callable[[dict[str, Any]], None], on_reconnect: Callable[[], None], *,
        timeout_s: float = 1.0, health_interval_s: float = 1.0, application_name: str = "pom-ha:cm-listen",
    ) -> None:
        def payload(text: str) -> None:
            try:
                obj = json.loads(text)
            except ValueError:
                log.warning("unreadable ha_assignment notification", payload=text[:200])
                return
            if isinstance(obj, dict):
                on_change(obj)

        super().__init__(dsn, CHANNEL, payload, on_reconnect, timeout_s=timeout_s,
                         health_interval_s=health_interval_s, backoff=Backoff(initial_s=0.05, max_s=2.0),
                         application_name=application_name)
