-- What an agent reports about each worker beyond its state (issue #24): why it last failed (an
-- external engine's server that is missing, exits at start or never becomes healthy), and its
-- engine and version (`llamacpp b1-0c1e570`, `kvfleet-model native (CPU)`). Shown by
-- `kvfleet workers` and the web UI. NULL: not reported (ready, or an older agent).
ALTER TABLE workers
    ADD COLUMN observed_error text,
    ADD COLUMN observed_engine text;
