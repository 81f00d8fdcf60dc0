-- Rule Engine: the do-not-call list, the rule settings, and a NOTIFY so the Rule Engine reloads at once.

-- Phones are stored normalised (E.164, as pom_ha.domain.contacts.normalize_phone returns them), so the
-- Rule Engine can compare them with contacts' phones without re-normalising.
CREATE TABLE IF NOT EXISTS dnc_list (
    phone     text PRIMARY KEY CHECK (phone ~ '^\+[1-9][0-9]{6,14}$'),
    added_at  timestamptz NOT NULL DEFAULT now()
);

INSERT INTO pim_config (key, value, description) VALUES
    ('RuleEngineCallingWindowStart', '08:00',
     'local wall-clock time (HH:MM, in the contact''s own time zone) from which a contact may be called'),
    ('RuleEngineCallingWindowEnd', '21:00',
     'local wall-clock time (HH:MM, in the contact''s own time zone) from which a contact may no longer be called'),
    ('RuleEngineMinGapBetweenAttemptsMs', '60000',
     'ms that must pass after a contact''s last dialed attempt before the Rule Engine allows the next one'),
    ('RuleEngineMaxAttempts', '3',
     'dialed attempts per contact and job after which the Rule Engine refuses the contact (MAX_ATTEMPTS_REACHED)')
ON CONFLICT (key) DO NOTHING;

-- NOTIFY rule_config, '<table>' after any change of the DNC list or of pim_config (statement level: a bulk
-- import notifies once per statement, and identical payloads in one transaction are folded by PostgreSQL).
CREATE OR REPLACE FUNCTION rule_config_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('rule_config', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS dnc_list_notify ON dnc_list;
CREATE TRIGGER dnc_list_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON dnc_list
    FOR EACH STATEMENT EXECUTE FUNCTION rule_config_notify();

DROP TRIGGER IF EXISTS pim_config_rule_notify ON pim_config;
CREATE TRIGGER pim_config_rule_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pim_config
    FOR EACH STATEMENT EXECUTE FUNCTION rule_config_notify();
