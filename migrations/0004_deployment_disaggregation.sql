-- A deployment's disaggregation policy (kvfleet_proto::api::DisaggregationPolicy): when a
-- `disaggregated` deployment prefills a request on a prefill worker rather than on the decode
-- worker. Kept while the deployment is `aggregated` (where it is ignored), so switching modes back
-- and forth does not lose it. Existing rows get the defaults.
--
-- The token counts are u32 on the wire, which `integer` cannot hold, hence `bigint` bounded to
-- the u32 range; the API validates the same ranges first and names the field.
ALTER TABLE deployments
    ADD COLUMN min_remote_prefill_tokens bigint NOT NULL DEFAULT 256
        CHECK (min_remote_prefill_tokens BETWEEN 0 AND 4294967295),
    ADD COLUMN max_prefill_queue_tokens bigint NOT NULL DEFAULT 16384
        CHECK (max_prefill_queue_tokens BETWEEN 1 AND 4294967295),
    ADD COLUMN prefill_timeout_ms integer NOT NULL DEFAULT 30000
        CHECK (prefill_timeout_ms BETWEEN 100 AND 600000);
