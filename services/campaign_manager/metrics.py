"""The Campaign Manager's own counters, on the daemon's Prometheus registry (served at /metrics) and in
/health, so tests and the monitor read the same numbers."""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge


class CMMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.jobs_active = Gauge("pom_cm_jobs_active", "jobs this Campaign Manager runs (not ended)", registry=r)
        self.attempts = Counter("pom_cm_attempts", "attempts written (dialing) before their DIAL", registry=r)
        self.dials = Counter("pom_cm_dials", "DIAL replies by result", ["result"], registry=r)
        self.outcomes = Counter(
            "pom_cm_outcomes", "media outcomes by what became of them (recorded, stale_epoch, unknown_job, "
            "late, bad_job)", ["result"], registry=r)
        self.failover_resolved = Counter(
            "pom_cm_failover_resolved", "in-flight attempts of a previous owner resolved as CALL_FAILOVER", registry=r)
        self.re_refusals = Counter("pom_cm_re_refusals", "contacts the Rule Engine held back", registry=r)
        self.re_stale_replies = Gauge("pom_cm_re_stale_replies", "Rule Engine replies of a stale epoch dropped",
                                      registry=r)
        self.dialing_paused = Gauge("pom_cm_dialing_paused", "jobs whose dialing waits for a Rule Engine master",
                                    registry=r)
        self.fence_lost = Counter("pom_cm_fence_lost", "jobs stopped because their assignment moved", registry=r)
        # predictive jobs run here: today's abandon rate and its cap (alert rule PomAbandonRateOverCap)
        self.abandon_rate = Gauge("pom_cm_abandon_rate", "abandons / live answers today of a predictive job",
                                  ["job"], registry=r)
        self.abandon_cap = Gauge("pom_cm_abandon_cap", "the abandon cap of a predictive job", ["job"], registry=r)
        self.tally: Tally[str] = Tally()  # the same events, for /health

    def count(self, name: str, n: int = 1) -> None:
        self.tally[name] += n

    def pacing(self, job: int, rate: float | None, cap: float) -> None:
        """Publish a predictive job's abandon rate (nothing before its first live answer) and cap."""
        if rate is not None:
            self.abandon_rate.labels(str(job)).set(rate)
        self.abandon_cap.labels(str(job)).set(cap)

    def job_gone(self, job: int) -> None:
        """The job no longer runs here: its series go (another CM publishes them now)."""
        for gauge in (self.abandon_rate, self.abandon_cap):
            try:
                gauge.remove(str(job))
            except KeyError:
                pass
