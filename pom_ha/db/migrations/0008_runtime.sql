-- Runtime parameter changes over ActiveMQ (docs/activemq.md): a pacing rate set while the job runs
-- (calls per second) overrides the campaign definition's rate; written by the job's Campaign Manager under
-- its assignment fence, so a CM that takes the job over keeps dialing at the changed rate.
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS pacing_rate double precision
    CHECK (pacing_rate IS NULL OR (pacing_rate > 0 AND pacing_rate <= 100000));
