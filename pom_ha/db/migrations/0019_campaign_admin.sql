-- Campaign administration (issue 19): contact strategies, named DNC lists (global and per campaign),
-- holiday calendars, recurring schedules (rrule / cron in a named zone), list default regions, archived
-- campaigns. Written by the operator tools (pom_ha.campaign.service); read by the Rule Engine (strategies,
-- DNC lists, which job runs which campaign: NOTIFY rule_config with the table's name on every change) and
-- by the Common CD (schedules).

CREATE TABLE IF NOT EXISTS contact_strategies (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL UNIQUE,
    -- the validated pom_ha.domain.contact_strategy.StrategySpec, as JSON
    spec         jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE campaigns ADD COLUMN IF NOT EXISTS strategy_id bigint REFERENCES contact_strategies(id);
ALTER TABLE campaigns ADD COLUMN IF NOT EXISTS archived_at timestamptz;
ALTER TABLE campaigns ADD COLUMN IF NOT EXISTS updated_at timestamptz NOT NULL DEFAULT now();

-- national numbers of an import are read in this region (ISO 3166, e.g. US); NULL: E.164 only
ALTER TABLE contact_lists ADD COLUMN IF NOT EXISTS default_region text;

-- Named do-not-call lists. A global list applies to every campaign; another applies to the campaigns it is
-- attached to (campaign_dnc). The legacy table dnc_list stays a global list too.
CREATE TABLE IF NOT EXISTS dnc_lists (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL UNIQUE,
    is_global    boolean NOT NULL DEFAULT false,
    description  text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS dnc_numbers (
    list_id   bigint NOT NULL REFERENCES dnc_lists(id) ON DELETE CASCADE,
    phone     text NOT NULL CHECK (phone ~ '^\+[1-9][0-9]{6,14}$'),
    added_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (list_id, phone)
);
CREATE INDEX IF NOT EXISTS dnc_numbers_phone ON dnc_numbers (phone);

CREATE TABLE IF NOT EXISTS campaign_dnc (
    campaign_id  bigint NOT NULL REFERENCES campaigns(id) ON DELETE CASCADE,
    list_id      bigint NOT NULL REFERENCES dnc_lists(id),
    PRIMARY KEY (campaign_id, list_id)
);

CREATE TABLE IF NOT EXISTS holiday_calendars (
    id            bigserial PRIMARY KEY,
    name          text NOT NULL UNIQUE,
    country       text,
    subdivision   text,
    custom_dates  date[] NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Recurring schedules: an RFC 5545 rule or a cron expression on the wall clock of ``tz``; occurrences on a
-- day of the calendar are skipped (counted, with the holiday's name). ``interval_s`` schedules stay.
ALTER TABLE cd_schedules ADD COLUMN IF NOT EXISTS name text;
ALTER TABLE cd_schedules ADD COLUMN IF NOT EXISTS recurrence_kind text CHECK (recurrence_kind IN ('rrule', 'cron'));
ALTER TABLE cd_schedules ADD COLUMN IF NOT EXISTS recurrence text;
ALTER TABLE cd_schedules ADD COLUMN IF NOT EXISTS recurrence_start timestamptz;
ALTER TABLE cd_schedules ADD COLUMN IF NOT EXISTS tz text;
ALTER TABLE cd_schedules ADD COLUMN IF NOT EXISTS calendar_id bigint REFERENCES holiday_calendars(id);
ALTER TABLE cd_schedules ADD COLUMN IF NOT EXISTS skipped_count integer NOT NULL DEFAULT 0;
ALTER TABLE cd_schedules ADD COLUMN IF NOT EXISTS last_skip text;
CREATE UNIQUE INDEX IF NOT EXISTS cd_schedules_name ON cd_schedules (name) WHERE name IS NOT NULL;
ALTER TABLE cd_schedules DROP CONSTRAINT IF EXISTS cd_schedules_state_check;
ALTER TABLE cd_schedules ADD CONSTRAINT cd_schedules_state_check
    CHECK (state IN ('pending', 'fired', 'cancelled', 'skipped'));
ALTER TABLE cd_schedules DROP CONSTRAINT IF EXISTS cd_schedules_recurrence_check;
ALTER TABLE cd_schedules ADD CONSTRAINT cd_schedules_recurrence_check
    CHECK ((recurrence_kind IS NULL) = (recurrence IS NULL) AND (recurrence IS NULL OR tz IS NOT NULL));

-- The Rule Engine reloads what changed (the payload names the table).
DROP TRIGGER IF EXISTS dnc_lists_notify ON dnc_lists;
CREATE TRIGGER dnc_lists_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON dnc_lists
    FOR EACH STATEMENT EXECUTE FUNCTION rule_config_notify();
DROP TRIGGER IF EXISTS dnc_numbers_notify ON dnc_numbers;
CREATE TRIGGER dnc_numbers_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON dnc_numbers
    FOR EACH STATEMENT EXECUTE FUNCTION rule_config_notify();
DROP TRIGGER IF EXISTS campaign_dnc_notify ON campaign_dnc;
CREATE TRIGGER campaign_dnc_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON campaign_dnc
    FOR EACH STATEMENT EXECUTE FUNCTION rule_config_notify();
DROP TRIGGER IF EXISTS contact_strategies_notify ON contact_strategies;
CREATE TRIGGER contact_strategies_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON contact_strategies
    FOR EACH STATEMENT EXECUTE FUNCTION rule_config_notify();
DROP TRIGGER IF EXISTS campaigns_rule_notify ON campaigns;
CREATE TRIGGER campaigns_rule_notify AFTER INSERT OR UPDATE OR DELETE ON campaigns
    FOR EACH STATEMENT EXECUTE FUNCTION rule_config_notify();
DROP TRIGGER IF EXISTS jobs_rule_notify ON jobs;
CREATE TRIGGER jobs_rule_notify AFTER INSERT ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION rule_config_notify();
