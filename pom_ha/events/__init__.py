"""The Event SDK: versioned event models and topic names (``models``), producer settings from
``pim_kafka_producer_config`` (``config``), the non-blocking idempotent publisher (``publisher``) and topic
creation with RF 3 / min ISR 2 (``topics``). See docs/events.md."""

from pom_ha.events.config import ProducerSettings, load_producer_settings, map_producer_config
from pom_ha.events.models import (
    AgentEvent,
    AgentStatisticsEvent,
    AttemptEvent,
    AttemptPhase,
    EnrichedAttemptResultEvent,
    EventKind,
    JobEvent,
    JobStatisticsEvent,
    MalformedEvent,
    PomEvent,
    ProducerRef,
    event_topics,
    parse_event,
    topic_name,
)
from pom_ha.events.publisher import Delivery, DeliveryCounts, EventPublisher, EventPublishError

__all__ = [
    "AgentEvent", "AgentStatisticsEvent", "AttemptEvent", "AttemptPhase", "Delivery", "DeliveryCounts",
    "EnrichedAttemptResultEvent", "EventKind", "EventPublishError", "EventPublisher", "JobEvent",
    "JobStatisticsEvent", "MalformedEvent", "PomEvent", "ProducerRef", "ProducerSettings", "event_topics",
    "load_producer_settings", "map_producer_config", "parse_event", "topic_name",
]
