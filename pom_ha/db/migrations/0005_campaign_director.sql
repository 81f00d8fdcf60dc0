-- Campaign Director: schedules, operator job commands, alarms, purge runs, exports, zone homes.
--
-- Every write the Common CD makes here is fenced by its lease (ha_lease campaign_director/''); zone homes
-- are written by the zone's director under its zone lease (ha_lease zone_director/<zone>). Operator tools
-- (pom-ha campaign/list/job) only insert requests (schedules, commands, exports); a master applies them,
-- so nothing an operator asks for while no Common CD is up is lost or applied twice.

-- Timed work of the Common CD. A one-shot schedule (interval_s NULL) fires once; a recurring one moves
-- due_at to its next occurrence after now() when it fires, so occurrences missed while no master was up
-- fire ONCE, late (fired_late_ms says by how much).
CREATE TABLE IF NOT EXISTS cd_schedules (
    id             bigserial PRIMARY KEY,
    kind           text NOT NULL CHECK (kind IN ('campaign_start', 'purge')),
    campaign_id    bigint REFERENCES campaigns(id) ON DELETE CASCADE,
    due_at         timestamptz NOT NULL,
    interval_s     integer CHECK (interval_s IS NULL OR interval_s > 0),
    -- purge: jobs that ended more than this long ago are deleted (with their contacts and attempts)
    retention_s    integer CHECK (retention_s IS NULL OR retention_s >= 0),
    state          text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'fired', 'cancelled')),
    fired_count    integer NOT NULL DEFAULT 0,
    last_fired_at  timestamptz,
    fired_late_ms  bigint,
    last_epoch     bigint,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'campaign_start') = (campaign_id IS NOT NULL)),
    CHECK (kind <> 'purge' OR retention_s IS NOT NULL)
);
CREATE INDEX IF NOT EXISTS cd_schedules_due ON cd_schedules (due_at) WHERE state = 'pending';

-- Pause / resume / stop asked by an operator. Applied by the Common CD (a job's state does not change
-- while no master is up, as in the guide), each exactly once.
CREATE TABLE IF NOT EXISTS job_commands (
    id            bigserial PRIMARY KEY,
    job_id        bigint NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    command       text NOT NULL CHECK (command IN ('pause', 'resume', 'stop')),
    state         text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'applied', 'refused')),
    result        text,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    applied_at    timestamptz,
    epoch         bigint
);
CREATE INDEX IF NOT EXISTS job_commands_pending ON job_commands (id) WHERE state = 'pending';

-- Alarms raised by the Common CD: nuisance rate over the cap, schedules that fired late, ...
-- A condition alarm (nuisance) has at most one open row (cleared_at NULL) per job; an event alarm
-- (schedule_late) is one row per occurrence, left open for the operator.
CREATE TABLE IF NOT EXISTS cd_alarms (
    id           bigserial PRIMARY KEY,
    kind         text NOT NULL,
    job_id       bigint REFERENCES jobs(id) ON DELETE CASCADE,
    message      text NOT NULL,
    detail       jsonb NOT NULL DEFAULT '{}',
    raised_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    cleared_at   timestamptz,
    epoch        bigint NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS cd_alarms_open ON cd_alarms (kind, coalesce(job_id, 0))
    WHERE cleared_at IS NULL AND kind = 'nuisance';

-- One row per purge run. A run cut off by a failure stays 'running' with its epoch; the next master
-- marks it 'abandoned' and does NOT resume it: the next scheduled occurrence purges (the guide's rule).
CREATE TABLE IF NOT EXISTS cd_purge_runs (
    id            bigserial PRIMARY KEY,
    schedule_id   bigint REFERENCES cd_schedules(id) ON DELETE SET NULL,
    state         text NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'completed', 'abandoned')),
    deleted_jobs  bigint NOT NULL DEFAULT 0,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    note          text,
    epoch         bigint NOT NULL
);

-- Export of a job's attempts to a CSV file, resumable: ``rows_written``/``bytes_written`` and the last
-- exported key are committed after each chunk, so a new master truncates the file to ``bytes_written``
-- and continues after the key.
CREATE TABLE IF NOT EXISTS cd_exports (
    id               bigserial PRIMARY KEY,
    job_id           bigint NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    path             text NOT NULL,
    state            text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'completed', 'failed')),
    rows_written     bigint NOT NULL DEFAULT 0,
    bytes_written    bigint NOT NULL DEFAULT 0,
    last_contact_id  text,
    last_attempt_no  integer,
    resumed          integer NOT NULL DEFAULT 0,
    error            text,
    requested_at     timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    last_epoch       bigint
);

-- The CD server a zone was allocated to (its first director) and the instance that last led it there. A
-- director that took the zone over hands it back once a NEW instance of the home's director runs (the
-- failed one came back: the guide's behaviour).
CREATE TABLE IF NOT EXISTS cd_zone_home (
    zone           text PRIMARY KEY,
    home_server    text NOT NULL,
    home_instance  text NOT NULL,
    since        timestamptz NOT NULL DEFAULT now(),
    epoch        bigint NOT NULL
);

-- Data imports: how late one started when it was due while no master was up, how many times a new master
-- resumed it, and who runs it: NULL = the Common CD, a zone name = that zone's director (whose successor
-- resumes it after a Zone Director failure: the guide's "Impact of the Zone Director failure").
ALTER TABLE data_imports ADD COLUMN IF NOT EXISTS fired_late_ms bigint;
ALTER TABLE data_imports ADD COLUMN IF NOT EXISTS resumed integer NOT NULL DEFAULT 0;
ALTER TABLE data_imports ADD COLUMN IF NOT EXISTS zone text;

-- Trend samples of active jobs (progress charts, multi-campaign summary), one row per job per sample
-- period while a Common CD is up; the gap while none is up shows as missing samples (stale data).
CREATE TABLE IF NOT EXISTS cd_job_trends (
    job_id          bigint NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    at              timestamptz NOT NULL DEFAULT now(),
    state           text NOT NULL,
    contacts_total  bigint NOT NULL,
    contacts_done   bigint NOT NULL,
    attempts        bigint NOT NULL,
    live_answers    bigint NOT NULL,
    nuisance        bigint NOT NULL,
    epoch           bigint NOT NULL,
    PRIMARY KEY (job_id, at)
);

-- Campaign post-processing: the result summary of each ended job, written once. A master cut off mid-way
-- leaves some jobs without a row; the next one resumes with exactly those.
CREATE TABLE IF NOT EXISTS cd_job_results (
    job_id          bigint PRIMARY KEY REFERENCES jobs(id) ON DELETE CASCADE,
    ended_state     text NOT NULL,
    contacts_total  bigint NOT NULL,
    contacts_done   bigint NOT NULL,
    attempts        bigint NOT NULL,
    codes           jsonb NOT NULL DEFAULT '{}',
    run_seconds     double precision,
    processed_at    timestamptz NOT NULL DEFAULT now(),
    epoch           bigint NOT NULL
);

-- The nuisance rate is computed every few seconds over a sliding window of each active job's completed
-- attempts: this index keeps that a range scan instead of reading every attempt of the job.
CREATE INDEX IF NOT EXISTS attempts_completed_window ON attempts (job_id, completed_at) WHERE state = 'completed';
