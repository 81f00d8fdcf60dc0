"""The operational cache: typed client over the REPLICATED Ignite ``pom-*`` caches, the impact errors of a
lost cache, and the rebuild from PostgreSQL. See docs/cache-service.md."""

from pom_ha.cache.client import CacheClientStats, OperationalCache, quiet_pyignite_logs
from pom_ha.cache.errors import (
    AddContactRefused,
    AgentStateUnavailable,
    CacheUnavailable,
    CallbackRefused,
    JobStartRefused,
    StatisticsFrozen,
)
from pom_ha.cache.models import AgentEntry, Callback, ContactAdd, JobCounters, JobEntry
from pom_ha.cache.rebuild import RebuildResult, load_jobs, rebuild_from_postgres, refresh_job

__all__ = [
    "AddContactRefused",
    "AgentEntry",
    "AgentStateUnavailable",
    "CacheClientStats",
    "CacheUnavailable",
    "Callback",
    "CallbackRefused",
    "ContactAdd",
    "JobCounters",
    "JobEntry",
    "JobStartRefused",
    "OperationalCache",
    "RebuildResult",
    "StatisticsFrozen",
    "load_jobs",
    "quiet_pyignite_logs",
    "rebuild_from_postgres",
    "refresh_job",
]
