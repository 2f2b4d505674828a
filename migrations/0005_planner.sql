-- The SLA planner (controlplane/src/planner.rs, crates/planner): per-deployment SLA fields and
-- planner mode, per-role bounds, the fleet-wide GPU budget, performance profiles per model and
-- device kind, what each deployment served per interval, the planner's decisions, and the
-- heartbeat windows they are made from.

-- The deployment's existing ttft_target_ms / itl_target_ms / min_workers / max_workers are the
-- SLA and bounds; these extend them.
ALTER TABLE deployments
    -- The percentile both targets hold at (p90 by default).
    ADD COLUMN sla_percentile double precision NOT NULL DEFAULT 90
        CHECK (sla_percentile BETWEEN 50 AND 99.99),
    ADD COLUMN planner text NOT NULL DEFAULT 'off' CHECK (planner IN ('off', 'advise', 'auto')),
    -- Per-role bounds of a disaggregated deployment (NULL: only min/max_workers bound the role).
    ADD COLUMN min_prefill_workers integer CHECK (min_prefill_workers >= 0),
    ADD COLUMN max_prefill_workers integer CHECK (max_prefill_workers >= 0),
    ADD COLUMN min_decode_workers integer CHECK (min_decode_workers >= 0),
    ADD COLUMN max_decode_workers integer CHECK (max_decode_workers >= 0),
    -- What placement runs in `auto` mode: the planner's last targets per role
    -- ({"aggregated": n, "prefill": n, "decode": n}); NULL: min_workers.
    ADD COLUMN planner_targets jsonb CHECK (planner_targets IS NULL OR jsonb_typeof(planner_targets) = 'object'),
    ADD CONSTRAINT deployments_prefill_bounds CHECK (min_prefill_workers <= max_prefill_workers),
    ADD CONSTRAINT deployments_decode_bounds CHECK (min_decode_workers <= max_decode_workers);

-- Fleet-wide planner settings: one row, created on first change.
CREATE TABLE planner_settings (
    id         smallint PRIMARY KEY CHECK (id = 1),
    -- Most workers all deployments may hold together (NULL: no limit).
    gpu_budget integer CHECK (gpu_budget >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Performance profiles (kvfleet_proto::profile::PerfProfile, docs/profiles.md), one per model
-- and device kind; `device` repeats profile->>'device' so the pair is unique.
CREATE TABLE perf_profiles (
    id         uuid PRIMARY KEY,
    model_id   uuid NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    device     text NOT NULL CHECK (length(device) BETWEEN 1 AND 200),
    profile    jsonb NOT NULL CHECK (jsonb_typeof(profile) = 'object'),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (model_id, device)
);

-- One heartbeat window of one worker (kvfleet_proto::api::WorkerWindow), stamped with the
-- receiving replica's clock. The leader folds the windows of each planner interval into one
-- observation per deployment and deletes them after `planner.window_retention`. No foreign
-- keys: heartbeats must not contend on row locks.
CREATE TABLE worker_windows (
    worker_id     bigint NOT NULL,
    deployment_id uuid NOT NULL,
    role          text NOT NULL CHECK (role IN ('aggregated', 'prefill', 'decode')),
    at            timestamptz NOT NULL,
    win           jsonb NOT NULL CHECK (jsonb_typeof(win) = 'object')
);
CREATE INDEX worker_windows_deployment_at ON worker_windows (deployment_id, at);
CREATE INDEX worker_windows_at ON worker_windows (at);

-- What one deployment served over one planner interval (kvfleet_planner::Observation), the
-- planner's history: a new leader reads it back and predicts exactly what the old one would.
CREATE TABLE planner_observations (
    deployment_id uuid NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    at            timestamptz NOT NULL,
    observation   jsonb NOT NULL CHECK (jsonb_typeof(observation) = 'object'),
    PRIMARY KEY (deployment_id, at)
);

-- Every planner decision (kvfleet_planner::DeploymentDecision in `decision`), with the columns
-- the UI and CLI list by. `decision->'memory'` is what the next round continues from.
CREATE TABLE planner_decisions (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    deployment_id uuid NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    at            timestamptz NOT NULL DEFAULT now(),
    mode          text NOT NULL CHECK (mode IN ('advise', 'auto')),
    action        text NOT NULL CHECK (action IN ('hold', 'scale_up', 'scale_down', 'rebalance')),
    reason        text NOT NULL,
    current       jsonb NOT NULL,
    targets       jsonb NOT NULL,
    applied       boolean NOT NULL,
    decided_by    text NOT NULL,
    decision      jsonb NOT NULL CHECK (jsonb_typeof(decision) = 'object')
);
CREATE INDEX planner_decisions_deployment ON planner_decisions (deployment_id, id DESC);
CREATE INDEX planner_decisions_at ON planner_decisions (at);
