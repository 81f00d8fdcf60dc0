-- Agent-based campaigns (docs/campaign-manager.md "Agent-based jobs"): the Campaign Manager hands live
-- answers and previews to the Agent Manager through agent_call_command. `ref` is the CM's name for the
-- offer (the attempt's call id), so the CM can follow a row it inserted through a fenced write (which
-- returns no id). A call queued for an agent when the AM failed is re-offered by the new master to another
-- free agent of the job in place: `reoffered_from` keeps the agent it was first meant for.
ALTER TABLE agent_call_command ADD COLUMN IF NOT EXISTS ref text;
ALTER TABLE agent_call_command ADD COLUMN IF NOT EXISTS reoffered_from text;
ALTER TABLE agent_call_command ADD COLUMN IF NOT EXISTS reoffered_at timestamptz;
CREATE INDEX IF NOT EXISTS agent_call_command_ref ON agent_call_command (ref) WHERE ref IS NOT NULL;
CREATE INDEX IF NOT EXISTS agents_job ON agents (zone, job_id);
