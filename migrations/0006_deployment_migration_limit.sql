-- How many times a request whose worker (or node) is lost mid-stream resumes on another worker
-- of the deployment before it fails (kvfleet_proto::api::DEFAULT_MIGRATION_LIMIT,
-- MAX_MIGRATION_LIMIT); 0 turns migration off. Existing rows get the default. The API validates
-- the same range first and names the field.
ALTER TABLE deployments
    ADD COLUMN migration_limit integer NOT NULL DEFAULT 3
        CHECK (migration_limit BETWEEN 0 AND 20);
