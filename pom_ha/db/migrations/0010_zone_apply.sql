-- Zone configuration "Save and Apply" (`pom-ha zone allocate ZONE --server pomN --apply --yes`).
-- "Save" only writes zones.allocated_server. "Apply" adds a row here: the zone's current Agent Manager
-- master forces its agents out (FORCED_LOGOUT zone_reset), releases the zone lease and records
-- `released_at`/`released_by`; for `grace_s` after that only the allocated server's AM claims the zone
-- (the other AMs skip it while the allocated server has a live AM member row).
CREATE TABLE IF NOT EXISTS zone_apply_requests (
    id                bigserial PRIMARY KEY,
    zone              text NOT NULL,
    allocated_server  text NOT NULL,
    requested_at      timestamptz NOT NULL DEFAULT now(),
    requested_by      text,
    grace_s           double precision NOT NULL DEFAULT 15 CHECK (grace_s >= 0 AND grace_s <= 600),
    handled_at        timestamptz,
    handled_by        text,
    logged_out        integer,
    released_at       timestamptz,
    result            text
);
CREATE INDEX IF NOT EXISTS zone_apply_requests_pending ON zone_apply_requests (zone, id) WHERE handled_at IS NULL;
CREATE OR REPLACE FUNCTION zone_apply_requests_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('zone_apply_requests', NEW.zone);
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS zone_apply_requests_notify ON zone_apply_requests;
CREATE TRIGGER zone_apply_requests_notify AFTER INSERT ON zone_apply_requests
    FOR EACH ROW EXECUTE FUNCTION zone_apply_requests_notify();
