-- The first kvfleet schema: the fleet's inventory (nodes, GPUs), what it serves (models,
-- deployments, workers), who may change it (api_tokens) and what was changed (audit_log).
-- Enumerations are text with CHECK constraints rather than Postgres enums: adding a value is
-- then a constraint swap inside one migration, with no ALTER TYPE restrictions.

CREATE TABLE nodes (
    id                uuid PRIMARY KEY,
    hostname          text NOT NULL CHECK (hostname ~ '^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$'),
    frontend_addr     text,
    peer_addr         text,
    state             text NOT NULL DEFAULT 'joining'
                      CHECK (state IN ('joining', 'healthy', 'unhealthy', 'lost', 'removed')),
    cordoned          boolean NOT NULL DEFAULT false,
    draining          boolean NOT NULL DEFAULT false,
    labels            jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(labels) = 'object'),
    agent_version     text,
    last_heartbeat_at timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
-- A hostname names one live node; a removed node's hostname may join again.
CREATE UNIQUE INDEX nodes_live_hostname ON nodes (hostname) WHERE state <> 'removed';
CREATE INDEX nodes_state ON nodes (state);

CREATE TABLE gpus (
    id                 uuid PRIMARY KEY,
    node_id            uuid NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    device_index       integer NOT NULL CHECK (device_index >= 0),
    name               text NOT NULL CHECK (length(name) > 0),
    memory_total_bytes bigint NOT NULL CHECK (memory_total_bytes > 0),
    pci_bus_id         text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (node_id, device_index)
);

CREATE TABLE models (
    id             uuid PRIMARY KEY,
    name           text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$'),
    format         text NOT NULL CHECK (format IN ('gguf', 'safetensors', 'mock')),
    -- Where the weights are on each node (the same path on every node unless overridden).
    path           text NOT NULL CHECK (length(path) > 0),
    block_size     integer NOT NULL DEFAULT 16 CHECK (block_size BETWEEN 1 AND 1024),
    context_length integer CHECK (context_length > 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE deployments (
    id             uuid PRIMARY KEY,
    name           text NOT NULL UNIQUE CHECK (name ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    model_id       uuid NOT NULL REFERENCES models (id) ON DELETE RESTRICT,
    mode           text NOT NULL DEFAULT 'aggregated' CHECK (mode IN ('aggregated', 'disaggregated')),
    ttft_target_ms integer CHECK (ttft_target_ms > 0),
    itl_target_ms  integer CHECK (itl_target_ms > 0),
    min_workers    integer NOT NULL DEFAULT 1 CHECK (min_workers >= 0),
    max_workers    integer NOT NULL DEFAULT 1 CHECK (max_workers >= 1),
    placement      jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(placement) = 'object'),
    -- Bumped on every change so agents can tell a new desired state from an old one.
    generation     bigint NOT NULL DEFAULT 1 CHECK (generation >= 1),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT deployments_min_le_max CHECK (min_workers <= max_workers)
);
CREATE INDEX deployments_model ON deployments (model_id);

-- Worker ids are the compact u64 WorkerId that KV events and router indexes carry.
CREATE TABLE workers (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    deployment_id  uuid NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    node_id        uuid NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    -- NULL: a CPU slot.
    gpu_id         uuid REFERENCES gpus (id) ON DELETE SET NULL,
    role           text NOT NULL DEFAULT 'aggregated' CHECK (role IN ('aggregated', 'prefill', 'decode')),
    desired_state  text NOT NULL DEFAULT 'running' CHECK (desired_state IN ('running', 'draining', 'stopped')),
    observed_state text NOT NULL DEFAULT 'pending'
                   CHECK (observed_state IN ('pending', 'starting', 'ready', 'draining', 'stopped', 'failed', 'lost')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
-- One live worker per GPU.
CREATE UNIQUE INDEX workers_one_live_per_gpu ON workers (gpu_id)
    WHERE gpu_id IS NOT NULL AND desired_state <> 'stopped';
CREATE INDEX workers_node ON workers (node_id);
CREATE INDEX workers_deployment ON workers (deployment_id);

-- Bearer tokens. Only a SHA-256 of the secret is stored; `prefix` (the public first characters
-- of the token) finds the row without scanning.
CREATE TABLE api_tokens (
    id           uuid PRIMARY KEY,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    role         text NOT NULL CHECK (role IN ('admin', 'operator', 'viewer', 'agent')),
    prefix       text NOT NULL UNIQUE CHECK (length(prefix) BETWEEN 8 AND 32),
    secret_hash  bytea NOT NULL CHECK (octet_length(secret_hash) = 32),
    -- Agent credentials belong to a node and die with it.
    node_id      uuid REFERENCES nodes (id) ON DELETE CASCADE,
    created_by   uuid REFERENCES api_tokens (id) ON DELETE SET NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz,
    CONSTRAINT api_tokens_agent_has_node CHECK ((role = 'agent') = (node_id IS NOT NULL)),
    CONSTRAINT api_tokens_expiry_after_creation CHECK (expires_at IS NULL OR expires_at > created_at)
);
CREATE INDEX api_tokens_node ON api_tokens (node_id) WHERE node_id IS NOT NULL;

CREATE TABLE audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor_token uuid REFERENCES api_tokens (id) ON DELETE SET NULL,
    -- The actor's name at the time, kept when the token is gone.
    actor       text NOT NULL CHECK (length(actor) > 0),
    action      text NOT NULL CHECK (action ~ '^[a-z_]+\.[a-z_]+$'),
    target_type text NOT NULL CHECK (length(target_type) > 0),
    target_id   text,
    before      jsonb,
    after       jsonb,
    request_id  text
);
CREATE INDEX audit_log_at ON audit_log (at DESC);
CREATE INDEX audit_log_target ON audit_log (target_type, target_id);
