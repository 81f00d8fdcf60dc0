"""Campaign Director timing and limits: one frozen model, units in the names, rules checked at load.

=============================  =======  =====================================================================
setting                        default  meaning
=============================  =======  =====================================================================
allocation_interval_ms         200      job allocation, reallocation, operator commands, unassigning ends
finish_check_interval_ms       1000     periodic finish-criteria check of active jobs
nuisance_interval_ms           2000     nuisance-rate calculation and alarm decisions
nuisance_window_s              900      the window the nuisance rate is computed over
nuisance_cap                   0.03     alarm above this rate (a fraction)
nuisance_min_live_answers      30       no verdict on fewer live answers
trend_interval_ms              15000    progress sample of every active job (cd_job_trends)
cm_dead_after_ms               1500     a Campaign Manager not seen for this long has its jobs moved
schedule_interval_ms           250      how often due schedules (starts, purges) and imports are looked at
late_tolerance_ms              2000     a schedule fired later than this is reported as missed, fired late
import_batch_rows              1000     rows per fenced import transaction
export_chunk_rows              500      attempts per export chunk (one checkpoint each)
purge_batch_jobs               100      jobs deleted per fenced purge transaction
zone_check_interval_ms         250      zone directors: look for a returning home director this often
zone_handback_timeout_ms       10000    a zone handed back is competed for again if its home has not taken it
=============================  =======  =====================================================================

Rules: ``cm_dead_after_ms >= 2 * allocation_interval_ms``; ``late_tolerance_ms >= 2 * schedule_interval_ms``
(an on-time schedule is never reported late). Each value can be overridden by ``POM_CD_<FIELD>``.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pom_ha.config.env import settings_from_env

ENV_PREFIX = "POM_CD_"


class CDSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    allocation_interval_ms: int = Field(200, ge=10)
    finish_check_interval_ms: int = Field(1000, ge=50)
    nuisance_interval_ms: int = Field(2000, ge=100)
    nuisance_window_s: int = Field(900, ge=1)
    nuisance_cap: float = Field(0.03, gt=0, lt=1)
    nuisance_min_live_answers: int = Field(30, ge=1)
    trend_interval_ms: int = Field(15000, ge=100)
    cm_dead_after_ms: int = Field(1500, ge=100)
    schedule_interval_ms: int = Field(250, ge=10)
    late_tolerance_ms: int = Field(2000, ge=0)
    import_batch_rows: int = Field(1000, ge=1)
    export_chunk_rows: int = Field(500, ge=1)
    purge_batch_jobs: int = Field(100, ge=1)
    zone_check_interval_ms: int = Field(250, ge=10)
    zone_handback_timeout_ms: int = Field(10000, ge=100)

    @model_validator(mode="after")
    def _rules(self) -> CDSettings:
        problems = []
        if self.cm_dead_after_ms < 2 * self.allocation_interval_ms:
            problems.append("cm_dead_after_ms >= 2 * allocation_interval_ms is violated")
        if self.late_tolerance_ms < 2 * self.schedule_interval_ms:
            problems.append("late_tolerance_ms >= 2 * schedule_interval_ms is violated: on-time schedules "
                            "would be reported late")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def load_settings(environ: Mapping[str, str] | None = None) -> CDSettings:
    return settings_from_env(CDSettings, ENV_PREFIX, "Campaign Director settings", environ)
