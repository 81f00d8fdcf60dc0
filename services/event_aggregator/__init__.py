"""The Enriched Attempt Event Aggregator daemon (``python -m services.event_aggregator``)."""
