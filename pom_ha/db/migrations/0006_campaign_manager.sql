-- Campaign Manager: a push when work items move, and the index its takeover and stuck-contact checks use.

-- NOTIFY ha_assignment, '{"service":..,"item":..,"owner":..,"previous":..,"epoch":..}' on every insert,
-- reassignment (epoch bump) and removal of a work item, in the same transaction as the change: a Campaign
-- Manager LISTENing learns of a job given to it (or taken from it) within milliseconds. ``owner`` is the
-- instance now holding the item (null once removed), ``previous`` the one that held it (null when new).
CREATE OR REPLACE FUNCTION ha_assignment_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('ha_assignment', json_build_object(
            'service', OLD.service, 'item', OLD.item, 'owner', NULL, 'previous', OLD.owner_instance,
            'epoch', OLD.epoch)::text);
    ELSIF TG_OP = 'INSERT' THEN
        PERFORM pg_notify('ha_assignment', json_build_object(
            'service', NEW.service, 'item', NEW.item, 'owner', NEW.owner_instance, 'previous', NULL,
            'epoch', NEW.epoch)::text);
    ELSIF NEW.epoch IS DISTINCT FROM OLD.epoch OR NEW.owner_instance IS DISTINCT FROM OLD.owner_instance THEN
        PERFORM pg_notify('ha_assignment', json_build_object(
            'service', NEW.service, 'item', NEW.item, 'owner', NEW.owner_instance,
            'previous', OLD.owner_instance, 'epoch', NEW.epoch)::text);
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS ha_assignment_notify ON ha_assignment;
CREATE TRIGGER ha_assignment_notify AFTER INSERT OR UPDATE OR DELETE ON ha_assignment
    FOR EACH ROW EXECUTE FUNCTION ha_assignment_notify();

-- Contacts with an attempt in flight, per job: the takeover's stuck-contact check reads them.
CREATE INDEX IF NOT EXISTS job_contacts_dialing ON job_contacts (job_id) WHERE state = 'dialing';
