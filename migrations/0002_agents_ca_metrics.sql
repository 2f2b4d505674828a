-- The control plane's second schema step: agent join tokens, node inventory the agents report,
-- the desired-state generation agents watch, the node CA, and fleet metrics from heartbeats.

-- Join tokens let a new node register; they belong to no node (like admin tokens), which the
-- api_tokens_agent_has_node constraint already allows for every role except 'agent'.
ALTER TABLE api_tokens DROP CONSTRAINT api_tokens_role_check;
ALTER TABLE api_tokens ADD CONSTRAINT api_tokens_role_check
    CHECK (role IN ('admin', 'operator', 'viewer', 'agent', 'join'));

ALTER TABLE nodes
    -- Bumped whenever the node's desired state changes; agents long-poll on it.
    ADD COLUMN desired_generation bigint NOT NULL DEFAULT 1 CHECK (desired_generation >= 1),
    -- Engine slots for CPU-only workers the agent offers (0: none).
    ADD COLUMN cpu_slots integer NOT NULL DEFAULT 0 CHECK (cpu_slots >= 0),
    -- Every address the agent reported (strings such as "10.0.0.5"), for operators and SANs.
    ADD COLUMN addresses jsonb NOT NULL DEFAULT '[]'::jsonb CHECK (jsonb_typeof(addresses) = 'array'),
    ADD COLUMN state_changed_at timestamptz NOT NULL DEFAULT now();

ALTER TABLE gpus
    ADD COLUMN utilization real CHECK (utilization BETWEEN 0 AND 1),
    ADD COLUMN memory_used_bytes bigint CHECK (memory_used_bytes >= 0);

-- GPU memory one worker of the model needs; NULL: unknown, fits any GPU.
ALTER TABLE models ADD COLUMN memory_bytes bigint CHECK (memory_bytes > 0);

ALTER TABLE workers ADD COLUMN observed_at timestamptz;

-- The node CA: one row, created by the first control plane that starts. The private key is
-- stored in the clear (protect the database; encryption at rest is not done yet).
CREATE TABLE node_ca (
    id         smallint PRIMARY KEY CHECK (id = 1),
    name       text NOT NULL,
    cert_pem   text NOT NULL,
    key_pem    text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE node_certificates (
    serial     text PRIMARY KEY CHECK (serial ~ '^[0-9a-f]{32}$'),
    node_id    uuid NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    not_before timestamptz NOT NULL,
    not_after  timestamptz NOT NULL CHECK (not_after > not_before),
    revoked_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX node_certificates_node ON node_certificates (node_id);
CREATE INDEX node_certificates_revoked ON node_certificates (revoked_at) WHERE revoked_at IS NOT NULL;

-- One sample per worker per heartbeat, stamped with the control plane's receipt time. No foreign
-- keys: history outlives workers, and heartbeats must not contend on row locks.
CREATE TABLE worker_metrics (
    worker_id        bigint NOT NULL,
    deployment_id    uuid NOT NULL,
    node_id          uuid NOT NULL,
    at               timestamptz NOT NULL,
    request_rate     real NOT NULL CHECK (request_rate >= 0),
    ttft_p50_ms      real CHECK (ttft_p50_ms >= 0),
    ttft_p99_ms      real CHECK (ttft_p99_ms >= 0),
    itl_p50_ms       real CHECK (itl_p50_ms >= 0),
    itl_p99_ms       real CHECK (itl_p99_ms >= 0),
    tokens_per_s     real NOT NULL CHECK (tokens_per_s >= 0),
    kv_blocks_used   bigint NOT NULL CHECK (kv_blocks_used >= 0),
    kv_blocks_total  bigint NOT NULL CHECK (kv_blocks_total >= 0),
    prefix_hit_rate  real CHECK (prefix_hit_rate BETWEEN 0 AND 1),
    gpu_utilization  real CHECK (gpu_utilization BETWEEN 0 AND 1)
);
CREATE INDEX worker_metrics_worker_at ON worker_metrics (worker_id, at);
CREATE INDEX worker_metrics_deployment_at ON worker_metrics (deployment_id, at);
CREATE INDEX worker_metrics_at ON worker_metrics (at);

-- Downsampled buckets (averages over `bucket_width`), kept longer than raw samples.
CREATE TABLE worker_metrics_rollup (
    worker_id        bigint NOT NULL,
    bucket_start     timestamptz NOT NULL,
    deployment_id    uuid NOT NULL,
    node_id          uuid NOT NULL,
    samples          integer NOT NULL CHECK (samples > 0),
    request_rate     real NOT NULL,
    ttft_p50_ms      real,
    ttft_p99_ms      real,
    itl_p50_ms       real,
    itl_p99_ms       real,
    tokens_per_s     real NOT NULL,
    kv_blocks_used   bigint NOT NULL,
    kv_blocks_total  bigint NOT NULL,
    prefix_hit_rate  real,
    gpu_utilization  real,
    PRIMARY KEY (worker_id, bucket_start)
);
CREATE INDEX worker_metrics_rollup_deployment ON worker_metrics_rollup (deployment_id, bucket_start);

-- Raw samples before `rolled_until` have been folded into worker_metrics_rollup.
CREATE TABLE metrics_rollup_state (
    id           smallint PRIMARY KEY CHECK (id = 1),
    rolled_until timestamptz NOT NULL
);
