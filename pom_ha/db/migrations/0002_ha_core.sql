-- HA core: lease release marker, lease-change notifications, pool assignments, the probe's fenced writes.

-- Set by a graceful release (expires_at = now() at the same time); NULL while held or after expiry.
ALTER TABLE ha_lease ADD COLUMN IF NOT EXISTS released_at timestamptz;

-- NOTIFY ha_lease, '<service>/<scope>' whenever a lease changes hands or is released (not on renewals),
-- in the same transaction as the change: dormants LISTENing react within milliseconds.
CREATE OR REPLACE FUNCTION ha_lease_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT'
       OR NEW.epoch IS DISTINCT FROM OLD.epoch
       OR NEW.released_at IS DISTINCT FROM OLD.released_at THEN
        PERFORM pg_notify('ha_lease', NEW.service || '/' || NEW.scope);
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS ha_lease_notify ON ha_lease;
CREATE TRIGGER ha_lease_notify AFTER INSERT OR UPDATE ON ha_lease
    FOR EACH ROW EXECUTE FUNCTION ha_lease_notify();

-- Work items of a pool service (e.g. Campaign Manager jobs) and who runs them. ``epoch`` grows on every
-- (re)assignment, so the previous owner's fenced writes are refused once an item moves.
CREATE TABLE IF NOT EXISTS ha_assignment (
    service          text NOT NULL,
    item             text NOT NULL,
    owner_server     text NOT NULL,
    owner_instance   text NOT NULL,
    epoch            bigint NOT NULL DEFAULT 1,
    assigned_at      timestamptz NOT NULL DEFAULT now(),
    -- the allocator's own lease (service/scope/epoch) under which the assignment was made
    assigner_service text,
    assigner_scope   text,
    assigner_epoch   bigint,
    PRIMARY KEY (service, item)
);
CREATE INDEX IF NOT EXISTS ha_assignment_owner ON ha_assignment (service, owner_instance);

-- One row per fenced write of the ha-probe daemon: the history checker asserts epochs never interleave.
CREATE TABLE IF NOT EXISTS ha_probe_write (
    id           bigserial PRIMARY KEY,
    service      text NOT NULL,
    scope        text NOT NULL DEFAULT '',
    server       text NOT NULL,
    instance_id  text NOT NULL,
    epoch        bigint NOT NULL,
    written_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS ha_probe_write_service_at ON ha_probe_write (service, scope, written_at);
