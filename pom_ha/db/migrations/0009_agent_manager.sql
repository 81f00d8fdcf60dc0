-- Agent Manager (docs/agent-manager.md): the agents of each zone as the zone's master last saw them, so the
-- master that takes the zone over knows every agent (Table 9 is applied to these rows). Every write comes
-- from the zone's master under its lease fence (ha_lease agent_manager/<zone>).
CREATE TABLE IF NOT EXISTS agents (
    zone                 text NOT NULL,
    agent_id             text NOT NULL,
    logged_in            boolean NOT NULL DEFAULT false,
    ready                boolean NOT NULL DEFAULT false,
    call_state           text NOT NULL DEFAULT 'Idle',
    call_role            text CHECK (call_role IS NULL OR call_role IN ('owner', 'passive')),
    job_state            text,
    job_id               text,
    call_id              text,
    nailed               boolean NOT NULL DEFAULT false,
    login_time           timestamptz,
    ha_time_s            double precision NOT NULL DEFAULT 0 CHECK (ha_time_s >= 0),
    failovers            integer NOT NULL DEFAULT 0,
    nuisance_calls       integer NOT NULL DEFAULT 0,
    desktop_errors       integer NOT NULL DEFAULT 0,
    last_completion_code text,
    last_closed_call_id  text,
    epoch                bigint NOT NULL,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (zone, agent_id)
);

-- Whether the zone has a working Agent Manager master: false from the takeover until the agents are
-- checked (the Campaign Manager must not dial the zone's agent-based jobs meanwhile).
CREATE TABLE IF NOT EXISTS agent_zone_status (
    zone           text PRIMARY KEY,
    available      boolean NOT NULL,
    since          timestamptz NOT NULL DEFAULT now(),
    master_server  text NOT NULL,
    epoch          bigint NOT NULL
);

-- One row per agent per takeover: what Table 9 (and the desktop check) did to it.
CREATE TABLE IF NOT EXISTS agent_failover_log (
    id               bigserial PRIMARY KEY,
    zone             text NOT NULL,
    agent_id         text NOT NULL,
    epoch            bigint NOT NULL,
    before_state     text NOT NULL,
    after_state      text NOT NULL,
    after_job_state  text,
    table_column     text,
    call_effect      text NOT NULL,
    nailed           boolean NOT NULL,
    job_detached     boolean NOT NULL,
    desktop_state    text,
    completion_code  text,
    force_logout     boolean NOT NULL,
    call_id          text,
    ha_time_s        double precision NOT NULL,
    at               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS agent_failover_log_zone ON agent_failover_log (zone, epoch);

-- Call events from the media platform / Campaign Manager to an agent (the AM's side of a call): the zone's
-- master applies them in id order and records the result. Rows written while the zone has no master are
-- read by the next master as what happened during the gap (a 'released' call was disconnected during the
-- failover; an 'answered' dial was answered).
CREATE TABLE IF NOT EXISTS agent_call_command (
    id          bigserial PRIMARY KEY,
    zone        text NOT NULL,
    agent_id    text NOT NULL,
    event       text NOT NULL CHECK (event IN ('offered', 'preview_offered', 'callback_offered', 'dial_started',
                                                'answered', 'released')),
    call_id     text NOT NULL,
    job_id      text,
    contact_id  text,
    phone       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    applied_at  timestamptz,
    result      text
);
CREATE INDEX IF NOT EXISTS agent_call_command_pending ON agent_call_command (zone, id) WHERE applied_at IS NULL;
CREATE OR REPLACE FUNCTION agent_call_command_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('agent_call_command', NEW.zone);
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS agent_call_command_notify ON agent_call_command;
CREATE TRIGGER agent_call_command_notify AFTER INSERT ON agent_call_command
    FOR EACH ROW EXECUTE FUNCTION agent_call_command_notify();
