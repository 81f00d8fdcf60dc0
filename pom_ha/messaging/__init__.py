"""ActiveMQ messaging over STOMP: an asyncio client that fails over across the broker list and
resubscribes (``stomp``), and the runtime-change / attempt-result messages (``runtime``). See docs/activemq.md."""

from pom_ha.messaging.stomp import Frame, StompClient, StompError, StompUnavailable

__all__ = ["Frame", "StompClient", "StompError", "StompUnavailable"]
