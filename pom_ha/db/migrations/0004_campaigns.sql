-- Campaigns, contact lists, imports, jobs, per-job contact progress and attempts.
--
-- Ownership of writes:
--   * the Common CD (master of campaign_director, scope '') creates jobs, assigns them to Campaign Managers
--     (ha_assignment service 'campaign_manager', item 'job:<id>'), runs imports and finish checks — every
--     write fenced by its lease epoch;
--   * the Campaign Manager that owns a job writes that job's job_contacts and attempts rows, fenced by the
--     job's ha_assignment epoch (pom_ha.ha.fencing.AssignmentFence). An attempt row is written BEFORE its
--     dial command leaves, so a takeover finds every attempt that may have rung.
-- State names are the domain's display names (pom_ha.domain.jobs.JobState.value).

CREATE TABLE IF NOT EXISTS campaigns (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL UNIQUE,
    -- the validated pom_ha.domain.campaigns.CampaignDefinition, as JSON
    definition   jsonb NOT NULL,
    zone         text NOT NULL DEFAULT 'default',
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS contact_lists (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS contacts (
    list_id      bigint NOT NULL REFERENCES contact_lists(id) ON DELETE CASCADE,
    contact_id   text NOT NULL,
    -- E.164, as pom_ha.domain.contacts.normalize_phone returns it
    phone        text NOT NULL CHECK (phone ~ '^\+[1-9][0-9]{6,14}$'),
    timezone     text NOT NULL,
    custom       jsonb NOT NULL DEFAULT '{}',
    added_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (list_id, contact_id)
);

-- A data import (CSV file or database table) into a contact list. ``checkpoint`` is the number of source
-- records fully processed (committed in the same transaction as the rows), so a new Common CD resumes
-- exactly where the old one stopped.
CREATE TABLE IF NOT EXISTS data_imports (
    id            bigserial PRIMARY KEY,
    list_id       bigint NOT NULL REFERENCES contact_lists(id) ON DELETE CASCADE,
    source_kind   text NOT NULL CHECK (source_kind IN ('csv', 'table')),
    source        text NOT NULL,
    state         text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'completed', 'failed')),
    checkpoint    bigint NOT NULL DEFAULT 0,
    imported      bigint NOT NULL DEFAULT 0,
    rejected      bigint NOT NULL DEFAULT 0,
    error         text,
    scheduled_at  timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    finished_at   timestamptz,
    last_epoch    bigint
);

CREATE TABLE IF NOT EXISTS import_errors (
    import_id    bigint NOT NULL REFERENCES data_imports(id) ON DELETE CASCADE,
    line         bigint NOT NULL,
    reason       text NOT NULL,
    PRIMARY KEY (import_id, line)
);

CREATE TABLE IF NOT EXISTS jobs (
    id              bigserial PRIMARY KEY,
    campaign_id     bigint NOT NULL REFERENCES campaigns(id) ON DELETE CASCADE,
    list_id         bigint NOT NULL REFERENCES contact_lists(id),
    zone            text NOT NULL DEFAULT 'default',
    state           text NOT NULL DEFAULT 'Queued' CHECK (state IN (
                        'Queued', 'Filter in Progress', 'Running', 'Paused', 'Stopping', 'Completed', 'Stopped')),
    -- the end chosen on entering Stopping ('Completed' or 'Stopped'), see pom_ha.domain.jobs.JobStatus
    ending          text CHECK (ending IN ('Completed', 'Stopped')),
    state_reason    text,
    scheduled_start timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    ended_at        timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS jobs_active ON jobs (state) WHERE state NOT IN ('Completed', 'Stopped');

-- Per job and contact: where the contact stands. ``pending`` contacts are due at next_attempt_at;
-- ``dialing`` has exactly one attempt in flight; ``done`` carries the final completion code.
CREATE TABLE IF NOT EXISTS job_contacts (
    job_id          bigint NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    contact_id      text NOT NULL,
    state           text NOT NULL DEFAULT 'pending'
                        CHECK (state IN ('pending', 'dialing', 'done', 'filtered_out')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    final_code      text,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, contact_id)
);
CREATE INDEX IF NOT EXISTS job_contacts_due ON job_contacts (job_id, next_attempt_at) WHERE state = 'pending';

CREATE TABLE IF NOT EXISTS attempts (
    job_id            bigint NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    contact_id        text NOT NULL,
    attempt_no        integer NOT NULL CHECK (attempt_no >= 1),
    state             text NOT NULL CHECK (state IN ('dialing', 'completed')),
    code              text,
    cm_server         text NOT NULL,
    cm_instance       text NOT NULL,
    -- the job's ha_assignment epoch under which the attempt was written
    assignment_epoch  bigint NOT NULL,
    call_id           text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    completed_at      timestamptz,
    duration_ms       integer,
    PRIMARY KEY (job_id, contact_id, attempt_no),
    CHECK ((state = 'completed') = (code IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS attempts_in_flight ON attempts (job_id) WHERE state = 'dialing';
