-- Joins an admin approves, and labels an admin sets (issue #22).
--
-- `approval`: a node made by a join token lands 'pending' unless the control plane's
-- `[join] auto_approve` is on; a pending node may heartbeat (so an admin sees it is alive) but
-- gets no peer certificate and no workers until an admin approves it. 'rejected' nodes are also
-- 'removed' (credential and certificates revoked, GPUs released). Nodes that joined before this
-- migration were admitted under the old rules and stay 'approved'.
--
-- `labels` keeps what the node's agent reports (rewritten at every registration);
-- `admin_labels` is what an admin set, which no agent call touches. Placement matches the two
-- merged, the admin's value winning on a shared key (`labels || admin_labels`).
ALTER TABLE nodes
    ADD COLUMN approval text NOT NULL DEFAULT 'approved'
        CHECK (approval IN ('pending', 'approved', 'rejected')),
    ADD COLUMN admin_labels jsonb NOT NULL DEFAULT '{}'::jsonb
        CHECK (jsonb_typeof(admin_labels) = 'object'),
    ADD CONSTRAINT nodes_rejected_is_removed CHECK (approval <> 'rejected' OR state = 'removed');
CREATE INDEX nodes_pending ON nodes (created_at) WHERE approval = 'pending';
