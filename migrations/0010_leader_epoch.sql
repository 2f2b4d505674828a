-- The leader's fencing token (issue #22). A replica that takes the leader lock bumps `epoch`;
-- every write transaction of the leader's loops (placement, liveness, planner) reads the row
-- FOR SHARE and goes on only while it still holds the epoch it was elected with, so a deposed
-- leader that has not noticed yet has its writes refused. One row, always present.
CREATE TABLE leader_epoch (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    epoch bigint NOT NULL,
    -- The elected session's application_name, for operators (not used for fencing).
    holder text NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO leader_epoch (id, epoch, holder) VALUES (true, 0, '');
