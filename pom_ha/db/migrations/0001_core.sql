-- Core tables: servers, zones, HA status rows, global configuration.
CREATE TABLE IF NOT EXISTS servers (
    name        text PRIMARY KEY,
    address     text NOT NULL,
    external    boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS zones (
    name        text PRIMARY KEY,
    org         text NOT NULL DEFAULT 'Default',
    -- the Agent Manager / Zone Director server the administrator allocated the zone to ("Save")
    allocated_server text REFERENCES servers(name) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per daemon instance: the source of the monitor's component table.
CREATE TABLE IF NOT EXISTS ha_member (
    service      text NOT NULL,
    server       text NOT NULL,
    instance_id  text NOT NULL,
    state        text NOT NULL CHECK (state IN ('MASTER', 'DORMANT', 'RUNNING', 'STOPPED')),
    scopes       text[] NOT NULL DEFAULT '{}',
    endpoint     text,
    load         integer NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL DEFAULT now(),
    seen_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (service, server)
);

-- One row per elected role; scope '' for singletons, the zone name for per-zone roles.
CREATE TABLE IF NOT EXISTS ha_lease (
    service          text NOT NULL,
    scope            text NOT NULL DEFAULT '',
    holder_server    text,
    holder_instance  text,
    holder_endpoint  text,
    epoch            bigint NOT NULL DEFAULT 0,
    acquired_at      timestamptz,
    renewed_at       timestamptz,
    expires_at       timestamptz NOT NULL DEFAULT '-infinity',
    PRIMARY KEY (service, scope)
);

-- One row per HA transition (acquired, renewed late, released, expired, stolen, demoted, ...).
CREATE TABLE IF NOT EXISTS ha_event (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    service      text NOT NULL,
    scope        text NOT NULL DEFAULT '',
    server       text NOT NULL,
    instance_id  text NOT NULL,
    kind         text NOT NULL,
    epoch        bigint,
    decision     text NOT NULL,
    detail       jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS ha_event_service_at ON ha_event (service, scope, at);

-- Global configuration (the guide's PIM_Config), values kept as text with their unit in the key.
CREATE TABLE IF NOT EXISTS pim_config (
    key          text PRIMARY KEY,
    value        text NOT NULL,
    description  text NOT NULL DEFAULT ''
);
INSERT INTO pim_config (key, value, description) VALUES
    ('AppServerWaitTimeOut', '30000',
     'ms the Agent Manager waits after a takeover for application servers to report nailing sessions')
ON CONFLICT (key) DO NOTHING;

-- Kafka producer settings for the Event SDK (the guide's PIM_Kafka_Producer_Config defaults).
CREATE TABLE IF NOT EXISTS pim_kafka_producer_config (
    property     text PRIMARY KEY,
    value        text NOT NULL
);
INSERT INTO pim_kafka_producer_config (property, value) VALUES
    ('acks', 'all'),
    ('retries', '2'),
    ('request.timeout.ms', '120000'),
    ('max.block.ms', '50000'),
    ('retry.backoff.ms', '10000'),
    ('key.serializer', 'org.apache.kafka.common.serialization.StringSerializer'),
    ('value.serializer', 'org.apache.kafka.common.serialization.StringSerializer')
ON CONFLICT (property) DO NOTHING;
