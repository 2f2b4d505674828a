-- The KV index authority (controlplane/src/kv_index.rs): the sequenced log of changes applied to
-- the fleet-wide KV block index, and checkpoints of the whole index.
--
-- `kv_log` is the order every router follows: `seq` is the global sequence number (allocated
-- under a transaction advisory lock, so rows commit in `seq` order without holes), `item` the
-- change as streamed (a kvfleet_proto::kv_stream::KvStreamItem: an engine event, a worker reset
-- or a worker removal). Rows older than the newest checkpoint minus the stream retention are
-- pruned by the leader. No foreign keys: the log outlives workers and must not contend on locks.
CREATE TABLE kv_log (
    seq    bigint PRIMARY KEY CHECK (seq > 0),
    worker bigint NOT NULL,
    item   jsonb NOT NULL CHECK (jsonb_typeof(item) = 'object'),
    at     timestamptz NOT NULL DEFAULT now()
);

-- The whole index as of `seq` (a JSON-encoded kvfleet_proto::kv_stream::KvSnapshot). A replica
-- starts from the newest one and replays the log rows after it.
CREATE TABLE kv_checkpoints (
    seq        bigint PRIMARY KEY CHECK (seq >= 0),
    snapshot   bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
