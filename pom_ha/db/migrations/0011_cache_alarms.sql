-- A Common CD that cannot start a job because the cache service is down (the guide: "a new job cannot start")
-- keeps one open 'job_start_refused' alarm per job, cleared when the job starts; like 'nuisance' it is a
-- condition alarm, so the partial unique index that keeps one open row per (kind, job) now covers both.
DROP INDEX IF EXISTS cd_alarms_open;
CREATE UNIQUE INDEX IF NOT EXISTS cd_alarms_open ON cd_alarms (kind, coalesce(job_id, 0))
    WHERE cleared_at IS NULL AND kind IN ('nuisance', 'job_start_refused');
