-- Why a zone's agents are forced out and the zone handed on (services/agent_manager/zone_config.py):
-- 'zone_reset' = the administrator's "Save and Apply" (`pom-ha zone allocate --apply`);
-- 'sdk_connection_lost' = the workspaces scenario (`pom-ha agents sdk-lost`): the agent SDK's link to the zone's
-- Agent Manager broke; the agents are logged out (calls closed DESKTOP_ERROR) and the zone goes to the
-- secondary AM of the same zone, where the desktops log in again. This does not change zones.allocated_server.
ALTER TABLE zone_apply_requests ADD COLUMN IF NOT EXISTS reason text NOT NULL DEFAULT 'zone_reset';
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'zone_apply_requests_reason_check') THEN
        ALTER TABLE zone_apply_requests ADD CONSTRAINT zone_apply_requests_reason_check
            CHECK (reason IN ('zone_reset', 'sdk_connection_lost'));
    END IF;
END $$;
