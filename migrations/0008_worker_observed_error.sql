-- Why a worker last failed, as its agent reported it in a heartbeat (issue #24: an external
-- engine's server that is missing, exits at start or never becomes healthy): shown by
-- `kvfleet workers` and the web UI next to the observed state. NULL: no reason (ready, or an
-- agent that does not report one).
ALTER TABLE workers ADD COLUMN observed_error text;
